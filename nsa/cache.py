"""NSACache: what decoding keeps per layer (SPEC.md, Decoding), and the attention of new tokens against it.

Per layer, for B sequences of possibly different lengths (seqlens [B] int32, on the device):
    - k, v: the selected branch's keys (rotated) and values of every token, in page pools [num_pages, P, HKV, DK/DV]
      addressed through block_table [B, max_pages] (flash_attn_with_kvcache's convention). A contiguous cache is
      the case of one page per sequence (P = capacity, sequence b in page b, addressed without a table) and grows
      by doubling; a paged cache has the pages and the table of its owner (a serving engine) and a fixed capacity.
    - k_cmp, v_cmp [B, capacity // d + 1, HKV, DK/DV]: the compressed tokens, grown by phi whenever a block
      completes (one every d tokens once l are available); the last row is scratch for blocks that did not.
    - k_tail, v_tail [B, l, HKV, DK/DV]: the last l raw (unrotated) keys and values of the compressed branch, as a
      ring (token s at slot s % l): all a block still to complete needs (its last token, whose position rotates
      its compressed key, is always among the new tokens of the step that completes it).
    - k_win, v_win [B, w + RING_SLACK - 1, HKV, DK/DV]: the window branch's last keys and values as a ring (absent
      when the window branch shares the selected branch's, which k and v already hold).

Memory per token and per layer (elements, times the dtype's bytes; the rings are a constant per sequence):
HKV * (DK + DV) * (1 + 1/d) for the raw and compressed K/V, i.e. 1.0625 x a dense KV cache at the paper's d = 16
(paper shapes, bf16: 4 * 320 * 2 * 1.0625 = 2720 bytes); plus per sequence HKV * (DK + DV) * (l + w + 15) for the
tail and the window ring (when the window has its own K/V).

Every update writes with device-side indices (no host synchronisation) and in place (after a layer's first update
no step moves any of its tensors, unless a contiguous cache has to grow), so that a decode step with a paged or
pre-sized cache can be captured in a CUDA graph and replayed. A dense attention layer uses the same object and
fills k, v. With cuda_graph=True the model replays its decode steps from a CUDA graph (NSAModel, DecodeGraph): the
cache then never grows, and dense layers read it at a fixed shape (every slot, masked by the device lengths).
Within NSACache.step() (a model's forward over its layers) the index arithmetic on the lengths that every layer's
update repeats is done once and shared by the layers. On the Triton backend a plain decode step (no block of phi
completes) rotates its queries and keys and makes all its appends in one kernel (rotate_and_update,
nsa.ops.rope_append).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .config import SparsityConfig
from .reference import block_scores, masked_attention, selection_mask, select_blocks, stat_dtype

# New tokens per step that the window ring serves directly (speculative decoding); longer chunks get a ring of
# their own for the step.
RING_SLACK = 16


@dataclass
class LayerCache:
    """One layer's slot of an NSACache (shapes in the module docstring)."""

    k: torch.Tensor
    v: torch.Tensor
    seqlens: torch.Tensor
    k_cmp: torch.Tensor | None = None
    v_cmp: torch.Tensor | None = None
    k_tail: torch.Tensor | None = None
    v_tail: torch.Tensor | None = None
    k_win: torch.Tensor | None = None
    v_win: torch.Tensor | None = None


def kernels_serve(q: torch.Tensor, *more: torch.Tensor | None, backend: str | None = None) -> bool:
    """Whether the Triton kernels serve a step of queries q (and more inputs): the Triton backend, not float64,
    and nothing to differentiate (the kernels have no backward; with gradients the reference path runs)."""
    from .functional import resolve_backend

    return (resolve_backend(backend, q.device) == "triton" and q.dtype != torch.float64
            and not (torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (q, *more))))


