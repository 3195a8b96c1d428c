"""NativeSparseAttention: the drop-in replacement of self-attention (paper Section 3.3).

The module owns everything around the functional core nsa.nsa_attention: the query projection, independent
key/value projections for the three branches, phi (the learned compression of Eq. 7), the gate MLP, rotary
position embedding and the output projection. It needs only torch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .cache import decode_attention
from .config import SparsityConfig
from .functional import check_cu_seqlens, nsa_attention
from .reference import stat_dtype

# sigmoid(-ln 2) = 1/3: the three gates start summing to one, so the gated output starts as an average of three
# attention outputs and keeps the scale of a dense attention layer.
GATE_BIAS = -math.log(2.0)
BRANCHES = ("cmp", "slc", "win")


def rotary_cos_sin(position_ids: torch.Tensor, dim: int, base: float, dtype: torch.dtype = torch.float32):
    """cos, sin [B, N, 1, dim] for positions [B, N] (the rotate-half layout of Llama's RoPE).

    dtype is float32, or float64 for the float64 oracle. Computed from the positions on every call: there is no
    buffer to lose when a model is built on the meta device.
    """
    # base ** (-2i / dim), i < dim / 2, in one operation: a decode step replays every operation as a kernel.
    inv_freq = torch.logspace(0, -(dim - 2) / dim, dim // 2, base=base, device=position_ids.device, dtype=dtype)
    angles = position_ids[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)[:, :, None]
    return angles.cos(), angles.sin()


def step_rotary(position_ids: torch.Tensor, dim: int, base: float, dtype: torch.dtype, cache=None):
    """rotary_cos_sin, made once per step of an NSACache for every layer that passes the same position_ids (within
    the cache's step(), which a model's forward enters)."""
    make = lambda: rotary_cos_sin(position_ids, dim, base, dtype)  # noqa: E731
    if cache is None:
        return make()
    return cache.per_step(("rope", dim, base, dtype), make, anchor=position_ids, needs_uniform=False)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, N, H, D] by the phases cos, sin [B, N, 1, D]; arithmetic in cos's dtype, x's dtype out."""
    xs = x.to(cos.dtype)
    x1, x2 = xs.chunk(2, dim=-1)
    return torch.addcmul(xs * cos, torch.cat([-x2, x1], dim=-1), sin).to(x.dtype)


def apply_rotary_heads(xs: list[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor) -> list[torch.Tensor]:
    """apply_rotary of several [B, N, H_i, D] tensors that share the phases, as one rotation of their heads side by
    side (a replayed decode step launches each operation as a kernel: 7 instead of 6 per tensor). Returns views of
    one tensor, in the order given."""
    return list(apply_rotary(torch.cat(xs, dim=2), cos, sin).split([x.shape[2] for x in xs], dim=2))


def cmp_block_starts(seqlen: int, cfg: SparsityConfig, cu_seqlens: torch.Tensor | None, device) -> torch.Tensor:
    """[Tc] int64: the first token of each compression block (SPEC 1), packed per sequence with cu_seqlens.

    Blocks never straddle two packed sequences: each sequence's blocks start at its own offset.
    """
    if cu_seqlens is None:
        return torch.arange(cfg.num_cmp(seqlen), device=device) * cfg.cmp_stride
    bounds = cu_seqlens.tolist()
    return torch.cat([
        s0 + torch.arange(cfg.num_cmp(s1 - s0), device=device, dtype=torch.long) * cfg.cmp_stride
        for s0, s1 in zip(bounds[:-1], bounds[1:])
    ])


def default_position_ids(batch: int, seqlen: int, offset: int, cu_seqlens: torch.Tensor | None, device) -> torch.Tensor:
    """[B, T] positions: offset, offset + 1, ..., restarting at 0 at every packed sequence of cu_seqlens."""
    pos = torch.arange(offset, offset + seqlen, device=device)
    if cu_seqlens is not None:
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        pos = pos - torch.repeat_interleave(cu_seqlens[:-1].long(), lengths)
    return pos[None].expand(batch, seqlen)


def _init_heads(module: nn.Module, hidden_size, num_heads, num_kv_heads, head_dim, v_head_dim, rope_theta, bias,
                layer_idx, kv_sets: int) -> None:
    """The head geometry and the q, kv and o projections that sparse and dense attention share (kv_sets K/V pairs)."""
    num_kv_heads = num_kv_heads or num_heads
    head_dim = head_dim or hidden_size // num_heads
    v_head_dim = v_head_dim or head_dim
    if num_heads < 1 or num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a positive multiple of num_kv_heads ({num_kv_heads})")
    if head_dim < 2 or head_dim % 2:
        raise ValueError(f"head_dim must be even (RoPE rotates pairs of features), got {head_dim}")
    module.hidden_size = hidden_size
    module.num_heads, module.num_kv_heads = num_heads, num_kv_heads
    module.head_dim, module.v_head_dim = head_dim, v_head_dim
    module.rope_theta = rope_theta
    module.layer_idx = layer_idx
    module.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=bias)
    module.kv_proj = nn.Linear(hidden_size, kv_sets * num_kv_heads * (head_dim + v_head_dim), bias=bias)
    module.o_proj = nn.Linear(num_heads * v_head_dim, hidden_size, bias=bias)


def _check_call(module: nn.Module, hidden_states, position_ids, cache, cu_seqlens) -> torch.Tensor:
    """Validate a forward call of sparse or dense attention; return position_ids [B, T] (defaults filled in)."""
    if hidden_states.dim() != 3 or hidden_states.shape[-1] != module.hidden_size:
        raise ValueError(f"hidden_states must have shape [B, T, {module.hidden_size}], got {tuple(hidden_states.shape)}")
    B, T, _ = hidden_states.shape
    if cu_seqlens is not None:
        if cache is not None:
            raise ValueError("cu_seqlens cannot be combined with a cache: decode one batch of sequences at a time")
        check_cu_seqlens(cu_seqlens, B, T, hidden_states.device)
    if position_ids is None:
        past = 0 if cache is None else cache.get_seq_length(module.layer_idx)
        return default_position_ids(B, T, past, cu_seqlens, hidden_states.device)
    if tuple(position_ids.shape) != (B, T):
        raise ValueError(f"position_ids must have shape [B, T] = {(B, T)}, got {tuple(position_ids.shape)}")
    return position_ids


class Compressor(nn.Module):
    """phi of paper Eq. 7: a learned MLP that maps a block of l consecutive keys (or values) to one token.

    Each block gets a learned intra-block position encoding added before the MLP, so phi knows where in the
    block each key sits. The MLP reads the whole block flattened (l * D -> hidden -> D); its output is added to the
    mean of the encoded block, so that at initialisation a compressed token is already a fair summary of its block
    (mean pooling) and the MLP learns what to add. Shared by the KV heads of a layer. All blocks go through one
    gather and one batched matmul; there is no loop over blocks.

    Args:
        block: l, the number of tokens per block.
        dim: D, the per-head dimension of what is compressed.
        hidden: the width of the MLP (default D).
    """

    def __init__(self, block: int, dim: int, hidden: int | None = None):
        super().__init__()
        self.block = block
        self.pos = nn.Parameter(torch.zeros(block, dim))
        self.fc1 = nn.Linear(block * dim, hidden or dim)
        self.fc2 = nn.Linear(hidden or dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.pos, std=0.02)
        self.fc1.reset_parameters()
        self.fc2.reset_parameters()

    def forward(self, x: torch.Tensor, starts: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, H, D], starts [Nc] (first token of each block) -> [B, Nc, H, D]; without starts, x holds the
        blocks one after the other (T = Nc * l, as a decode step gathers them)."""
        B, _, H, D = x.shape
        if starts is None:
            blocks = x.unflatten(1, (-1, self.block))
        else:
            blocks = x[:, starts[:, None] + torch.arange(self.block, device=x.device)]
        blocks = blocks + self.pos[:, None].to(x.dtype)  # [B, Nc, l, H, D]
        flat = blocks.transpose(2, 3).reshape(B, -1, H, self.block * D)
        return blocks.mean(dim=2) + self.fc2(F.silu(self.fc1(flat)))


class Gate(nn.Module):
    """The branch gates of paper Eq. 5: an MLP on the input features and a sigmoid, three per query head.

    The output bias is a parameter of its own (not the Linear's) so that a model's weight initialisation, which
    zeroes Linear biases, cannot undo its start at GATE_BIAS.

    Args:
        hidden_size: the width of the input features.
        num_heads: HQ.
        hidden: the width of the MLP (default max(hidden_size // 8, 3 * HQ)).
    """

    def __init__(self, hidden_size: int, num_heads: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or max(hidden_size // 8, 3 * num_heads)
        self.fc1 = nn.Linear(hidden_size, hidden)
        self.fc2 = nn.Linear(hidden, 3 * num_heads, bias=False)
        self.bias = nn.Parameter(torch.zeros(3 * num_heads))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.fc1.reset_parameters()
        # Small but nonzero weights: the gates start near 1/3 each, yet fc1 receives gradient from the first step.
        nn.init.normal_(self.fc2.weight, std=0.02)
        nn.init.constant_(self.bias, GATE_BIAS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, hidden_size] -> gates [B, T, HQ, 3] (cmp, slc, win) in (0, 1)."""
        # The bias inside the second matmul (one kernel fewer in a replayed decode step).
        return torch.sigmoid(F.linear(F.silu(self.fc1(x)), self.fc2.weight, self.bias)).unflatten(-1, (-1, 3))


class NativeSparseAttention(nn.Module):
    """Native Sparse Attention (arXiv 2502.11089, Section 3.3) in place of causal self-attention.

    Per token: a query q = W_q x shared by the three branches; keys and values from independent projections for
    the compressed, selected and window branches (share_win_kv lets the window branch reuse the selected
    branch's, saving a projection and the window cache); gates from a small MLP and a sigmoid. The compressed
    branch's keys and values are compressed by phi (Compressor) over blocks of l tokens with stride d.

    Rotary position embedding (Llama's rotate-half, base rope_theta):
        - q and the selected and window keys are rotated at their token positions: those branches attend
          individual tokens.
        - phi reads the compressed branch's keys before rotation (it has its own intra-block position encoding),
          and the compressed key of block [i*d, i*d + l) is then rotated at the position of the block's last
          token, the newest one it summarizes. A query then scores a compressed token by its distance from the
          end of the block (never negative, since a query only sees complete blocks), keeping the score
          invariant to a shift of all positions, as in the other two branches. Values are never rotated.

    Args:
        hidden_size: width of the input and output features.
        num_heads: HQ, the number of query heads.
        num_kv_heads: HKV (default HQ); any divisor of HQ (GQA).
        head_dim: DK (default hidden_size // HQ), even (RoPE rotates pairs).
        v_head_dim: DV (default DK).
        sparsity: the knobs of SPEC.md (default: the paper's).
        share_win_kv: the window branch uses the selected branch's keys and values.
        rope_theta: the RoPE base.
        bias: biases in the q/k/v/o projections.
        layer_idx: this layer's slot in an NSACache.
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int | None = None, head_dim: int | None = None,
                 v_head_dim: int | None = None, sparsity: SparsityConfig | None = None, share_win_kv: bool = False,
                 rope_theta: float = 10000.0, bias: bool = False, layer_idx: int = 0):
        super().__init__()
        if sparsity is not None and not isinstance(sparsity, SparsityConfig):
            raise TypeError(f"sparsity must be a SparsityConfig, got {type(sparsity).__name__}")
        self.sparsity = sparsity or SparsityConfig()
        self.share_win_kv = share_win_kv
        self.kv_branches = BRANCHES[:2] if share_win_kv else BRANCHES
        # One matmul for the keys and values of all branches: [k_cmp, v_cmp, k_slc, v_slc(, k_win, v_win)].
        _init_heads(self, hidden_size, num_heads, num_kv_heads, head_dim, v_head_dim, rope_theta, bias, layer_idx,
                    len(self.kv_branches))
        self.k_phi = Compressor(self.sparsity.cmp_block, self.head_dim)
        self.v_phi = Compressor(self.sparsity.cmp_block, self.v_head_dim)
        self.gate = Gate(hidden_size, num_heads)

    def rotary(self, position_ids: torch.Tensor, dtype: torch.dtype, cache=None):
        return step_rotary(position_ids, self.head_dim, self.rope_theta, stat_dtype(dtype), cache)

    def project(self, hidden_states: torch.Tensor, position_ids: torch.Tensor, cache=None,
                rotate: bool = True) -> dict[str, torch.Tensor]:
        """The per-token inputs of the attention core.

        Args:
            hidden_states: [B, T, hidden_size].
            position_ids: [B, T].
            cache: an NSACache whose step() shares the RoPE phases between layers (optional).
            rotate: False leaves q, k_slc and k_win unrotated (rotate() does it).
        Returns:
            q [B, T, HQ, DK] (rotated); k_<branch> [B, T, HKV, DK] and v_<branch> [B, T, HKV, DV] for the
            branches cmp, slc (and win unless shared), k_slc and k_win rotated, k_cmp not (phi reads it raw);
            gates [B, T, HQ, 3]; all in q's dtype (under autocast the sigmoid of the gates runs in float32).
        """
        B, T, _ = hidden_states.shape
        H, DK, DV = self.num_kv_heads, self.head_dim, self.v_head_dim
        kv = self.kv_proj(hidden_states).split([H * DK, H * DV] * len(self.kv_branches), dim=-1)
        out = {"q": self.q_proj(hidden_states).view(B, T, self.num_heads, DK)}
        for i, branch in enumerate(self.kv_branches):
            out[f"k_{branch}"] = kv[2 * i].view(B, T, H, DK)
            out[f"v_{branch}"] = kv[2 * i + 1].view(B, T, H, DV)
        out["gates"] = self.gate(hidden_states).to(out["q"].dtype)
        if rotate:
            self.rotate(out, *self.rotary(position_ids, hidden_states.dtype, cache))
        return out

    def rotate(self, x: dict[str, torch.Tensor], cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Rotate project()'s q, k_slc (and k_win) in x at the phases cos, sin, in place of the unrotated ones."""
        rotated = ["q"] + [f"k_{branch}" for branch in self.kv_branches if branch != "cmp"]
        x.update(zip(rotated, apply_rotary_heads([x[name] for name in rotated], cos, sin)))

    def compress(self, k: torch.Tensor, v: torch.Tensor, last_positions: torch.Tensor,
                 starts: torch.Tensor | None = None, cache=None):
        """phi over the blocks starting at `starts` [Nc] of k [B, T, HKV, DK], v [B, T, HKV, DV] (unrotated), or
        without starts over the consecutive blocks of l tokens that k and v hold (T = Nc * l).

        Returns k_cmp [B, Nc, HKV, DK], rotated at last_positions [B, Nc] (the position of each block's last
        token), and v_cmp [B, Nc, HKV, DV]. cache: an NSACache whose step() shares the phases between layers.
        """
        cos, sin = self.rotary(last_positions, k.dtype, cache)
        return apply_rotary(self.k_phi(k, starts), cos, sin), self.v_phi(v, starts)

    def forward(self, hidden_states: torch.Tensor, position_ids: torch.Tensor | None = None, cache=None,
                cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """Causal NSA self-attention.

        Args:
            hidden_states: [B, T, hidden_size].
            position_ids: [B, T] token positions for RoPE (default: 0..T-1 after what the cache holds, restarting
                at every sequence of cu_seqlens).
            cache: an NSACache; this layer's slot (layer_idx) is extended by the T tokens, and their outputs are
                those the training path gives them after the cached prefix (SPEC.md, Decoding).
            cu_seqlens: int32 [N+1] offsets of sequences packed along T (B must be 1), each attended as if alone.
        Returns:
            [B, T, hidden_size].
        """
        B, T, _ = hidden_states.shape
        position_ids = _check_call(self, hidden_states, position_ids, cache, cu_seqlens)
        past = 0 if cache is None else cache.get_seq_length(self.layer_idx)
        x = self.project(hidden_states, position_ids, cache, rotate=False)
        cos, sin = self.rotary(position_ids, hidden_states.dtype, cache)
        if cache is not None:
            # A plain decode step: RoPE and every append to the cache in one kernel.
            step = cache.rotate_and_update(self.layer_idx, x["q"], cos, sin, x["k_slc"], x["v_slc"],
                                           k_win=x.get("k_win"), v_win=x.get("v_win"), k_cmp_raw=x["k_cmp"],
                                           v_cmp_raw=x["v_cmp"], sparsity=self.sparsity)
            if step is not None:
                return self.o_proj(decode_attention(step[0], x["gates"], step[1], self.sparsity).reshape(B, T, -1))
        self.rotate(x, cos, sin)
        k_win, v_win = (x["k_slc"], x["v_slc"]) if self.share_win_kv else (x["k_win"], x["v_win"])
        if cache is None:
            starts = cmp_block_starts(T, self.sparsity, cu_seqlens, hidden_states.device)
            last = position_ids[:, starts + self.sparsity.cmp_block - 1]
            k_cmp, v_cmp = self.compress(x["k_cmp"], x["v_cmp"], last, starts)
            o = nsa_attention(x["q"], x["k_slc"], x["v_slc"], k_cmp, v_cmp, x["gates"], k_win=k_win, v_win=v_win,
                              config=self.sparsity, cu_seqlens=cu_seqlens)
        else:
            state = cache.update(self.layer_idx, x["k_slc"], x["v_slc"], k_win=None if self.share_win_kv else k_win,
                                 v_win=None if self.share_win_kv else v_win, k_cmp_raw=x["k_cmp"],
                                 v_cmp_raw=x["v_cmp"], position_ids=position_ids,
                                 compress=lambda k, v, last: self.compress(k, v, last, cache=cache),
                                 sparsity=self.sparsity)
            if past == 0:
                # A prefill is the training path over the prompt: the fast kernels serve it.
                tc = self.sparsity.num_cmp(T)
                o = nsa_attention(x["q"], x["k_slc"], x["v_slc"], state.k_cmp_new[:, :tc], state.v_cmp_new[:, :tc],
                                  x["gates"], k_win=k_win, v_win=v_win, config=self.sparsity)
            else:
                o = decode_attention(x["q"], x["gates"], state, self.sparsity)
        return self.o_proj(o.reshape(B, T, -1))


class DenseAttention(nn.Module):
    """Full causal attention (SDPA) with NativeSparseAttention's query, key/value, RoPE and output projections.

    The dense baseline on equal terms: its one K/V pair plays the selected branch's part (same shapes, same
    rotation), and it reads and fills an NSACache the same way (keys and values only); on the Triton backend (a GPU)
    new tokens against a filled cache go through nsa.ops.decode.dense_decode, the split-key kernel built like NSA's
    decode kernels, so that a captured step reads only each sequence's keys (with gradients to compute, SDPA).
    Arguments as in NativeSparseAttention, without the sparsity ones.
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int | None = None, head_dim: int | None = None,
                 v_head_dim: int | None = None, rope_theta: float = 10000.0, bias: bool = False, layer_idx: int = 0):
        super().__init__()
        _init_heads(self, hidden_size, num_heads, num_kv_heads, head_dim, v_head_dim, rope_theta, bias, layer_idx, 1)

    def forward(self, hidden_states: torch.Tensor, position_ids: torch.Tensor | None = None, cache=None,
                cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """[B, T, hidden_size] -> [B, T, hidden_size]; arguments as in NativeSparseAttention.forward."""
        B, T, _ = hidden_states.shape
        position_ids = _check_call(self, hidden_states, position_ids, cache, cu_seqlens)
        H, DK, DV = self.num_kv_heads, self.head_dim, self.v_head_dim
        cos, sin = step_rotary(position_ids, DK, self.rope_theta, stat_dtype(hidden_states.dtype), cache)
        k, v = self.kv_proj(hidden_states).split([H * DK, H * DV], dim=-1)
        q, k, v = self.q_proj(hidden_states).view(B, T, self.num_heads, DK), k.view(B, T, H, DK), v.view(B, T, H, DV)
        past, allowed = 0, None
        if cache is not None:
            # A plain decode step: RoPE and the append in one kernel (NSACache.rotate_and_update).
            step = cache.rotate_and_update(self.layer_idx, q, cos, sin, k, v)
            if step is not None:
                return self.o_proj(self._decode(*step).reshape(B, T, -1))
        q, k = apply_rotary_heads([q, k], cos, sin)
        if cache is not None:
            state = cache.update(self.layer_idx, k, v)
            if state.past_max and state.kernel_path(q):
                return self.o_proj(self._decode(q, state).reshape(B, T, -1))
            if cache.cuda_graph and state.past_max:
                # A decode step of fixed shape (a CUDA graph replays it at every length): all slots, key s visible
                # to query t of sequence b iff s <= past[b] + t, from the device lengths.
                k, v = state.contiguous_kv(cache.capacity)

                def visible():
                    t = state.past.long()[:, None] + torch.arange(T, device=q.device)
                    return (torch.arange(k.shape[1], device=q.device) <= t[:, :, None])[:, None]

                allowed = cache.per_step(("dense_mask", state.past_max, B, T, k.shape[1]), visible)
            else:
                past = state.past_max
                k, v = state.contiguous_kv(past + T)
        if past or cu_seqlens is not None:
            # Key s is visible to query t (sequence index past + t) iff s <= past + t, and with cu_seqlens only
            # within the query's own sequence. Without either, is_causal keeps SDPA on its fused kernels.
            s, t = torch.arange(k.shape[1], device=q.device), torch.arange(past, past + T, device=q.device)
            allowed = s[None, :] <= t[:, None]
            if cu_seqlens is not None:
                seq = torch.repeat_interleave(torch.arange(cu_seqlens.numel() - 1, device=q.device),
                                              (cu_seqlens[1:] - cu_seqlens[:-1]).long())
                allowed = allowed & (seq[None, :] == seq[:, None])
        G = self.num_heads // H
        if allowed is not None and T == 1 and G > 1:
            # One new token: the G query heads of a KV head are G query rows of it, so SDPA's masked kernels read
            # each K/V once (with enable_gqa a masked call may take the math path, which repeats K/V G times).
            o = F.scaled_dot_product_attention(q.view(B, H, G, DK), k.transpose(1, 2), v.transpose(1, 2),
                                               attn_mask=allowed)
            return self.o_proj(o.reshape(B, T, -1))
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=allowed,
                                           is_causal=allowed is None, enable_gqa=G > 1)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1))

    def _decode(self, q: torch.Tensor, state) -> torch.Tensor:
        """New tokens against a filled cache: the split-key decode kernel over each sequence's own keys (lengths on
        the device, shapes fixed by the capacity, so a CUDA graph can capture the step)."""
        from .ops.decode import dense_decode

        return dense_decode(q, state.layer.k, state.layer.v, state.past, block_table=state.block_table)
