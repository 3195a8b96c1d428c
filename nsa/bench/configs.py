"""What the suite measures: the attention shapes, the plans of a run, and how work is counted."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..config import SparsityConfig

PHASES = ("fwd", "bwd", "fwdbwd", "layer", "decode", "generate")


@dataclass(frozen=True)
class BenchConfig:
    """One attention shape with its sparsity.

    Args:
        name: short key used in rows and plots.
        hq, hkv, dk, dv: query heads, key/value heads, key and value head dims.
        sparsity: SPEC's knobs.
        pooled: k_cmp, v_cmp are the mean of each compression block, computed inside the timed region
            (fla's compression, which needs cmp_block == cmp_stride); otherwise they are random inputs.
        window_gate: False sets the window gate to 0, so the window branch does not reach the output.
        fla: also time fla's parallel_nsa at this shape.
        note: what the configuration stands for.
    """

    name: str
    hq: int
    hkv: int
    dk: int
    dv: int
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    pooled: bool = False
    window_gate: bool = True
    fla: bool = False
    note: str = ""

    @property
    def dense_shape(self) -> tuple[int, int, int, int]:
        """The dense attention this configuration is compared with; equal shapes share baseline rows."""
        return (self.hq, self.hkv, self.dk, self.dv)

    def describe(self) -> dict:
        s = self.sparsity
        return {
            "HQ": self.hq, "HKV": self.hkv, "DK": self.dk, "DV": self.dv,
            "cmp_block": s.cmp_block, "cmp_stride": s.cmp_stride, "slc_block": s.slc_block,
            "num_selected": s.num_selected, "num_init": s.num_init, "num_local": s.num_local,
            "window": s.window, "k_cmp": "mean of each block, inside the timed region" if self.pooled
            else "random input (the compression MLP is outside nsa_attention)",
            "window_gate": "random in (0, 1)" if self.window_gate else "0", "note": self.note,
        }


# fla's parallel_nsa compresses by mean pooling over blocks of its selection size, selects 16 blocks of 64
# with block 0 and the two blocks ending at the query forced, and has no window without flash_attn.
# Our side computes the same function with l = d = l' = 64 and a window gate of 0 (window = 1 keeps the
# branch as cheap as it gets: one key per query).
FLA_NOTE = (
    "fla parallel_nsa's configuration: both sides mean-pool k_cmp/v_cmp over blocks of 64 inside the timed "
    "region, attend the visible compressed tokens, select 16 blocks of 64 (block 0 and the two ending at "
    "the query forced, the rest by summed compressed probability), gate o = g_cmp*o_cmp + g_slc*o_slc. "
    "fla has no window (window_size=0); nsa runs its window branch with window=1 and a gate of 0."
)

FULL_CONFIGS = (
    BenchConfig("paper", 64, 4, 192, 128, note="the paper's: l=32, d=16, l'=64, n=16, w=512"),
    BenchConfig("d128", 64, 4, 128, 128, note="paper sparsity, head dim 128"),
    BenchConfig("g4", 32, 8, 128, 128, note="small groups (G=4), head dim 128"),
    BenchConfig("fla", 64, 4, 128, 128, SparsityConfig(64, 64, 64, 16, 1, 2, 1), pooled=True,
                window_gate=False, fla=True, note=FLA_NOTE),
)

# The same four, shrunk so that the reference runs them on a CPU in seconds.
TINY_CONFIGS = (
    BenchConfig("paper", 4, 1, 32, 16, SparsityConfig(8, 4, 16, 4, 1, 2, 32), note="tiny stand-in for paper"),
    BenchConfig("d128", 4, 1, 16, 16, SparsityConfig(8, 4, 16, 4, 1, 2, 32), note="tiny stand-in for d128"),
    BenchConfig("g4", 4, 2, 16, 16, SparsityConfig(8, 4, 16, 4, 1, 2, 32), note="tiny stand-in for g4"),
    BenchConfig("fla", 4, 1, 16, 16, SparsityConfig(16, 16, 16, 4, 1, 2, 1), pooled=True, window_gate=False,
                fla=True, note="tiny stand-in for fla"),
)


@dataclass(frozen=True)
class Plan:
    """The cases of one run: every config at every length with B=1, plus extra (config, B, T) cases."""

    configs: tuple[BenchConfig, ...]
    seqlens: tuple[int, ...]
    phases: tuple[str, ...]
    extra: tuple[tuple[str, int, int], ...] = ()
    # Dense baselines slower than cuDNN (flash, flex) are timed only up to this length: beyond it they
    # would spend the run's time limit on figures that only confirm their quadratic growth.
    slow_baseline_max_t: int = 1 << 16
    guard_len: int = 4096
    # The layer phase (projections, phi, gates around the core) at these lengths; None: every length.
    layer_seqlens: tuple[int, ...] | None = None
    # Decode: one new token per sequence at these batch sizes and cache lengths, for these configurations.
    decode_configs: tuple[str, ...] = ("paper", "d128")
    decode_batches: tuple[int, ...] = (1, 16, 64)
    decode_contexts: tuple[int, ...] = (8 * 1024, 32 * 1024, 128 * 1024)
    # Decode steps per CUDA graph, each on its own cache, as the layers of a model's step run (the graph's launch is
    # then paid once for all of them); a row's time is per step.
    decode_layers: int = 1
    # generate(): greedy decoding of generate_tokens tokens after a prompt of each context, for NSAForCausalLM and
    # its dense twin built from NSAConfig.nsa_1b() with these (name, value) overrides and each configuration's
    # sparsity knobs.
    generate_configs: tuple[str, ...] = ("paper",)
    generate_batches: tuple[int, ...] = (1, 16)
    generate_contexts: tuple[int, ...] = (32 * 1024,)
    generate_tokens: int = 64
    generate_model: tuple[tuple[str, int], ...] = ()

    def cases(self) -> list[tuple[BenchConfig, int, int]]:
        """(config, B, T) in the order they run: by length first, so a run cut short loses the longest."""
        by_name = {c.name: c for c in self.configs}
        cases = [(c, 1, t) for t in self.seqlens for c in self.configs]
        cases += [(by_name[name], b, t) for name, b, t in self.extra if name in by_name]
        return sorted(cases, key=lambda case: case[1] * case[2])

    def decode_cases(self) -> list[tuple[BenchConfig, int, int]]:
        return [(c, b, t) for t in self.decode_contexts for b in self.decode_batches for c in self.configs
                if c.name in self.decode_configs]

    def generate_cases(self) -> list[tuple[BenchConfig, int, int]]:
        return [(c, b, t) for t in self.generate_contexts for b in self.generate_batches for c in self.configs
                if c.name in self.generate_configs]


K = 1024


def make_plan(mode: str) -> Plan:
    """The plan of `mode`: "full" and "quick" on a GPU, "tiny" on the reference (CPU, CI)."""
    if mode == "full":
        # B=8 at 8k holds as many tokens as 64k: the case of many short training sequences.
        return Plan(FULL_CONFIGS, (8 * K, 16 * K, 32 * K, 64 * K, 128 * K), PHASES, extra=(("d128", 8, 8 * K),),
                    layer_seqlens=(8 * K, 32 * K, 128 * K))
    if mode == "quick":
        return Plan(tuple(c for c in FULL_CONFIGS if c.name in ("paper", "fla")), (8 * K, 64 * K), PHASES,
                    slow_baseline_max_t=8 * K, decode_configs=("paper",), decode_batches=(1, 64),
                    decode_contexts=(8 * K, 64 * K), generate_batches=(1,))
    if mode == "tiny":
        return Plan(TINY_CONFIGS, (64, 128), PHASES, extra=(("d128", 2, 128),), guard_len=96,
                    decode_configs=("paper",), decode_batches=(1, 2), decode_contexts=(128,),
                    generate_batches=(1,), generate_contexts=(96,), generate_tokens=3,
                    generate_model=(("hidden_size", 32), ("intermediate_size", 64), ("num_hidden_layers", 2),
                                    ("num_attention_heads", 4), ("num_key_value_heads", 1), ("head_dim", 32),
                                    ("v_head_dim", 16), ("vocab_size", 64)))
    raise ValueError(f"mode must be full, quick or tiny, got {mode!r}")


FLOP_RULES = {
    "dense": "2*B*HQ*(T*(T+1)/2)*(DK+DV) forward (causal half of QK^T and PV); backward 2.5x forward",
    "nsa": (
        "sum over queries t of 2*B*HQ*[(DK+DV)*(c(t) + s(t) + w(t)) + DK*c(t)] forward, where c(t) = visible "
        "compressed tokens (0 if t+1 < l else (t+1-l)//d + 1), s(t) = keys of the selected blocks up to t = "
        "(min(n, t//l'+1) - 1)*l' + t%l' + 1, w(t) = min(w, t+1) (0 where a side has no window), and DK*c(t) "
        "the scoring pass recomputing q.k_cmp for the block importance; backward 2.5x the attention part "
        "(selection has no gradient); mean pooling, gating and top-n bookkeeping not counted"
    ),
    "layer": "not counted: projections, compression MLP and gates are in the time",
}
BYTE_RULE = (
    "a lower bound of HBM traffic: forward reads the inputs and writes the output once; backward reads the "
    "inputs, the output and its gradient and writes the input gradients once"
)


def dense_flops(cfg: BenchConfig, batch: int, seqlen: int) -> tuple[int, int]:
    """(forward, backward) FLOPs of causal dense attention at this shape."""
    fwd = 2 * batch * cfg.hq * (seqlen * (seqlen + 1) // 2) * (cfg.dk + cfg.dv)
    return fwd, int(2.5 * fwd)


def nsa_flops(cfg: BenchConfig, batch: int, seqlen: int, window: bool = True) -> tuple[int, int]:
    """(forward, backward) FLOPs of the work NSA's branches do (FLOP_RULES["nsa"])."""
    s = cfg.sparsity
    t = np.arange(seqlen, dtype=np.int64)
    n_cmp = np.where(t + 1 >= s.cmp_block, (t + 1 - s.cmp_block) // s.cmp_stride + 1, 0)
    n_slc = (np.minimum(s.num_selected, t // s.slc_block + 1) - 1) * s.slc_block + t % s.slc_block + 1
    n_win = np.minimum(s.window, t + 1) if window else np.zeros_like(t)
    attn = 2 * (cfg.dk + cfg.dv) * int((n_cmp + n_slc + n_win).sum())
    score = 2 * cfg.dk * int(n_cmp.sum())
    return batch * cfg.hq * (attn + score), int(2.5 * batch * cfg.hq * attn)