@dataclass
class StepState:
    """What one layer attends at one step: its cache after the C new tokens were written.

    past [B] int32 (device) and past_max (host): the tokens before the step; end [B] int32: the tokens after it;
    k_win, v_win: the window ring to read (None: the raw k, v); k_cmp_new, v_cmp_new [B, ceil(C/d), HKV, D]: the
    compressed tokens phi made this step, in block order (the first Tc(C) of them are a prefill's when past is 0;
    None when the step ran no phi, NSACache.compresses()).
    """

    layer: LayerCache
    block_table: torch.Tensor | None  # a paged cache's; None for a contiguous one (sequence b is page b)
    past: torch.Tensor
    end: torch.Tensor
    past_max: int
    k_win: torch.Tensor | None
    v_win: torch.Tensor | None
    k_cmp_new: torch.Tensor | None = None
    v_cmp_new: torch.Tensor | None = None

    def kernel_path(self, q: torch.Tensor, *more: torch.Tensor, backend: str | None = None) -> bool:
        """Whether a step of queries q (and more inputs) runs the decode kernels (kernels_serve)."""
        return kernels_serve(q, *more, self.layer.k, self.layer.v, backend=backend)

    def contiguous_kv(self, length: int):
        """k, v [B, length, HKV, D] of a contiguous cache (the dense layer's SDPA reads them)."""
        if self.block_table is not None:
            raise NotImplementedError("dense attention reads a contiguous cache; a paged one is not supported")
        return self.layer.k[:, :length], self.layer.v[:, :length]


