"""The run: every case of the plan, NSA and its baselines side by side, guarded, timed, written down.

A failing side or phase becomes a row with status "error" and the message; a side that cannot take a
shape becomes status "skipped" with the reason; neither stops the run. bench.json is rewritten after
every case, so that a run cut short still leaves what it measured, and a later run given it to resume
measures only the rows that the time budget left out. Every row names the run that measured it.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import sys
import time
from functools import partial

import torch

import nsa

from . import guard, impls
from .configs import BYTE_RULE, FLOP_RULES, PHASES, BenchConfig, Plan, make_plan
from .measure import bench_ms, ceilings, environment, peak_gb, reset_peak

TRAINING = ("fwd", "bwd", "fwdbwd")
# The dense side each phase's speedup is measured against, by device type.
REFERENCE = {
    "cuda": {"train": "sdpa_cudnn", "layer": "dense_layer", "decode": "sdpa_decode", "generate": "dense_generate"},
    "cpu": {"train": "sdpa_math", "layer": "dense_layer", "decode": "sdpa_decode", "generate": "dense_generate"},
}
# Notes of rows that carry no measurement of their own: the budget's (measured again on resume) and the copies
# of a dense baseline timed for another configuration of the same shape.
BUDGET_NOTE = "time budget"
SHARED_NOTE = "same dense shape as config"
# What a resumed run must share with the runs it continues for their rows to stand in one table.
SAME_MEASUREMENT = ("mode", "dtype", "nsa_backend", "reference_baseline", "methodology")
SAME_MACHINE = ("gpu", "torch", "triton")
LABELS = {
    "nsa": "NSA", "sdpa_cudnn": "SDPA cuDNN", "sdpa_math": "SDPA math (CPU)", "sdpa_flash": "SDPA flash (FA2)",
    "flex": "FlexAttention (compiled)", "fla": "fla parallel_nsa", "nsa_layer": "NSA layer",
    "dense_layer": "nsa.DenseAttention", "nsa_decode": "NSA decode", "sdpa_decode": "SDPA decode",
    "nsa_generate": "NSA model generate()", "dense_generate": "dense model generate()",
}


@dataclasses.dataclass
class Settings:
    device: torch.device
    dtype: torch.dtype
    backend: str
    warmup: int
    rep: int
    budget_s: float
    out: str | None


def _phase_flops(flops, phase):
    if flops is None:
        return None
    fwd, bwd = flops
    return {"fwd": fwd, "decode": fwd, "bwd": bwd, "fwdbwd": fwd + bwd}.get(phase)


def _leaves(built: impls.Built, inputs: tuple) -> list[torch.Tensor]:
    return [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad] + list(built.params)


def _calls(built: impls.Built, phase: str) -> tuple[list, int, int]:
    """One call per rotated input copy for `phase`, with the input and output bytes of one call."""
    calls = []
    out_bytes = 0
    for inputs in built.inputs:
        if phase in ("fwd", "decode"):
            with torch.no_grad():
                out_bytes = impls.tensor_bytes([built.fn(*inputs)])
            calls.append(partial(built.fn, *inputs))
            continue
        out = built.fn(*inputs)
        grad_out = torch.randn_like(out)
        out_bytes = impls.tensor_bytes([out])
        leaves = _leaves(built, inputs)
        if phase == "bwd":
            # The forward ran above, outside the timed region; retain_graph lets every timed call reuse it.
            calls.append(partial(torch.autograd.grad, out, leaves, grad_out, retain_graph=True))
        else:
            del out
            calls.append(lambda inputs=inputs, leaves=leaves, grad_out=grad_out: torch.autograd.grad(
                built.fn(*inputs), leaves, grad_out))
    in_bytes = impls.tensor_bytes(list(built.inputs[0]) + list(built.params))
    return calls, in_bytes, out_bytes


def time_phase(built: impls.Built, phase: str, s: Settings) -> dict:
    """Median ms of `phase` on `built`, its FLOP rate, traffic, peak memory and shares of the ceilings."""
    calls, in_bytes, out_bytes = _calls(built, phase)
    position = iter(range(1 << 62))

    def step():
        return calls[next(position) % len(calls)]()

    grad_context = torch.no_grad() if phase == "decode" else torch.enable_grad()
    with grad_context:
        ms = bench_ms(step, s.device, s.warmup, s.rep) / built.layers
    flops = _phase_flops(built.flops, phase)
    if phase in ("fwd", "decode"):
        traffic = built.bytes_fwd or in_bytes + out_bytes
    else:
        traffic = (2 if phase == "bwd" else 3) * (in_bytes + out_bytes)
    row = {"ms": ms, "flops": flops, "bytes": traffic, "copies": len(calls)}
    if phase == "decode":
        row["layers"] = built.layers
    row["TFLOPs"] = flops / ms / 1e9 if flops else None
    row["GBps"] = traffic / ms / 1e6 if traffic else None
    return row


def spent(row: dict) -> bool:
    """Whether the time budget left this row out."""
    return row["status"] == "skipped" and row["note"].startswith(BUDGET_NOTE)


def load_runs(path: str) -> dict:
    """An earlier bench.json; one written before runs were recorded is that single run."""
    with open(path) as f:
        earlier = json.load(f)
    if "runs" not in earlier:
        earlier["runs"] = [{key: earlier.pop(key, None) for key in ("started", "environment", "ceilings", "elapsed_s")}]
        for item in earlier["rows"] + earlier["checks"]:
            item["run"] = 0
    return earlier


def check_resumable(earlier: dict, results: dict, path: str) -> None:
    """Refuse to merge rows measured another way, on another GPU or by other torch or triton versions."""
    differ = [(key, earlier.get(key), results[key]) for key in SAME_MEASUREMENT if earlier.get(key) != results[key]]
    now = results["runs"][-1]["environment"]
    differ += [(key, run["environment"].get(key), now[key]) for run in earlier["runs"] for key in SAME_MACHINE
               if run["environment"].get(key) != now[key]]
    differ += [(f"config {name}", shape, results["configs"][name]) for name, shape in earlier["configs"].items()
               if results["configs"].get(name, shape) != shape]
    if differ:
        lines = "\n".join(f"  {key}: {str(then)[:120]} there, {str(now)[:120]} here" for key, then, now in differ)
        raise SystemExit(f"--resume {path}: its rows were not measured as this run measures, so they cannot be "
                         f"merged:\n{lines}")


def merge_runs(paths: list[str]) -> dict:
    """The bench.json files of runs that split one plan between them (say, a --configs subset on each GPU of a
    host, each resuming the same earlier run) as one result: their runs, checks and rows together. A row measured
    in one file replaces the same case's budget skip in another; two different measurements of one case are refused,
    as are files measured another way or on another GPU or versions (as for --resume)."""
    merged = None
    where: dict[tuple, int] = {}
    for path in paths:
        part = load_runs(path)
        if merged is None:
            merged = {**part, "runs": [], "checks": [], "rows": [], "configs": {}, "phases": []}
        elif merged["runs"]:
            check_resumable(part, {**merged, "runs": merged["runs"][:1]}, path)
        index = []  # this file's run number -> the merged one; a run shared by several files counts once
        for run in part["runs"]:
            if run not in merged["runs"]:
                merged["runs"].append(run)
            index.append(merged["runs"].index(run))
        merged["configs"].update(part["configs"])
        merged["phases"] = [p for p in PHASES if p in merged["phases"] or p in part["phases"]]
        for check in part["checks"]:
            check = {**check, "run": index[check["run"]]}
            if check not in merged["checks"]:
                merged["checks"].append(check)
        for row in part["rows"]:
            row = {**row, "run": index[row["run"]]}
            key = (row["config"], row["B"], row["T"], row["phase"], row["impl"])
            if key not in where:
                where[key] = len(merged["rows"])
                merged["rows"].append(row)
                continue
            kept = merged["rows"][where[key]]
            if spent(kept):
                merged["rows"][where[key]] = row
            elif not spent(row) and {**row, "speedup": None} != {**kept, "speedup": None}:
                raise SystemExit(f"--merge {path}: {'/'.join(map(str, key))} was measured in two of the files")
    if merged is None:
        raise SystemExit("--merge needs at least one bench.json")
    add_speedups(merged["rows"], merged["reference_baseline"])
    add_fractions(merged["rows"], merged["runs"])
    return merged


class Runner:
    """Runs a plan, keeping every row and check in `self.results`; with `earlier` (an earlier run's results),
    keeps its rows but those the time budget left out, and measures only the cases without a kept row."""

    def __init__(self, plan: Plan, mode: str, s: Settings, earlier: dict | None = None, resume_path: str = ""):
        self.plan, self.mode, self.s = plan, mode, s
        self.started = time.monotonic()
        self.ref = REFERENCE[s.device.type]
        self.dense_cache: dict[tuple, dict] = {}
        this_run = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "environment": environment(s.device),
                    "ceilings": None, "elapsed_s": None}
        self.results = {
            "suite": "nsa bench", "mode": mode, "nsa_version": nsa.__version__, "runs": [this_run],
            "dtype": str(s.dtype).removeprefix("torch."), "nsa_backend": s.backend,
            "reference_baseline": self.ref,
            "methodology": {
                "timing": (f"triton.testing.do_bench(warmup={s.warmup}, rep={s.rep}, return_mode='median') on CUDA; "
                           "one perf_counter timing on CPU (harness check only). fwd: forward with inputs that require grad "
                           "(the training forward). bwd: torch.autograd.grad of a saved output with retain_graph, "
                           "the forward outside the timed region. fwdbwd: forward + backward. layer: forward + "
                           "backward of the whole attention layer (projections, compression, gates) including "
                           "parameter gradients. decode: one new token per sequence against a filled cache, no grad, both sides "
                           "replayed from a CUDA graph on a GPU (as a serving engine runs a step; no host launch cost)"
                           + (f", {plan.decode_layers} layers' steps on their own caches per graph (fewer where memory "
                              "is short: the row's 'layers'), time per step" if plan.decode_layers > 1 else "") + ". "
                           "generate: the model's greedy generate() after a prompt, per new token (Built.timer: "
                           "perf_counter around whole calls, prompt time subtracted)."),
                "nsa_includes": ("everything nsa_attention does: compressed branch, block scores, top-n, selected "
                                 "and window branches, gating; the mean pooling of the fla configuration too. "
                                 "The compression MLP and projections only in the layer phase."),
                "flops": FLOP_RULES, "bytes": BYTE_RULE,
                "l2": ("inputs smaller than 3x the 60 MB L2 are rotated over up to 4 copies ('copies' per row); "
                       "every GPU shape here is larger, so those run on one copy"),
                "guard": guard.__doc__.strip(),
                "skips": (f"FlexAttention and SDPA flash are timed up to T={plan.slow_baseline_max_t} only; "
                          "a side that cannot take a shape is 'skipped' with the reason"),
            },
            "configs": {c.name: c.describe() for c in plan.configs},
            "phases": list(plan.phases), "checks": [], "rows": [],
        }
        # (config, B, T, phase, impl) -> the earlier row that stands for it. Kept rows come first in the result,
        # so that a resumed run cut short again still leaves all of them in bench.json.
        self.kept: dict[tuple, dict] = {}
        if earlier is not None:
            check_resumable(earlier, self.results, resume_path)
            self.results["runs"] = earlier["runs"] + [this_run]
            self.results["configs"] = {**earlier["configs"], **self.results["configs"]}
            self.results["phases"] = [p for p in PHASES if p in earlier["phases"] or p in plan.phases]
            self.results["checks"] = earlier["checks"]
            self.kept = {(r["config"], r["B"], r["T"], r["phase"], r["impl"]): r
                         for r in earlier["rows"] if not spent(r)}
            self.results["rows"] = list(self.kept.values())
            by_name = {c.name: c for c in plan.configs}
            for row in self.kept.values():
                if row["config"] in by_name and not row["note"].startswith(SHARED_NOTE):
                    key = (row["impl"], by_name[row["config"]].dense_shape, row["B"], row["T"], row["phase"])
                    self.dense_cache[key] = row
        self.run_index = len(self.results["runs"]) - 1

    # -- bookkeeping ---------------------------------------------------------------------------------

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def out_of_time(self) -> bool:
        return self.elapsed() > self.s.budget_s

    def add_row(self, cfg: BenchConfig, batch: int, seqlen: int, phase: str, impl: str, status: str, **fields):
        row = {"config": cfg.name, "B": batch, "T": seqlen, "phase": phase, "impl": impl,
               "label": LABELS.get(impl, impl), "status": status, "note": "", "run": self.run_index, "ms": None,
               "speedup": None, "TFLOPs": None, "GBps": None, "frac_matmul": None, "frac_copy": None, "peak_GB": None}
        row.update(fields)
        self.results["rows"].append(row)
        return row

    def kept_row(self, cfg: BenchConfig, batch: int, seqlen: int, phase: str, impl: str) -> dict | None:
        """The earlier run's row of this case, if it is kept."""
        return self.kept.get((cfg.name, batch, seqlen, phase, impl))

    def save(self) -> None:
        if not self.s.out:
            return
        os.makedirs(self.s.out, exist_ok=True)
        path = os.path.join(self.s.out, "bench.json")
        with open(path + ".tmp", "w") as f:
            json.dump(self.results, f, indent=1, default=str)
        os.replace(path + ".tmp", path)

    def free(self, collect: bool = False) -> None:
        """Return freed blocks to the device; collect=True after an error, whose traceback may hold tensors
        in a reference cycle (a full collection costs a fraction of a second, too much after every row)."""
        if collect:
            gc.collect()
        if self.s.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- measuring -----------------------------------------------------------------------------------

    def measure(self, cfg, batch, seqlen, phase, impl, build, built=None, skip=None):
        """One row: build (unless `built` is given), time, record; errors and skips become the row."""
        kept = self.kept_row(cfg, batch, seqlen, phase, impl)
        if kept is not None:
            return kept
        if skip is None and self.out_of_time():
            skip = f"{BUDGET_NOTE} ({self.s.budget_s:.0f} s) spent"
        if skip is not None:
            return self.add_row(cfg, batch, seqlen, phase, impl, "skipped", note=skip)
        reset_peak(self.s.device)
        try:
            if built is None:
                built = build()
            fields = built.timer() if built.timer is not None else time_phase(built, phase, self.s)
            fields["peak_GB"] = peak_gb(self.s.device)
            fields["note"] = built.note
            return self.add_row(cfg, batch, seqlen, phase, impl, "ok", **fields)
        except impls.Skip as reason:
            return self.add_row(cfg, batch, seqlen, phase, impl, "skipped", note=str(reason))
        except Exception as error:  # a broken side is a row that says so; the rest of the run goes on
            row = self.add_row(cfg, batch, seqlen, phase, impl, "error", note=_message(error))
            built = None
            self.free(collect=True)
            return row
        finally:
            built = None
            self.free()

    def measure_dense(self, cfg, batch, seqlen, phase, impl, build, skip=None):
        """A dense baseline row, timed once per dense shape and shared by configurations with that shape."""
        kept = self.kept_row(cfg, batch, seqlen, phase, impl)
        if kept is not None:
            return kept
        key = (impl, cfg.dense_shape, batch, seqlen, phase)
        if skip is None and key in self.dense_cache:
            # The copy keeps the run of the row it copies: its fractions are shares of that run's ceilings.
            first = self.dense_cache[key]
            shared = {k: v for k, v in first.items() if k not in ("config", "B", "T", "phase", "impl", "label", "status")}
            shared["note"] = f"{SHARED_NOTE} {first['config']}: timed once; {first['note']}".rstrip("; ")
            return self.add_row(cfg, batch, seqlen, phase, impl, first["status"], **shared)
        row = self.measure(cfg, batch, seqlen, phase, impl, build, skip=skip)
        # A budget skip is no figure to share: a resumed run measures each of its copies again.
        if skip is None and not spent(row):
            self.dense_cache[key] = row
        return row

    def guard_nsa(self, cfg, batch, seqlen, built) -> str | None:
        """Run the guard on the inputs NSA will be timed on; returns why NSA must not be timed, or None."""
        check = {"config": cfg.name, "B": batch, "T": seqlen, "impl": "nsa", "run": self.run_index}
        try:
            check.update(guard.check_nsa(cfg, built.inputs[0], self.s.backend, self.plan.guard_len))
        except Exception as error:  # a kernel that cannot even run the guard is not timed
            check.update(passed=False, error=_message(error))
            self.free(collect=True)
        self.results["checks"].append(check)
        if cfg.fla and self.s.device.type == "cuda":
            fla_check = {"config": cfg.name, "B": batch, "T": seqlen, "impl": "fla", "run": self.run_index}
            try:
                fla_check.update(guard.check_fla(cfg, built.inputs[0], self.plan.guard_len))
            except Exception as error:  # informative only
                fla_check.update(error=_message(error))
                self.free(collect=True)
            self.results["checks"].append(fla_check)
        self.free()
        return None if check.get("passed") else "correctness guard failed (see checks): not timed"

    def training_case(self, cfg, batch, seqlen, tick):
        s = self.s
        phases = [p for p in TRAINING if p in self.plan.phases]
        if not phases:
            return
        args = (cfg, batch, seqlen, s.device, s.dtype)
        built, failure = None, None
        # NSA is built and guarded only where one of its phases is still to be timed.
        to_time = any((cfg.name, batch, seqlen, phase, "nsa") not in self.kept for phase in phases)
        if to_time and not self.out_of_time():
            try:
                built = impls.build_nsa(*args, backend=s.backend)
            except Exception as error:  # recorded in each NSA row below
                failure = _message(error)
        if built is not None:
            tick(cfg, batch, seqlen, "guard", "nsa")
            failure = self.guard_nsa(cfg, batch, seqlen, built)
        for phase in phases:
            tick(cfg, batch, seqlen, phase, "nsa")
            if failure and self.kept_row(cfg, batch, seqlen, phase, "nsa") is None:
                self.add_row(cfg, batch, seqlen, phase, "nsa", "error", note=failure)
            else:
                self.measure(cfg, batch, seqlen, phase, "nsa", None, built=built)
        built = None
        self.free()

        dense_backend = "cudnn" if s.device.type == "cuda" else "math"
        slow = (f"T > {self.plan.slow_baseline_max_t}: skipped to keep the run in its time limit"
                if seqlen > self.plan.slow_baseline_max_t else None)
        sides = [
            (self.ref["train"], partial(impls.build_sdpa, *args, backend=dense_backend), None),
            ("sdpa_flash", partial(impls.build_sdpa, *args, backend="flash"), slow),
            ("flex", partial(impls.build_flex, *args), slow),
        ]
        for phase in phases:
            for impl, build, skip in sides:
                tick(cfg, batch, seqlen, phase, impl)
                self.measure_dense(cfg, batch, seqlen, phase, impl, build, skip)
            if cfg.fla:
                tick(cfg, batch, seqlen, phase, "fla")
                self.measure(cfg, batch, seqlen, phase, "fla", partial(impls.build_fla, *args))

    def pair_case(self, phase, sides, cfg, batch, seqlen, tick):
        """The phases that time NSA against one dense twin (layer, decode, generate): sides are (impl, builder
        of (cfg, B, T, device, dtype)) pairs."""
        args = (cfg, batch, seqlen, self.s.device, self.s.dtype)
        for impl, build in sides:
            tick(cfg, batch, seqlen, phase, impl)
            self.measure(cfg, batch, seqlen, phase, impl, partial(build, *args))

    def jobs(self) -> list:
        """(function, config, B, T, number of progress ticks) in the order they run: by tokens, so that a run
        that spends its budget loses the longest cases of every phase rather than one phase entirely."""
        plan = self.plan
        n_train = sum(p in plan.phases for p in TRAINING)
        layer_lengths = plan.layer_seqlens or plan.seqlens
        layer = partial(self.pair_case, "layer", (("nsa_layer", impls.build_nsa_layer),
                                                  ("dense_layer", impls.build_dense_layer)))
        jobs = []
        for cfg, batch, seqlen in plan.cases():
            if n_train:
                ticks = 1 + n_train * (4 + cfg.fla)
                jobs.append((self.training_case, cfg, batch, seqlen, ticks))
            if "layer" in plan.phases and batch == 1 and not cfg.pooled and seqlen in layer_lengths:
                jobs.append((layer, cfg, batch, seqlen, 2))
        # A decode or generate case holds one new token per sequence: its size is its context.
        per_token = []
        if "decode" in plan.phases:
            layers = dict(layers=plan.decode_layers)
            decode = partial(self.pair_case, "decode", (("nsa_decode", partial(impls.build_nsa_decode, **layers)),
                                                        ("sdpa_decode", partial(impls.build_sdpa_decode, **layers))))
            per_token += [(decode, cfg, b, t, 2) for cfg, b, t in plan.decode_cases()]
        if "generate" in plan.phases:
            generate = partial(self.pair_case, "generate", tuple(
                (impl, partial(impls.build_generate, attn_impl=attn_impl, new_tokens=plan.generate_tokens,
                               overrides=plan.generate_model))
                for impl, attn_impl in (("nsa_generate", "nsa"), ("dense_generate", "dense"))))
            per_token += [(generate, cfg, b, t, 2) for cfg, b, t in plan.generate_cases()]
        sized = [(job, job[2] * job[3]) for job in jobs] + [(job, job[3]) for job in per_token]
        return [job for job, _ in sorted(sized, key=lambda item: item[1])]

    def run(self) -> dict:
        jobs = self.jobs()
        bar = _progress(sum(job[-1] for job in jobs))
        this_run = self.results["runs"][-1]
        this_run["ceilings"] = ceilings(self.s.device)
        self.save()

        def tick(cfg, batch, seqlen, phase, impl):
            bar.set_description(f"{cfg.name} B={batch} T={seqlen} {phase} {impl}")
            bar.update(1)

        for job, cfg, batch, seqlen, _ in jobs:
            job(cfg, batch, seqlen, tick)
            self.derive()
            this_run["elapsed_s"] = self.elapsed()
            self.save()
        bar.close()
        return self.results

    def derive(self) -> None:
        add_speedups(self.results["rows"], self.ref)
        add_fractions(self.results["rows"], self.results["runs"])


def _message(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"


def add_speedups(rows: list[dict], reference: dict) -> None:
    """speedup = the reference baseline's ms / the row's ms, within each (config, B, T, phase)."""
    ref_ms = {}
    for row in rows:
        kind = "train" if row["phase"] in TRAINING else row["phase"]
        if row["impl"] == reference.get(kind) and row["status"] == "ok":
            ref_ms[(row["config"], row["B"], row["T"], row["phase"])] = row["ms"]
    for row in rows:
        base = ref_ms.get((row["config"], row["B"], row["T"], row["phase"]))
        row["speedup"] = base / row["ms"] if base and row["status"] == "ok" and row["ms"] else None


def add_fractions(rows: list[dict], runs: list[dict]) -> None:
    """frac_matmul and frac_copy: the row's rate as a share of the ceilings measured by the row's own run."""
    for row in rows:
        ceil = runs[row["run"]]["ceilings"]
        row["frac_matmul"] = row["TFLOPs"] / ceil["matmul_TFLOPs"] if ceil and row["TFLOPs"] else None
        row["frac_copy"] = row["GBps"] / ceil["copy_GBps"] if ceil and row["GBps"] else None


def _progress(total: int):
    try:
        from tqdm import tqdm
    except ImportError:
        return _PlainProgress(total)
    return tqdm(total=total, file=sys.stderr, dynamic_ncols=True, leave=True)


class _PlainProgress:
    """Progress lines on stderr where tqdm is not installed."""

    def __init__(self, total: int):
        self.total, self.done, self.text = total, 0, ""

    def set_description(self, text: str) -> None:
        self.text = text

    def update(self, n: int) -> None:
        self.done += n
        print(f"[{self.done}/{self.total}] {self.text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


# Table columns: which side of a phase fills them (training, layer and decode name their sides differently).
ROLES = {"nsa": ("nsa", "nsa_layer", "nsa_decode", "nsa_generate"),
         "dense": ("sdpa_cudnn", "sdpa_math", "dense_layer", "sdpa_decode", "dense_generate"),
         "flash": ("sdpa_flash",), "flex": ("flex",), "fla": ("fla",)}
SHORT = {"skipped": "skip", "error": "ERR"}


def table(results: dict) -> str:
    """One line per (config, B, T, phase): NSA's and the dense reference's ms, every side's speedup over the
    reference, and NSA's rate, shares of the ceilings and peak memory. Every figure is in bench.json."""
    groups: dict[tuple, dict] = {}
    for r in results["rows"]:
        groups.setdefault((r["config"], r["B"], r["T"], r["phase"]), {})[r["impl"]] = r
    header = ("config", "B", "T", "phase", "NSA ms", "ref ms", "NSA x", "flash x", "flex x", "fla x", "TFLOP/s",
              "%mm", "%bw", "peak GB")
    lines = []
    for (config, batch, seqlen, phase), by_impl in groups.items():
        side = {role: next((by_impl[i] for i in impls if i in by_impl), None) for role, impls in ROLES.items()}

        def speed(row):
            if row is None:
                return ""
            return SHORT.get(row["status"]) or _fmt(row["speedup"], ".2f")

        nsa_row, ref_row = side["nsa"] or {}, side["dense"] or {}
        ms = lambda row: SHORT.get(row.get("status"), _fmt(row.get("ms"), ".3f")) if row else ""  # noqa: E731
        pct = lambda x: _fmt(x and 100 * x, ".0f")  # noqa: E731
        lines.append((config, str(batch), str(seqlen), phase, ms(nsa_row), ms(ref_row), speed(side["nsa"]),
                      speed(side["flash"]), speed(side["flex"]), speed(side["fla"]),
                      _fmt(nsa_row.get("TFLOPs"), ".1f"), pct(nsa_row.get("frac_matmul")),
                      pct(nsa_row.get("frac_copy")), _fmt(nsa_row.get("peak_GB"), ".1f")))
    widths = [max([len(h)] + [len(line[i]) for line in lines]) for i, h in enumerate(header)]
    render = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    env = results["runs"][0]["environment"]
    ref = results["reference_baseline"]
    ceils = [run["ceilings"] or {} for run in results["runs"]]
    out = [f"{env.get('gpu') or env.get('cpu')}  torch {env['torch']}  triton {env['triton']}  " + "; ".join(
               (f"run {i}: " if len(ceils) > 1 else "") + f"copy {_fmt(ceil.get('copy_GBps'), '.0f')} GB/s  "
               f"matmul {_fmt(ceil.get('matmul_TFLOPs'), '.0f')} TFLOP/s" for i, ceil in enumerate(ceils)),
           f"x = speedup over ref: {ref['train']} (layer: {ref['layer']}, decode: {ref['decode']}, "
           f"generate: {ref['generate']}); "
           "TFLOP/s, %mm (of matmul), %bw (of copy), peak GB are NSA's",
           render(header), render(["-" * w for w in widths])] + [render(line) for line in lines]
    errors = {}
    for r in results["rows"]:
        if r["status"] == "error":
            errors.setdefault(f"{r['impl']}: {r['note']}", []).append(f"{r['config']}/{r['T']}/{r['phase']}")
    for message, where in errors.items():
        out.append(f"ERR {message[:160]} [{len(where)} rows, first {where[0]}]")
    failed = [c for c in results["checks"] if c["impl"] == "nsa" and not c.get("passed")]
    if failed:
        out.append(f"correctness guard FAILED for {len(failed)} case(s): " +
                   ", ".join(f"{c['config']} B={c['B']} T={c['T']}" for c in failed))
    return "\n".join(out)


def settings(device: torch.device, args) -> Settings:
    cuda = device.type == "cuda"
    backend = args.backend or ("triton" if cuda else "reference")
    return Settings(device, torch.bfloat16 if cuda else torch.float32, backend, args.warmup, args.rep, args.budget,
                    args.out)


def select_plan(plan: Plan, args) -> Plan:
    """The plan narrowed by --configs, --seqlens and --phases, with --decode-layers."""
    changes = {}
    if args.configs:
        names = set(args.configs)
        unknown = names - {c.name for c in plan.configs}
        if unknown:
            raise SystemExit(f"unknown configs {sorted(unknown)}; this mode has {[c.name for c in plan.configs]}")
        changes["configs"] = tuple(c for c in plan.configs if c.name in names)
    if args.seqlens:
        changes["seqlens"] = tuple(args.seqlens)
        changes["decode_contexts"] = tuple(args.seqlens)
        changes["generate_contexts"] = tuple(args.seqlens)
        changes["layer_seqlens"] = None
    if args.phases:
        changes["phases"] = tuple(args.phases)
    if args.decode_layers is not None:
        if args.decode_layers < 1:
            raise SystemExit(f"--decode-layers must be at least 1, got {args.decode_layers}")
        changes["decode_layers"] = args.decode_layers
    return dataclasses.replace(plan, **changes)


def run(args) -> dict:
    """`nsa bench`: run the plan the arguments select, print the table, write JSON and plots to --out."""
    if args.merge:
        results = merge_runs(args.merge)
    else:
        cuda = torch.cuda.is_available() and not args.tiny
        mode = "tiny" if not cuda else ("quick" if args.quick else "full")
        device = torch.device("cuda" if cuda else "cpu")
        if not cuda:
            print("no GPU (or --tiny): a tiny pass on the reference backend, which exercises the harness only",
                  file=sys.stderr)
        if args.budget is None:
            args.budget = {"full": 480.0, "quick": 100.0, "tiny": 120.0}[mode]
        plan = select_plan(make_plan(mode), args)
        earlier = load_runs(args.resume) if args.resume else None
        results = Runner(plan, mode, settings(device, args), earlier, args.resume).run()
    if args.out:
        from .plots import plot_all

        os.makedirs(args.out, exist_ok=True)
        results["plots"] = plot_all(results, args.out)
        with open(os.path.join(args.out, "bench.json"), "w") as f:
            json.dump(results, f, indent=1, default=str)
    print(table(results))
    return results
