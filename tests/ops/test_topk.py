"""Block importance and top-n selection (nsa/ops/topk.py) against the float64 reference, tie-aware."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from nsa import reference
from nsa.config import SparsityConfig
from nsa.ops.compressed import cmp_fwd
from nsa.ops.common import LOG2E
from nsa.ops.topk import gather_bits, select_blocks, sum_bits
from tests.inputs import DEVICE
from tests.ops.test_compressed import SMALL, cmp_inputs, cmp_reference


def reference_scores(q, k_cmp, packed, cfg, scale):
    """(S, idx) of the float64 reference, packed: S [N, HKV, Ns] with -inf past each sequence's blocks,
    idx [N, HKV, n]."""
    N, HKV = q.shape[0], k_cmp.shape[1]
    Ns = cfg.num_slc(packed.max_len)
    S = torch.full((N, HKV, Ns), float("-inf"), dtype=torch.float64, device=q.device)
    idx = torch.empty(N, HKV, cfg.num_selected, dtype=torch.int32, device=q.device)
    # Only the probabilities are needed: a 16-wide slice stands in for v_cmp and do.
    *_, ps = cmp_reference(q, k_cmp, k_cmp[..., :16], q[..., :16], packed, cfg, scale, torch.float64)
    for s0, s1, p in ps:
        scores = reference.block_scores(p, s1 - s0, cfg)
        S[s0:s1, :, : scores.shape[-1]] = scores[0]
        idx[s0:s1] = reference.select_blocks(scores, cfg)[0]
    return S, idx


def positions(packed):
    """[N] position of every packed token within its sequence."""
    cu = packed.cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]
    return torch.arange(int(cu[-1]), device=cu.device) - torch.repeat_interleave(cu[:-1], lengths)


def assert_same_selection(idx, ref_idx, S, packed, cfg, rtol=1e-5):
    """idx must be SPEC 4's selection up to ties: ascending, -1 after the last, candidates only, the forced
    blocks in, and where it differs from ref_idx the blocks swapped in and out tie within rtol of the row's
    largest score."""
    assert idx.dtype == torch.int32 and idx.shape == ref_idx.shape
    valid = idx >= 0
    assert torch.equal(valid.sum(-1), (ref_idx >= 0).sum(-1)), "a different number of blocks was selected"
    assert not (valid[..., 1:] & ~valid[..., :-1]).any(), "-1 must come after the last selected block"
    assert ((idx[..., 1:] > idx[..., :-1]) | ~valid[..., 1:]).all(), "selected blocks must ascend"
    t = positions(packed)[:, None, None]
    assert ((idx * cfg.slc_block <= t) | ~valid).all(), "a block that is no candidate (j*l' > t) was selected"
    Ns = S.shape[-1]
    j = torch.arange(Ns, device=S.device)
    jt = t // cfg.slc_block
    forced = (j * cfg.slc_block <= t) & ((j < cfg.num_init) | ((j <= jt) & (j > jt - cfg.num_local)))
    mine = reference.selection_mask(idx, Ns)
    ref = reference.selection_mask(ref_idx, Ns)
    assert not (forced & ~mine).any(), "a forced block is missing"
    swapped_in = torch.where(mine & ~ref, S, float("inf")).amin(-1)
    swapped_out = torch.where(ref & ~mine, S, float("-inf")).amax(-1)
    tol = rtol * S.clamp_min(0).amax(-1).clamp_min(1.0)
    bad = swapped_out - swapped_in > tol
    assert not bad.any(), (
        f"{int(bad.sum())} rows select a block scored below one they left out by more than rounding, "
        f"worst gap {(swapped_out - swapped_in).max().item():.3e}"
    )


# (lengths, batch, HQ, HKV, DK, cfg, block_n): selections with more candidates than slots, T < l, a batch of
# 2, varlen with an empty sequence, G from 1 to 16, l'/d not a power of two, no forced block, l = l', DK split
# in two parts (48 = 32 + 16, 192 = 128 + 64), tiles with more candidates than slots, l = d = l'. A tile holds at
# least next_power_of_2(n) blocks (the tile's top-k) and block_n / next_power_of_2(l'/d) of them: the paper's knobs
# make tiles of 16 blocks at block_n = 32, n = 2 makes 8, SMALL makes 4 at block_n = 16, so that the running top-n
# merges several tiles and carries the spill of each tile's last block into the next (the default 64 makes tiles of
# 16 blocks, the whole of most tiny sequences).
CASES = [
    pytest.param([1100], None, 4, 2, 16, SparsityConfig(), 32, id="paper-knobs-G2-16-block-tiles"),
    pytest.param([700], None, 2, 1, 192, SparsityConfig(), 128, id="paper-knobs-DK192-32-block-tiles"),
    pytest.param([20], None, 3, 1, 16, SparsityConfig(), 128, id="T-below-l-G3"),
    pytest.param(None, (2, 150), 2, 2, 16, SMALL, 16, id="batch2-G1"),
    pytest.param([37, 0, 201, 9], None, 8, 2, 48, SMALL, 16, id="varlen-G4-DK48"),
    pytest.param([130], None, 16, 1, 16, SMALL, 128, id="G16"),
    pytest.param([99], None, 8, 1, 16, SparsityConfig(16, 8, 48, 3, 0, 0), 16, id="G8-slc48-nothing-forced"),
    pytest.param([150], None, 6, 1, 16, SparsityConfig(32, 16, 32, 5, 1, 1), 16, id="G6-l-equals-slc"),
    # n = 2 against tiles of 8 blocks: most tiles hold more keys above the bar than there are slots.
    pytest.param([900], None, 2, 1, 16, SparsityConfig(32, 16, 64, 2, 0, 1), 32, id="n2-8-block-tiles"),
    # l = d = l' (fla's knobs, scaled): compressed token j is block j, nothing spills; 32-block tiles.
    pytest.param([1100], None, 4, 1, 16, SparsityConfig(16, 16, 16, 4, 1, 2), 32, id="l-d-lprime-equal"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("lengths, batch, HQ, HKV, DK, cfg, block_n", CASES)
def test_select_blocks_matches_reference(lengths, batch, HQ, HKV, DK, cfg, block_n, dtype):
    q, k_cmp, v_cmp, _, packed = cmp_inputs(lengths, HQ, HKV, DK, 16, cfg, dtype, batch=batch)
    scale = DK ** -0.5
    _, lse = cmp_fwd(q, k_cmp, v_cmp, packed, cfg, scale)
    idx = select_blocks(q, k_cmp, lse, packed, cfg, scale, block_n=block_n)
    S, ref_idx = reference_scores(q, k_cmp, packed, cfg, scale)
    assert_same_selection(idx, ref_idx, S, packed, cfg)


# The interpreter evaluates both sides of tl.where: the guarded exp2 overflows there, by design.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")
def test_padding_slots_add_nothing_when_every_score_is_very_low():
    # l'/d = 6 tokens per block, padded to 8 slots that load nothing (score 0); with every real score far below 0
    # (lse2 < -128) such a slot's exp2(0 - lse2) is inf, and inf times its zero overlap weight would be NaN. 600
    # tokens in 16-slot tiles make both the masked tiles and the ones that skip the staircase mask meet them.
    cfg = SparsityConfig(16, 8, 48, 3, 1, 1)
    q, k_cmp, v_cmp, _, packed = cmp_inputs([600], 2, 1, 16, 16, cfg, torch.float32)
    u = torch.nn.functional.normalize(torch.randn(16, device=DEVICE), dim=0)
    q = u.expand_as(q) * (1 + 0.01 * torch.randn(q.shape[:2], device=DEVICE))[..., None]
    k_cmp = -400.0 * u.expand_as(k_cmp) + 0.01 * torch.randn_like(k_cmp)
    _, lse = cmp_fwd(q, k_cmp, v_cmp, packed, cfg, 0.25)
    assert (lse[100:] * LOG2E < -128).all()
    idx = select_blocks(q, k_cmp, lse, packed, cfg, 0.25, block_n=16)
    S, ref_idx = reference_scores(q, k_cmp, packed, cfg, 0.25)
    assert_same_selection(idx, ref_idx, S, packed, cfg)


def test_tie_check_can_fail():
    """The tie-aware check rejects a selection that swaps a clearly better block for a worse one."""
    cfg = SMALL
    q, k_cmp, v_cmp, _, packed = cmp_inputs([200], 2, 1, 16, 16, cfg, torch.float32)
    S, ref_idx = reference_scores(q, k_cmp, packed, cfg, 0.25)
    t = positions(packed)
    worse = ref_idx.clone()
    row = int((t >= 6 * cfg.slc_block).nonzero()[0])
    chosen = set(ref_idx[row, 0].tolist())
    left_out = [j for j in range(cfg.num_slc(200)) if j * cfg.slc_block <= row and j not in chosen]
    drop = max((j for j in chosen if j not in (0, row // cfg.slc_block, row // cfg.slc_block - 1)), key=lambda j: S[row, 0, j])
    worst = min(left_out, key=lambda j: S[row, 0, j])
    assert S[row, 0, drop] > S[row, 0, worst] * (1 + 1e-3)
    worse[row, 0] = torch.tensor(sorted(chosen - {drop} | {worst}), dtype=torch.int32, device=DEVICE)
    with pytest.raises(AssertionError, match="scored below"):
        assert_same_selection(worse, ref_idx, S, packed, cfg)


def test_select_blocks_rejects_bad_lse():
    cfg = SparsityConfig()
    q, k_cmp, v_cmp, _, packed = cmp_inputs([70], 4, 2, 16, 16, cfg, torch.float32)
    with pytest.raises(ValueError, match="lse"):
        select_blocks(q, k_cmp, torch.zeros(70, 4, dtype=torch.float16, device=DEVICE), packed, cfg, 0.25)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="real shapes and bfloat16 need a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
# G = 64 leaves two queries per program (topk.BLOCK_M = 128 rows): the top-k and merges run on [2, N] key tiles.
@pytest.mark.parametrize("T, HQ, HKV, DK", [(8192, 64, 4, 192), (8192, 16, 1, 128), (5001, 12, 2, 64),
                                           (4099, 64, 1, 128)])
def test_select_blocks_real_shapes_on_gpu(T, HQ, HKV, DK, dtype):
    cfg = SparsityConfig()
    q, k_cmp, v_cmp, _, packed = cmp_inputs([T // 3, T - T // 3], HQ, HKV, DK, 64, cfg, dtype)
    scale = DK ** -0.5
    _, lse = cmp_fwd(q, k_cmp, v_cmp, packed, cfg, scale)
    idx = select_blocks(q, k_cmp, lse, packed, cfg, scale)
    S, ref_idx = reference_scores(q, k_cmp, packed, cfg, scale)
    assert_same_selection(idx, ref_idx, S, packed, cfg)


@triton.jit
def _sum_bits_kernel(X, OUT, IDX, M: tl.constexpr, N: tl.constexpr, MASK: tl.constexpr, AXIS: tl.constexpr,
                     SIZE: tl.constexpr, NBITS: tl.constexpr):
    x = tl.load(X + tl.arange(0, M)[:, None] * N + tl.arange(0, N)[None, :])
    y = sum_bits(x, MASK, AXIS)
    tl.store(OUT + tl.arange(0, y.shape[0])[:, None] * y.shape[1] + tl.arange(0, y.shape[1])[None, :], y)
    r = tl.arange(0, SIZE)
    tl.store(IDX + r, gather_bits(r, MASK, NBITS))


@pytest.mark.parametrize(
    "M, N, mask, axis",
    [(16, 8, 0b1001, 0), (8, 32, 0b10110, 1), (32, 4, 0, 0), (4, 16, 0b1111, 1), (128, 16, 0b1001011, 0)],
)
def test_sum_bits_sums_the_masked_index_bits(M, N, mask, axis):
    """sum_bits over the index bits in mask equals grouping the indices by their other bits (kept in order), and
    gather_bits packs the masked bits of an index in ascending order."""
    x = torch.randn(M, N, dtype=torch.float32, device=DEVICE)
    size = (M, N)[axis]
    keep = [i for i in range(size) if i & mask == 0]
    out = torch.empty(M if axis else M // (size // len(keep)), N if not axis else len(keep), device=DEVICE)
    idx = torch.empty(size, dtype=torch.int32, device=DEVICE)
    _sum_bits_kernel[(1,)](x, out, idx, M, N, mask, axis, size, size.bit_length() - 1)
    expected = torch.zeros_like(out)
    bits = [b for b in range(size.bit_length() - 1) if mask >> b & 1]
    for i in range(size):
        target = keep.index(i & ~mask)
        if axis == 0:
            expected[target] += x[i]
        else:
            expected[:, target] += x[:, i]
        assert idx[i].item() == sum(((i >> b) & 1) << n for n, b in enumerate(bits))
    torch.testing.assert_close(out, expected)
