"""NSACache: what decoding keeps per layer (SPEC.md, Decoding), and the attention of new tokens against it.

Per layer the cache holds
    - k, v [B, S, HKV, DK/DV]: the selected branch's keys (rotated) and values of every token so far;
    - k_cmp, v_cmp [B, Tc(S), HKV, DK/DV]: the compressed tokens, grown by phi whenever a block completes
      (one every d tokens once l are available);
    - k_tail, v_tail [B, <=l, HKV, DK/DV] and pos_tail [B, <=l]: the last l raw (unrotated) tokens of the
      compressed branch and their positions, all a block still to complete can need;
    - k_win, v_win [B, <=w, HKV, DK/DV]: the last w window keys and values (absent when the window branch shares
      the selected branch's, which k and v already hold).
A dense attention layer uses the same object and fills only k and v.

This first version attends new tokens with the reference's building blocks over the cached tensors (one pass over
the S cached keys per token); decode kernels replace decode_attention later.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import SparsityConfig
from .reference import block_scores, masked_attention, selection_mask, select_blocks, stat_dtype


@dataclass
class LayerCache:
    """One layer's slot of an NSACache (shapes in the module docstring)."""

    k: torch.Tensor
    v: torch.Tensor
    k_cmp: torch.Tensor | None = None
    v_cmp: torch.Tensor | None = None
    k_tail: torch.Tensor | None = None
    v_tail: torch.Tensor | None = None
    pos_tail: torch.Tensor | None = None
    k_win: torch.Tensor | None = None
    v_win: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return self.k.shape[1]


@dataclass
class StepState:
    """What one layer attends at one step: everything up to and including the C new tokens.

    k, v [B, S, HKV, D]; k_cmp, v_cmp [B, Tc(S), HKV, D]; k_win, v_win [B, W, HKV, D], the keys at sequence
    indices S - W .. S - 1 (W >= min(S, w - 1 + C), enough for each new token's window); past = S - C.
    """

    k: torch.Tensor
    v: torch.Tensor
    k_cmp: torch.Tensor | None
    v_cmp: torch.Tensor | None
    k_win: torch.Tensor
    v_win: torch.Tensor
    past: int