def _per_token(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """mask [B, K] viewed to broadcast over the trailing dims of like [B, K, ...]."""
    return mask.view(*mask.shape, *([1] * (like.dim() - 2)))


class RingIndex(NamedTuple):
    """Where the entries at absolute positions pos [B, K] lie, for a sequence whose tokens before past [B] are in a
    ring of R slots (token s at slot s % R) and whose tokens from past on are C new ones (see ring_index)."""

    batch: torch.Tensor  # [B, 1]
    at_new: torch.Tensor  # [B, K]: the index among the new tokens (clamped)
    at_ring: torch.Tensor  # [B, K]: the ring slot
    keep: torch.Tensor  # [B, K]: the entry comes from the new tokens


def ring_index(past: torch.Tensor, pos: torch.Tensor, R: int, C: int) -> RingIndex:
    """The RingIndex of positions pos [B, K]; positions outside both the ring and the new tokens get an arbitrary
    entry (callers mask them)."""
    rel = pos - past[:, None].long()
    return RingIndex(torch.arange(pos.shape[0], device=pos.device)[:, None], rel.clamp(0, C - 1),
                     pos.clamp_min(0) % R, rel >= 0)


def gather_positions(pairs, index: RingIndex, in_place: bool = False) -> list[torch.Tensor]:
    """For each (ring, new) of `pairs` (rings [B, R, ...], news [B, C, ...]), the entries that `index` points at.
    in_place (index of the ring's next contents, [B, R]) writes the result into the ring itself, whose storage
    then never changes, as a replayed CUDA graph needs."""
    batch, at_new, at_ring, keep = index
    out = []
    for ring, new in pairs:
        # ring[batch, at_ring] is a copy, so writing into the ring afterwards reads nothing it overwrote.
        picked = (_per_token(keep, new), new[batch, at_new], ring[batch, at_ring])
        if not in_place:
            out.append(torch.where(*picked))
        elif torch.is_grad_enabled() and (new.requires_grad or ring.requires_grad):
            out.append(ring.copy_(torch.where(*picked)))  # out= records no gradient; copy_ does
        else:
            out.append(torch.where(*picked, out=ring))
    return out


class RingAppend(NamedTuple):
    """How rings of R slots take in C new tokens at positions past .. end - 1 (see append_index): with more new
    tokens than slots, `gather` (each slot's next content); else the slots [B, C] the new tokens are scattered to,
    and which of them are taken (None: all)."""

    gather: RingIndex | None
    batch: torch.Tensor | None = None
    slot: torch.Tensor | None = None
    taken: torch.Tensor | None = None


def append_index(past: torch.Tensor, end: torch.Tensor, R: int, C: int, ragged: bool) -> RingAppend:
    """The RingAppend of C new tokens; ragged: end may fall short of past + C (a sequence appending fewer tokens),
    and the rest are not taken in."""
    if C > R:
        return RingAppend(ring_index(past, ring_positions(end, R), R, C))
    pos = past[:, None].long() + torch.arange(C, device=past.device)
    return RingAppend(None, torch.arange(past.shape[0], device=past.device)[:, None], pos % R,
                      pos < end[:, None] if ragged else None)


def append_to_rings(pairs, index: RingAppend) -> None:
    """For each (ring, new) of `pairs` (rings [B, R, ...], news [B, C, ...]), in place: the ring takes in the new
    tokens as `index` says."""
    if index.gather is not None:
        gather_positions(pairs, index.gather, in_place=True)
        return
    for ring, new in pairs:
        new = new.to(ring.dtype)
        if index.taken is not None:
            new = torch.where(_per_token(index.taken, new), new, ring[index.batch, index.slot])
        ring[index.batch, index.slot] = new


def ring_positions(end: torch.Tensor, size: int) -> torch.Tensor:
    """[B, size]: the position each slot of a ring of `size` holds once a sequence has end [B] tokens (the last
    `size` of them; negative where the sequence is shorter)."""
    r = torch.arange(size, device=end.device)
    last = end.long()[:, None] - 1
    return last - (last - r) % size


def _compress_index(past: torch.Tensor, end: torch.Tensor, C: int, cfg: SparsityConfig, rows_per_seq: int,
                    ragged: bool):
    """phi's index arithmetic for C new tokens: the rows of k_cmp [B * rows_per_seq] its blocks go to (a block not
    complete yet to the scratch row, so that each real row is written once, with no host check), the RingIndex of
    the blocks' tokens, one block after the other (in the tail ring of l slots, or new), the index among the new
    tokens of each block's last token [B, nb] (a complete block's is new; an incomplete one's is clamped, and its
    row is scratch) and the tail ring's RingAppend."""
    l, d = cfg.cmp_block, cfg.cmp_stride
    B, nb = past.shape[0], (C - 1) // d + 1
    # Block i ends at i*d + l - 1: the first one ending at or after `past`, and the next nb - 1.
    first = ((past.long() - l + 1).clamp_min(0) + d - 1) // d
    i = first[:, None] + torch.arange(nb, device=past.device)
    done = i * d + l <= end[:, None]
    token = (i * d)[:, :, None] + torch.arange(l, device=past.device)
    target = torch.where(done, i, rows_per_seq - 1) + torch.arange(B, device=past.device)[:, None] * rows_per_seq
    last_at = (i * d + l - 1 - past[:, None].long()).clamp(0, C - 1)
    return (target.flatten(), ring_index(past, token.flatten(1), l, C), last_at,
            append_index(past, end, l, C, ragged))


class NSACache:
    """The decoding cache of a stack of NativeSparseAttention (or dense) layers, one slot per layer_idx.

    Args:
        capacity: tokens per sequence to allocate up front (a contiguous cache then never reallocates, and a decode
            step can be captured in a CUDA graph); default: grow by doubling.
        block_table: int32 [B, max_pages] (device): a paged cache; page_size and num_pages are then required.
        page_size: P, tokens per page (a multiple of every layer's cmp_stride).
        num_pages: pages in each layer's pools.
        cuda_graph: NSAForCausalLM / NSAModel capture their one-token decode step on this cache in a CUDA graph
            and replay it (one launch per step instead of hundreds of kernel launches from Python); needs a
            capacity or a paged cache (a captured step cannot grow it). On the CPU the steps run eagerly, at the
            same fixed shapes.
    """

    is_compileable = False

    def __init__(self, capacity: int | None = None, *, block_table: torch.Tensor | None = None,
                 page_size: int | None = None, num_pages: int | None = None, cuda_graph: bool = False):
        if cuda_graph and capacity is None and block_table is None:
            raise ValueError("cuda_graph needs a capacity or a paged cache: a captured decode step cannot grow it")
        if block_table is not None:
            if page_size is None or num_pages is None:
                raise ValueError("a paged cache (block_table) needs page_size and num_pages")
            if block_table.dtype != torch.int32 or block_table.dim() != 2:
                raise ValueError(f"block_table must be int32 [B, max_pages], got {block_table.dtype} "
                                 f"{tuple(block_table.shape)}")
            capacity = block_table.shape[1] * page_size
        self.capacity = capacity
        self.block_table = block_table
        self.page_size = page_size
        self.num_pages = num_pages
        self.cuda_graph = cuda_graph
        # The model's captured decode steps (nsa.models.DecodeGraph), bound to this cache's tensors, by the batch's
        # shape and whether the step runs phi (compresses()).
        self.graphs: dict = {}
        self.layers: list[LayerCache | None] = []
        self.lengths: list[int] = []
        # Whether every update so far appended the same number of tokens to every sequence (no `lengths`), and
        # the index tensors the layers share within step().
        self.uniform = True
        self._memo: dict | None = None

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def is_linear(self) -> list[bool]:
        """generate() asks it of a cache the caller passes: no layer keeps a state of fixed size (linear attention),
        so a cache that already holds tokens makes generate() feed only the tokens after them."""
        return [False] * len(self.layers)

    @property
    def paged(self) -> bool:
        return self.page_size is not None

    def compresses(self, past: int, C: int, cfg: SparsityConfig) -> bool:
        """Whether a step of C new tokens after `past` (a layer's host length) runs phi: when a block of cfg ends
        among the new tokens (block i ends at token i*d + l - 1), and always when the host lengths do not stand for
        every sequence's (an update passed `lengths`) or on a first fill. The other steps (d - 1 of every d one-token
        steps) only move the tail ring on."""
        if not self.uniform or past == 0:
            return True
        l, d = cfg.cmp_block, cfg.cmp_stride
        last = past + C - 1
        return last >= l - 1 and (last - l + 1) // d * d + l - 1 >= past

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """The tokens the layer has seen (the longest sequence's; 0 for a layer not yet filled)."""
        return self.lengths[layer_idx] if layer_idx < len(self.lengths) else 0

    def seqlens(self, layer_idx: int = 0) -> torch.Tensor | None:
        """int32 [B] (device): each sequence's length in the layer, or None before its first update (the cache's
        own tensor, which every later update overwrites in place)."""
        layer = self.layers[layer_idx] if layer_idx < len(self.layers) else None
        return None if layer is None else layer.seqlens

    @contextlib.contextmanager
    def step(self):
        """One forward of a stack of layers over the same new tokens (NSAModel runs its layers in it): the index
        arithmetic on the lengths that each layer's update repeats (the pool rows of the new tokens, phi's blocks,
        the rings' slots, and the layers' RoPE phases) is done by the first layer and reused by the others. Sound
        while the cache is uniform (no update passed `lengths`): every device length of a layer is then its host
        length, so layers of equal host length get equal indices."""
        previous, self._memo = self._memo, {}
        try:
            yield self
        finally:
            self._memo = previous

    def per_step(self, key, make, anchor: torch.Tensor | None = None, needs_uniform: bool = True):
        """make(), or within step() what the first caller with this key made. A value computed from a layer's
        lengths (its key holds the host length) needs a uniform cache; one computed from a tensor (anchor, such as
        the step's position_ids) is shared only among calls that pass that very tensor."""
        if self._memo is None or (needs_uniform and not self.uniform):
            return make()
        if anchor is not None:
            key = (*key, id(anchor))
        hit = self._memo.get(key)
        if hit is None or hit[0] is not anchor:
            hit = self._memo[key] = (anchor, make())
        return hit[1]

    def check_room(self, need: int) -> None:
        """Refuse `need` tokens per sequence beyond the capacity of a cache that cannot grow (paged, or made for
        CUDA graphs)."""
        if self.capacity is not None and need > self.capacity and (self.paged or self.cuda_graph):
            kind = "paged cache" if self.paged else "cache for CUDA graphs"
            raise ValueError(f"the {kind} holds {self.capacity} tokens per sequence; {need} needed")

    def _allocate(self, k, v, k_win, k_cmp_raw, v_cmp_raw, sparsity, need):
        B, _, HKV, DK = k.shape
        DV = v.shape[-1]
        kw = dict(dtype=k.dtype, device=k.device)
        if self.paged:
            pool = (self.num_pages, self.page_size)
        else:
            self.capacity = max(self.capacity or 0, need)
            pool = (B, self.capacity)
        layer = LayerCache(torch.zeros(*pool, HKV, DK, **kw), torch.zeros(*pool, HKV, DV, **kw),
                           torch.zeros(B, dtype=torch.int32, device=k.device))
        if k_cmp_raw is not None:
            l, d = sparsity.cmp_block, sparsity.cmp_stride
            rows = self.capacity // d + 1
            layer.k_cmp = torch.zeros(B, rows, HKV, DK, **kw)
            layer.v_cmp = torch.zeros(B, rows, HKV, DV, **kw)
            layer.k_tail = torch.zeros(B, l, HKV, DK, dtype=k_cmp_raw.dtype, device=k.device)
            layer.v_tail = torch.zeros(B, l, HKV, DV, dtype=v_cmp_raw.dtype, device=k.device)
            if k_win is not None:
                ring = sparsity.window + RING_SLACK - 1
                layer.k_win = torch.zeros(B, ring, HKV, DK, **kw)
                layer.v_win = torch.zeros(B, ring, HKV, DV, **kw)
        return layer

    def _grow(self, layer: LayerCache, need: int, sparsity) -> None:
        """Double a contiguous cache's capacity until `need` tokens fit, and bring the layer to it (outside any
        captured graph; the other layers follow at their own next update)."""
        capacity = self.capacity
        while capacity < need:
            capacity *= 2
        grow = lambda x, n: torch.cat([x, x.new_zeros(x.shape[0], n - x.shape[1], *x.shape[2:])], dim=1)  # noqa: E731
        layer.k, layer.v = grow(layer.k, capacity), grow(layer.v, capacity)
        if layer.k_cmp is not None:
            rows = capacity // sparsity.cmp_stride + 1
            # The scratch row moves to the end; its content is never read.
            layer.k_cmp, layer.v_cmp = grow(layer.k_cmp, rows), grow(layer.v_cmp, rows)
        self.capacity = capacity

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, *, k_win=None, v_win=None, k_cmp_raw=None,
               v_cmp_raw=None, position_ids=None, compress=None, sparsity: SparsityConfig | None = None,
               lengths: torch.Tensor | None = None) -> StepState:
        """Append C new tokens to every sequence of layer `layer_idx` and return what the layer attends.

        Args:
            k, v: [B, C, HKV, DK/DV] the selected branch's new keys (rotated) and values.
            k_win, v_win: the window branch's, when it has its own (else k, v serve the window).
            k_cmp_raw, v_cmp_raw: [B, C, HKV, DK/DV] the compressed branch's new keys and values before phi; None
                for a dense layer (then no compressed tokens are kept).
            position_ids: [B, C] positions of the new tokens (phi rotates a compressed key at its block's last).
            compress: (k, v, last_positions) -> (k_cmp, v_cmp), the module's phi (NativeSparseAttention.compress)
                over k, v [B, Nc * l, HKV, D] holding Nc blocks one after the other, whose last tokens are at
                last_positions [B, Nc].
            sparsity: the layer's knobs.
            lengths: int32 [B] (device), how many of the C tokens each sequence really appends (default all C):
                sequences of different lengths in one batch; the outputs of the tokens past a sequence's count are
                undefined.
        """
        while len(self.layers) <= layer_idx:
            self.layers.append(None)
            self.lengths.append(0)
        B, C, HKV, _ = k.shape
        layer = self.layers[layer_idx]
        if layer is not None and (layer.seqlens.shape[0], layer.k.shape[2:]) != (B, k.shape[2:]):
            raise ValueError(f"k must continue the cached batch of {layer.seqlens.shape[0]} sequences of "
                             f"[HKV, DK] = {tuple(layer.k.shape[2:])}, got {tuple(k.shape)}")
        if k_cmp_raw is not None and (compress is None or sparsity is None or position_ids is None):
            raise ValueError("compressed keys need position_ids, compress (phi) and sparsity")
        need = self.lengths[layer_idx] + C
        self.check_room(need)
        if layer is None:
            # A growing cache starts with some room; one for CUDA graphs holds exactly its capacity.
            room = need if self.cuda_graph else max(need, 2 * C, 256)
            layer = self._allocate(k, v, k_win, k_cmp_raw, v_cmp_raw, sparsity, room)
            self.layers[layer_idx] = layer
        elif not self.paged and need > layer.k.shape[1]:
            # An earlier layer may have grown the capacity already this step.
            self._grow(layer, need, sparsity)
        if lengths is not None:
            self.uniform = False
        key = (self.lengths[layer_idx], B, C)
        # seqlens is updated in place at the end (its storage, like every cache tensor's, stays put between steps).
        past, end, table, rows = self._step_rows(layer, key, lengths)
        layer.k.view(-1, *k.shape[2:]).index_copy_(0, rows, k.flatten(0, 1).to(layer.k.dtype))
        layer.v.view(-1, *v.shape[2:]).index_copy_(0, rows, v.flatten(0, 1).to(layer.v.dtype))
        state = StepState(layer, table, past, end, self.lengths[layer_idx], None, None)
        if k_cmp_raw is not None:
            ragged = lengths is not None
            self._compress(layer, state, key, ragged, k_cmp_raw, v_cmp_raw, position_ids, compress, sparsity)
            if k_win is not None:
                state.k_win, state.v_win = self._window(layer, state, key, ragged, k_win, v_win, sparsity)
        layer.seqlens.copy_(end)
        self.lengths[layer_idx] = need
        return state

    def rotate_and_update(self, layer_idx: int, q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          k: torch.Tensor, v: torch.Tensor, *, k_win=None, v_win=None, k_cmp_raw=None,
                          v_cmp_raw=None, sparsity: SparsityConfig | None = None):
        """update() of a decode step fused with RoPE: one kernel (nsa.ops.rope_append) rotates q, k (and k_win) at
        the phases cos, sin [B, C, 1, DK] and appends every new token, where the decode kernels serve the step and
        it is a plain one: the layer already holds tokens and room for C more, every sequence appends all C (no
        `lengths` so far), C fits the rings, and no block of phi completes (compresses()). Arguments as update()'s,
        with q [B, C, HQ, DK] and k, k_win unrotated.

        Returns (q rotated, the StepState), or None where the step is not such a one: the caller then rotates and
        calls update(), which gives the same result.
        """
        layer = self.layers[layer_idx] if layer_idx < len(self.layers) else None
        B, C = k.shape[:2]
        length = self.get_seq_length(layer_idx)
        if (layer is None or not length or not self.uniform or C > RING_SLACK
                or (layer.k_tail is not None and C > layer.k_tail.shape[1])
                or (k_cmp_raw is not None and self.compresses(length, C, sparsity))
                or (k_win is not None) != (layer.k_win is not None)
                or (layer.seqlens.shape[0], layer.k.shape[2:]) != (B, k.shape[2:])
                or (not self.paged and length + C > layer.k.shape[1])
                or cos.dtype != torch.float32 or not kernels_serve(q, k, v, k_win, v_win, k_cmp_raw, v_cmp_raw)):
            return None
        from .ops.rope_append import rope_append

        self.check_room(length + C)
        past, end, table, _ = self._step_rows(layer, (length, B, C), None)
        q = rope_append(q, cos, sin, k, v, layer.k, layer.v, table, past, layer.seqlens,
                        k_win=k_win, v_win=v_win, win_k=layer.k_win, win_v=layer.v_win, k_tail=k_cmp_raw,
                        v_tail=v_cmp_raw, tail_k=layer.k_tail, tail_v=layer.v_tail)
        self.lengths[layer_idx] = length + C
        return q, StepState(layer, table, past, end, length, layer.k_win, layer.v_win)

    def _step_rows(self, layer: LayerCache, key: tuple, lengths: torch.Tensor | None):
        """_new_rows of the step `key` (host length, B, C), made once per step() and shared by its layers."""
        return self.per_step(("update", *key, layer.k.shape[1]), lambda: self._new_rows(layer, key[2], lengths))

    def _new_rows(self, layer: LayerCache, C: int, lengths: torch.Tensor | None):
        """past, end [B] int32 (the lengths before and after the step), the block table [B, max_pages] (None for a
        contiguous cache) and the pool rows [B * C] of the C new tokens."""
        P = layer.k.shape[1]
        past = layer.seqlens.clone()
        end = past + (C if lengths is None else lengths.to(torch.int32))
        pos = past[:, None].long() + torch.arange(C, device=past.device)
        if not self.paged:
            return past, end, None, (torch.arange(pos.shape[0], device=pos.device)[:, None] * P + pos).flatten()
        return past, end, self.block_table, (self.block_table.long().gather(1, pos // P) * P + pos % P).flatten()

    def _compress(self, layer, state, key, ragged, k_raw, v_raw, position_ids, compress, cfg: SparsityConfig):
        """phi over the blocks that end among the new tokens (if any: compresses()); the tail ring moves on."""
        rows_per_seq = layer.k_cmp.shape[1]
        target, blocks_at, last_at, tail_append = self.per_step(
            ("compress", *key, cfg, rows_per_seq),
            lambda: _compress_index(state.past, state.end, k_raw.shape[1], cfg, rows_per_seq, ragged))
        tails = ((layer.k_tail, k_raw.to(layer.k_tail.dtype)), (layer.v_tail, v_raw.to(layer.v_tail.dtype)))
        if not self.compresses(key[0], k_raw.shape[1], cfg):
            append_to_rings(tails, tail_append)
            return
        last = self.per_step(("last_positions", *key, cfg), lambda: position_ids.long().gather(1, last_at),
                             anchor=position_ids)
        # The gathered blocks lie one after the other: phi reads them in place.
        k_cmp, v_cmp = compress(*gather_positions(tails, blocks_at), last)
        layer.k_cmp.view(-1, *k_cmp.shape[2:]).index_copy_(0, target, k_cmp.flatten(0, 1).to(layer.k_cmp.dtype))
        layer.v_cmp.view(-1, *v_cmp.shape[2:]).index_copy_(0, target, v_cmp.flatten(0, 1).to(layer.v_cmp.dtype))
        state.k_cmp_new, state.v_cmp_new = k_cmp, v_cmp
        append_to_rings(tails, tail_append)

    def _window(self, layer, state, key, ragged, k_win, v_win, cfg: SparsityConfig):
        """Move the window ring on; return the ring the step reads (the cache's, or a wider one for a long chunk)."""
        C, R = k_win.shape[1], layer.k_win.shape[1]
        size = cfg.window + C - 1
        wide, append = self.per_step(
            ("window", *key, size, R),
            lambda: (ring_index(state.past, ring_positions(state.end, size), R, C) if size > R else None,
                     append_index(state.past, state.end, R, C, ragged)))
        rings = ((layer.k_win, k_win), (layer.v_win, v_win))
        step = None if wide is None else tuple(gather_positions(rings, wide))
        append_to_rings(rings, append)
        return step or (layer.k_win, layer.v_win)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Keep the batch rows beam_idx [B] (beam search), in place (a captured decode step stays valid); a paged
        cache copies the pages' contents."""
        for layer in self.layers:
            if layer is None:
                continue
            for name, value in vars(layer).items():
                if name in ("k", "v") and self.paged:
                    table = self.block_table.long()
                    value[table] = value[table[beam_idx.to(table.device)]]
                elif isinstance(value, torch.Tensor):
                    value.copy_(value.index_select(0, beam_idx.to(value.device)))


def _sequence_view(state: StepState, b: int, length: int, window: int):
    """(k, v, k_win, v_win) of sequence b's first `length` tokens, contiguous; the window ones cover the last
    `window` tokens (k_win starts at position length - window)."""
    layer = state.layer
    P = layer.k.shape[1]
    pos = torch.arange(length, device=layer.k.device)
    rows = pos + b * P if state.block_table is None else state.block_table[b].long()[pos // P] * P + pos % P
    k, v = layer.k.flatten(0, 1)[rows][None], layer.v.flatten(0, 1)[rows][None]
    if state.k_win is None:
        return k, v, k[:, -window:], v[:, -window:]
    s = torch.arange(max(0, length - window), length, device=k.device)
    return k, v, state.k_win[b, s % state.k_win.shape[1]][None], state.v_win[b, s % state.k_win.shape[1]][None]


def decode_attention(q: torch.Tensor, gates: torch.Tensor, state: StepState, cfg: SparsityConfig,
                     scale: float | None = None, return_indices: bool = False, backend: str | None = None):
    """NSA of C new queries per sequence against a layer's cache, exactly as the training path gives them.

    Args:
        q: [B, C, HQ, DK] the new queries, at positions state.past[b] .. state.past[b] + C - 1.
        gates: [B, C, HQ, 3].
        state: the layer's StepState after the new tokens were appended.
        cfg: the layer's knobs.
        scale: softmax scale, default 1 / sqrt(DK).
        return_indices: also return idx [B, C, HKV, n], the selected blocks as nsa_attention returns them.
        backend: "triton" (the fused decode kernels, nsa.ops.decode), "reference", or None (Triton for CUDA);
            with gradients to compute (grad mode and an input that requires them) the reference path runs.
    Returns:
        o [B, C, HQ, DV] in q's dtype, or (o, idx).
    """
    layer = state.layer
    if state.kernel_path(q, gates, layer.k_cmp, state.k_win, backend=backend):
        from .ops.decode import nsa_decode

        return nsa_decode(q, gates, layer.k, layer.v, layer.k_cmp, layer.v_cmp, state.past, cfg, scale,
                          k_win=state.k_win, v_win=state.v_win, block_table=state.block_table,
                          return_indices=return_indices)
    B, C, HQ, DK = q.shape
    scale = DK ** -0.5 if scale is None else scale
    outs, idxs = [], []
    for b, past in enumerate(state.past.tolist()):
        S = past + C
        k, v, k_win, v_win = _sequence_view(state, b, S, cfg.window + C - 1)
        tc = cfg.num_cmp(S)
        o, idx = _attend(q[b:b + 1], gates[b:b + 1], k, v, layer.k_cmp[b:b + 1, :tc], layer.v_cmp[b:b + 1, :tc],
                         k_win, v_win, past, cfg, scale)
        outs.append(o)
        idxs.append(idx)
    o, idx = torch.cat(outs), torch.cat(idxs)
    return (o, idx) if return_indices else o


def _attend(q, gates, k, v, k_cmp, v_cmp, k_win, v_win, past: int, cfg: SparsityConfig, scale: float):
    """The reference's building blocks for C queries at positions past .. past + C - 1 of one batch of equal-length
    sequences: k, v [B, S, ...] all tokens; k_win, v_win the last W of them. Returns (o, idx)."""
    B, C, HQ, DK = q.shape
    S, HKV = k.shape[1], k.shape[2]
    G = HQ // HKV
    qg = q.view(B, C, HKV, G, DK)
    t = torch.arange(past, S, device=q.device)[:, None]

    Tc = k_cmp.shape[1]
    cmp_visible = (torch.arange(Tc, device=q.device) * cfg.cmp_stride + cfg.cmp_block)[None, :] <= t + 1
    o_cmp, p_cmp = masked_attention(qg, k_cmp, v_cmp, cmp_visible[None, :, None].expand(B, C, HKV, Tc), scale)

    idx = select_blocks(block_scores(p_cmp.detach(), S, cfg), cfg, t[:, 0])
    selected = selection_mask(idx, cfg.num_slc(S)).repeat_interleave(cfg.slc_block, dim=-1)[..., :S]
    causal = torch.arange(S, device=q.device)[None, :] <= t
    o_slc = masked_attention(qg, k, v, selected & causal[None, :, None], scale)[0]

    W = k_win.shape[1]
    s = torch.arange(S - W, S, device=q.device)[None, :]
    band = (s <= t) & (s > t - cfg.window)
    o_win = masked_attention(qg, k_win, v_win, band[None, :, None].expand(B, C, HKV, W), scale)[0]

    branches = torch.stack([o_cmp, o_slc, o_win], dim=-1)
    g = gates.view(B, C, HKV, G, 1, 3)
    o = (branches.to(stat_dtype(q.dtype)) * g.to(stat_dtype(q.dtype))).sum(-1).reshape(B, C, HQ, -1).to(q.dtype)
    return o, idx
