"""Selected-branch kernels (nsa/ops/selected.py) against the float64 reference under the selection mask of
SPEC 5, with idx either chosen by reference.select_blocks on random scores or drawn at random."""

import math

import pytest
import torch

from nsa import SparsityConfig, reference
from nsa.ops.selected import SEGMENT, _block_segments, slc_bwd, slc_fwd
from tests.inputs import DEVICE
from tests.ops.attention_cases import check_against_reference, packed_inputs

SMALL = SparsityConfig(cmp_block=16, cmp_stride=8, slc_block=16, num_selected=4, num_init=1, num_local=2, window=32)
WIDE = SparsityConfig(cmp_block=16, cmp_stride=16, slc_block=32, num_selected=4, num_init=1, num_local=1, window=32)
TINY = SparsityConfig(cmp_block=8, cmp_stride=4, slc_block=8, num_selected=5, num_init=1, num_local=2, window=32)
LONG = SparsityConfig(cmp_block=32, cmp_stride=16, slc_block=128, num_selected=2, num_init=1, num_local=1, window=32)
ODD = SparsityConfig(cmp_block=16, cmp_stride=8, slc_block=24, num_selected=3, num_init=0, num_local=1, window=32)


def draw_idx(L, HKV, cfg, how):
    """idx [L, HKV, n] of one sequence: SPEC 4's top-n on random scores, or a random subset of the candidates
    that always holds the query's own block (so that it sees itself) and is often cut short (-1 padding)."""
    Ns = cfg.num_slc(L)
    if how == "top":
        return reference.select_blocks(torch.rand(1, L, HKV, Ns), cfg)[0]
    t = torch.arange(L)[:, None, None]
    j = torch.arange(Ns)[None, None, :]
    key = torch.rand(L, HKV, Ns).masked_fill(j > t // cfg.slc_block, -1.0).masked_fill(j == t // cfg.slc_block, 2.0)
    keep = torch.randint(1, cfg.num_selected + 1, (L, HKV, 1))
    order = key.sort(dim=-1, descending=True)
    ranks = torch.arange(Ns)[None, None, :]
    chosen = torch.where((order.values >= 0) & (ranks < keep), order.indices, Ns)[..., : cfg.num_selected]
    idx = chosen.sort(dim=-1).values
    idx = torch.where(idx == Ns, -1, idx)
    if idx.shape[-1] < cfg.num_selected:
        idx = torch.cat([idx, idx.new_full((L, HKV, cfg.num_selected - idx.shape[-1]), -1)], dim=-1)
    return idx.to(torch.int32)


def selection(idx_of_seq, cfg):
    def allowed_of(seq, s0, L):
        idx = idx_of_seq[seq]
        blocks = reference.selection_mask(idx[None], cfg.num_slc(L))[0]
        t = torch.arange(L)
        return blocks.repeat_interleave(cfg.slc_block, dim=-1)[..., :L] & (t[None, :] <= t[:, None])[:, None, :]
    return allowed_of


def run(lengths, HQ, HKV, DK, DV, cfg, dtype, how, segment=SEGMENT):
    q, k, v, do, packed = packed_inputs(lengths, HQ, HKV, DK, DV, dtype)
    idx_of_seq = [draw_idx(L, HKV, cfg, how).to(DEVICE) for L in lengths]
    idx = torch.cat(idx_of_seq)
    scale = 1 / math.sqrt(DK)
    o, lse = slc_fwd(q, k, v, idx, packed, cfg, scale)
    dq, dk, dv = slc_bwd(do, q, k, v, o, lse, idx, packed, cfg, scale, segment=segment)
    check_against_reference((o, lse, dq, dk, dv), q, k, v, do, lengths, selection([x.cpu() for x in idx_of_seq], cfg), scale)
    return q, k, v, do, idx, packed, (o, lse, dq, dk, dv)


@pytest.mark.parametrize(
    "lengths, HQ, HKV, DK, DV, cfg, dtype, how, segment",
    [
        ([157], 2, 1, 32, 16, SMALL, torch.float32, "top", SEGMENT),    # odd T, not a multiple of l', G = 2, DK != DV
        ([93, 93], 4, 4, 16, 32, SMALL, torch.float16, "random", 24),  # batch 2 as packed, G = 1, lists over several segments
        ([70, 9, 121], 3, 1, 48, 16, WIDE, torch.float32, "random", 16),  # varlen with a short sequence, G = 3, l' = 32, DK = 32 + 16
        ([130], 8, 2, 16, 16, SMALL, torch.float16, "top", 20),        # G = 4, two KV heads; segments of 20 (not a multiple of a step's 16)
        ([100], 8, 1, 16, 16, ODD, torch.float32, "top", SEGMENT),     # G = 8, l' = 24 (not a power of two), no init block
        ([77], 16, 1, 16, 16, WIDE, torch.float16, "random", 9),       # G = 16: one query per program
        ([45], 32, 1, 16, 16, SMALL, torch.float32, "random", SEGMENT),  # G = 32: one query, 32 rows
        ([61], 2, 1, 144, 16, TINY, torch.float32, "top", 8),       # l' = 8 below the 16-key tile, DK = 128 + 16
        ([290], 4, 1, 16, 16, LONG, torch.float16, "random", 40),     # l' = 128: two 64-key tiles per block
        ([83], 4, 2, 48, 48, SMALL, torch.float16, "random", 12),    # DK = DV = 32 + 16: both split, G = 2
        ([50], 16, 1, 48, 48, WIDE, torch.float32, "top", SEGMENT),  # split dims with one query per program
    ],
)
def test_selected_matches_reference(lengths, HQ, HKV, DK, DV, cfg, dtype, how, segment):
    run(lengths, HQ, HKV, DK, DV, cfg, dtype, how, segment=segment)


def test_block_segments_cover_the_inverse_map():
    """Every (KV head, key block) row lists, over its segments in order, exactly the tokens that selected that
    block, ascending; segments hold at most `segment` entries; partial slots are distinct and used only by
    rows of several segments."""
    lengths, HKV, segment = [50, 23, 80], 2, 6
    idx = torch.cat([draw_idx(L, HKV, SMALL, "random") for L in lengths]).to(DEVICE)
    packed = packed_inputs(lengths, 2, HKV, 16, 16, torch.float32)[-1]
    blocks, queries, segments, row_slots, P = _block_segments(idx, packed, SMALL, segment)
    starts = [0, 50, 73]
    NB = blocks.shape[0]
    listed = {}
    for row, first, end, slot in segments.tolist():
        assert 0 <= end - first <= segment
        listed.setdefault(row, []).append((queries[first:end].tolist(), slot))
    slots = []
    for row in range(HKV * NB):
        hkv, (seq, blk) = row // NB, blocks[row % NB].tolist()
        toks = [starts[seq] + t for t in range(lengths[seq]) if blk in idx[starts[seq] + t, hkv].tolist()]
        got = listed[row]
        assert sum((q for q, _ in got), []) == toks
        first, num = row_slots[row].tolist()
        assert num == (len(got) if len(got) > 1 else 0)
        assert [s for _, s in got] == (list(range(first, first + num)) if num else [-1])
        slots += [s for _, s in got if s >= 0]
    assert sorted(slots) == list(range(P)) and P > 0


def test_selected_backward_is_bitwise_reproducible():
    q, k, v, do, idx, packed, (o, lse, *grads) = run([120, 45], 4, 2, 32, 16, SMALL, torch.float32, "random", segment=10)
    again = slc_bwd(do, q, k, v, o, lse, idx, packed, SMALL, 1 / math.sqrt(32), segment=10)
    for a, b in zip(grads, again):
        assert torch.equal(a, b)


def test_selected_refuses_bad_idx():
    q, k, v, do, packed = packed_inputs([20], 2, 1, 16, 16, torch.float32)
    idx = draw_idx(20, 1, SMALL, "top").to(DEVICE)
    with pytest.raises(TypeError, match="idx"):
        slc_fwd(q, k, v, idx.long(), packed, SMALL, 0.25)
    with pytest.raises(ValueError, match="idx"):
        slc_fwd(q, k, v, idx[:, :, :2], packed, SMALL, 0.25)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU-scale shapes and bfloat16 need CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("segment", [SEGMENT, 256])
@pytest.mark.parametrize("lengths, HQ, HKV, DK, DV", [([4096], 16, 1, 192, 128), ([1000, 3001], 32, 8, 128, 128), ([2048], 8, 2, 64, 64)])
def test_selected_gpu_scale(lengths, HQ, HKV, DK, DV, dtype, segment):
    run(lengths, HQ, HKV, DK, DV, SparsityConfig(), dtype, "top", segment=segment)