def _cat(old: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    return new if old is None else torch.cat([old, new], dim=1)


class NSACache:
    """The decoding cache of a stack of NativeSparseAttention (or dense) layers, one slot per layer_idx.

    Every sequence of the batch has the same length (no padding). Not compileable: it grows by concatenation.
    """

    is_compileable = False

    def __init__(self):
        self.layers: list[LayerCache | None] = []

    def __len__(self) -> int:
        return len(self.layers)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """The number of tokens the layer has seen (0 for a layer not yet filled)."""
        if layer_idx < len(self.layers) and self.layers[layer_idx] is not None:
            return self.layers[layer_idx].length
        return 0

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, *, k_win=None, v_win=None, k_cmp_raw=None,
               v_cmp_raw=None, position_ids=None, compress=None, sparsity: SparsityConfig | None = None) -> StepState:
        """Append C new tokens to layer `layer_idx` and return what the layer attends at this step.

        Args:
            k, v: [B, C, HKV, DK/DV] the selected branch's new keys (rotated) and values.
            k_win, v_win: the window branch's, when it has its own (else k, v serve the window).
            k_cmp_raw, v_cmp_raw: [B, C, HKV, DK/DV] the compressed branch's new keys and values before phi; None
                for a dense layer (then no compressed tokens are kept).
            position_ids: [B, C] positions of the new tokens (phi rotates a compressed key at its block's last).
            compress: (k, v, position_ids, starts) -> (k_cmp, v_cmp), the module's phi (NativeSparseAttention.compress).
            sparsity: the layer's knobs.
        """
        while len(self.layers) <= layer_idx:
            self.layers.append(None)
        layer = self.layers[layer_idx]
        if layer is not None and (layer.k.shape[0], layer.k.shape[2:]) != (k.shape[0], k.shape[2:]):
            raise ValueError(f"k must continue the cached [B, S, HKV, DK] = {tuple(layer.k.shape)}, got {tuple(k.shape)}")
        past = 0 if layer is None else layer.length
        new = LayerCache(_cat(None if layer is None else layer.k, k), _cat(None if layer is None else layer.v, v))
        C = k.shape[1]
        step_k_win, step_v_win = new.k, new.v
        if k_cmp_raw is not None:
            if compress is None or sparsity is None or position_ids is None:
                raise ValueError("compressed keys need position_ids, compress (phi) and sparsity")
            l, d, w = sparsity.cmp_block, sparsity.cmp_stride, sparsity.window
            k_buf = _cat(None if layer is None else layer.k_tail, k_cmp_raw)
            v_buf = _cat(None if layer is None else layer.v_tail, v_cmp_raw)
            pos_buf = _cat(None if layer is None else layer.pos_tail, position_ids)
            # The blocks completed by the new tokens all start inside the buffer: each ends at a new token, and the
            # buffer holds the l - 1 tokens before the first new one.
            buf_start = past + C - k_buf.shape[1]
            first, last = sparsity.num_cmp(past), sparsity.num_cmp(past + C)
            starts = torch.arange(first, last, device=k.device) * d - buf_start
            k_cmp, v_cmp = compress(k_buf, v_buf, pos_buf, starts)
            new.k_cmp = _cat(None if layer is None else layer.k_cmp, k_cmp)
            new.v_cmp = _cat(None if layer is None else layer.v_cmp, v_cmp)
            new.k_tail, new.v_tail, new.pos_tail = k_buf[:, -l:], v_buf[:, -l:], pos_buf[:, -l:]
            if k_win is not None:
                step_k_win = _cat(None if layer is None else layer.k_win, k_win)
                step_v_win = _cat(None if layer is None else layer.v_win, v_win)
                new.k_win, new.v_win = step_k_win[:, -w:], step_v_win[:, -w:]
        self.layers[layer_idx] = new
        return StepState(new.k, new.v, new.k_cmp, new.v_cmp, step_k_win, step_v_win, past)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Keep the batch rows beam_idx [B'] (beam search)."""
        for layer in self.layers:
            if layer is None:
                continue
            for name, value in vars(layer).items():
                if isinstance(value, torch.Tensor):
                    setattr(layer, name, value.index_select(0, beam_idx.to(value.device)))


def decode_attention(q: torch.Tensor, gates: torch.Tensor, state: StepState, cfg: SparsityConfig,
                     scale: float | None = None, return_indices: bool = False):
    """NSA of C new queries against a layer's cache, exactly as the training path gives those positions.

    Args:
        q: [B, C, HQ, DK] the new queries, at sequence indices state.past .. state.past + C - 1.
        gates: [B, C, HQ, 3].
        state: the layer's StepState after the new tokens were appended.
        cfg: the layer's knobs.
        scale: softmax scale, default 1 / sqrt(DK).
        return_indices: also return idx [B, C, HKV, n], the selected blocks as nsa_attention returns them.
    Returns:
        o [B, C, HQ, DV] in q's dtype, or (o, idx).
    """
    B, C, HQ, DK = q.shape
    k, v, k_cmp, v_cmp = state.k, state.v, state.k_cmp, state.v_cmp
    S, HKV = k.shape[1], k.shape[2]
    G = HQ // HKV
    scale = DK ** -0.5 if scale is None else scale
    qg = q.view(B, C, HKV, G, DK)
    t = torch.arange(state.past, S, device=q.device)[:, None]

    Tc = k_cmp.shape[1]
    cmp_visible = (torch.arange(Tc, device=q.device) * cfg.cmp_stride + cfg.cmp_block)[None, :] <= t + 1
    o_cmp, p_cmp = masked_attention(qg, k_cmp, v_cmp, cmp_visible[None, :, None].expand(B, C, HKV, Tc), scale)

    # select_blocks reads a query's position from its row: place the new rows after `past` empty ones.
    scores = block_scores(p_cmp.detach(), S, cfg)
    padded = torch.cat([scores.new_zeros(B, state.past, HKV, scores.shape[-1]), scores], dim=1)
    idx = select_blocks(padded, cfg)[:, state.past:]
    selected = selection_mask(idx, cfg.num_slc(S)).repeat_interleave(cfg.slc_block, dim=-1)[..., :S]
    causal = torch.arange(S, device=q.device)[None, :] <= t
    o_slc = masked_attention(qg, k, v, selected & causal[None, :, None], scale)[0]

    W = state.k_win.shape[1]
    s = torch.arange(S - W, S, device=q.device)[None, :]
    band = (s <= t) & (s > t - cfg.window)
    o_win = masked_attention(qg, state.k_win, state.v_win, band[None, :, None].expand(B, C, HKV, W), scale)[0]

    branches = torch.stack([o_cmp, o_slc, o_win], dim=-1)
    g = gates.view(B, C, HKV, G, 1, 3)
    o = (branches.to(stat_dtype(q.dtype)) * g.to(stat_dtype(q.dtype))).sum(-1).reshape(B, C, HQ, -1).to(q.dtype)
    return (o, idx) if return_indices else o
