"""`nsa bench` end to end: the tiny pass on the reference writes a complete JSON and the plots."""

import json
import os
import subprocess
import sys

import pytest
import torch

from nsa.bench import impls, main
from nsa.bench.configs import FULL_CONFIGS, PHASES, TINY_CONFIGS, dense_flops, make_plan, nsa_flops
from nsa.bench.suite import Runner, spent


def test_tiny_pass_writes_json_and_plots(tmp_path, capsys):
    main(["--tiny", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["mode"] == "tiny" and report["nsa_backend"] == "reference"
    (run,) = report["runs"]
    assert {"torch", "triton", "python"} <= run["environment"].keys()
    assert len(run["environment"]["source"]) == 16  # the sources' digest names the code that ran
    assert run["ceilings"]["copy_GBps"] > 0 and run["ceilings"]["matmul_TFLOPs"] > 0
    assert {"timing", "flops", "bytes", "guard"} <= report["methodology"].keys()

    checks = [c for c in report["checks"] if c["impl"] == "nsa"]
    assert checks and all(c["passed"] for c in checks)
    rows = report["rows"]
    assert all(r["status"] in ("ok", "skipped") for r in rows), [r for r in rows if r["status"] == "error"]
    timed = {(r["config"], r["phase"], r["impl"]) for r in rows if r["status"] == "ok"}
    for config in ("paper", "d128", "g4", "fla"):
        for phase in ("fwd", "bwd", "fwdbwd"):
            assert (config, phase, "nsa") in timed and (config, phase, "sdpa_math") in timed
    assert ("paper", "layer", "nsa_layer") in timed and ("paper", "decode", "nsa_decode") in timed
    generated = [r for r in rows if r["phase"] == "generate"]
    assert {r["impl"] for r in generated if r["status"] == "ok"} == {"nsa_generate", "dense_generate"}
    assert all(r["tokens_per_s"] > 0 and r["prefill_ms"] > 0 for r in generated)
    for r in rows:
        if r["status"] == "ok":
            assert r["ms"] > 0 and r["speedup"] > 0
        if r["status"] == "ok" and r["phase"] in ("fwd", "bwd", "fwdbwd"):
            assert r["TFLOPs"] > 0 and r["frac_copy"] > 0
    assert any(r["B"] > 1 for r in rows if r["phase"] == "fwd")
    skipped = {r["impl"]: r["note"] for r in rows if r["status"] == "skipped"}
    assert "needs CUDA" in skipped["flex"] and "needs CUDA" in skipped["fla"]

    assert set(report["plots"]) == {f"speedup_{p}.png" for p in PHASES}
    for name in report["plots"]:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out
    assert "speedup over" in table and "sdpa_math" in table


def test_decode_layers(tmp_path, capsys):
    """--decode-layers L: each call runs L decode steps on L sets of inputs (the last step's output is the one-step
    call's on the last set), and a row's time is per step; L = 1 leaves the methodology as before."""
    cfg = next(c for c in TINY_CONFIGS if c.name == "paper")
    cpu = torch.device("cpu")
    for build in (impls.build_nsa_decode, impls.build_sdpa_decode):
        one, two = build(cfg, 2, 128, cpu, torch.float32), build(cfg, 2, 128, cpu, torch.float32, layers=2)
        width = len(one.inputs[0])
        assert (one.layers, two.layers, len(two.inputs[0])) == (1, 2, 2 * width)
        first, last = two.inputs[0][:width], two.inputs[0][width:]
        assert not torch.equal(first[0], last[0])
        torch.testing.assert_close(two.fn(*two.inputs[0]), one.fn(*last))
        assert "2 layers' steps per call" in two.note and "layers'" not in one.note

    report = main(["--tiny", "--phases", "decode", "--decode-layers", "2", "--out", str(tmp_path)])
    rows = [r for r in report["rows"] if r["phase"] == "decode"]
    assert rows and all(r["status"] == "ok" and r["layers"] == 2 and r["ms"] > 0 for r in rows)
    assert "2 layers' steps on their own caches per graph" in report["methodology"]["timing"]
    one_layer = main(["--tiny", "--phases", "decode"])
    assert "layers'" not in one_layer["methodology"]["timing"]
    assert all(r["layers"] == 1 for r in one_layer["rows"] if r["phase"] == "decode" and r["status"] == "ok")
    with pytest.raises(SystemExit, match="at least 1"):
        main(["--tiny", "--phases", "decode", "--decode-layers", "0"])


@pytest.mark.parametrize("mode", ["full", "quick"])
def test_gpu_plans(mode):
    plan = make_plan(mode)
    lengths = {t for _, _, t in plan.cases()}
    assert {8192, 65536} <= lengths
    assert "fla" in {c.name for c in plan.configs} and "paper" in {c.name for c in plan.configs}
    # generate() of the 1B model at a 32k-token prompt, against its dense twin.
    assert (plan.generate_contexts, plan.generate_model) == ((32768,), ())


def test_flop_counts():
    paper = FULL_CONFIGS[0]
    fwd, bwd = dense_flops(paper, 1, 4)
    assert fwd == 2 * 64 * 10 * 320 and bwd == int(2.5 * fwd)
    # At 64k every query past the first blocks attends at most 16 * 64 selected keys, 512 window keys and
    # about t / 16 compressed tokens: a small share of the dense causal work.
    sparse, dense = nsa_flops(paper, 1, 65536)[0], dense_flops(paper, 1, 65536)[0]
    assert 0.1 < sparse / dense < 0.2
    # One query at t = 0: a single selected key, a single window key, no compressed token.
    assert nsa_flops(paper, 1, 1)[0] == 64 * 2 * 320 * 2


def test_resume_completes_a_run_cut_short(tmp_path, monkeypatch, capsys):
    first, merged = tmp_path / "first", tmp_path / "merged"
    # The budget runs out after the first dozen rows: the rest are left "skipped" for the budget.
    monkeypatch.setattr(Runner, "out_of_time", lambda self: len(self.results["rows"]) >= 12)
    main(["--tiny", "--out", str(first)])
    monkeypatch.undo()
    cut = json.loads((first / "bench.json").read_text())
    kept = [r for r in cut["rows"] if not spent(r)]
    assert len(kept) >= 12 and any(spent(r) for r in cut["rows"])

    main(["--tiny", "--out", str(merged), "--resume", str(first / "bench.json")])
    report = json.loads((merged / "bench.json").read_text())
    cases = [(r["config"], r["B"], r["T"], r["phase"], r["impl"]) for r in report["rows"]]
    assert len(cases) == len(set(cases)) == len(cut["rows"])
    assert not any(spent(r) for r in report["rows"])
    assert len(report["runs"]) == 2 and report["runs"][0] == cut["runs"][0]
    assert all(run["ceilings"]["matmul_TFLOPs"] > 0 for run in report["runs"])
    by_case = {(r["config"], r["B"], r["T"], r["phase"], r["impl"]): r for r in report["rows"]}
    for row in kept:
        # A speedup is a ratio to the reference row, which the second run may have measured; the rest is as kept.
        again = by_case[(row["config"], row["B"], row["T"], row["phase"], row["impl"])]
        assert {k: v for k, v in again.items() if k != "speedup"} == {k: v for k, v in row.items() if k != "speedup"}
    assert {r["run"] for r in report["rows"]} == {0, 1}
    for row in report["rows"]:
        ceil = report["runs"][row["run"]]["ceilings"]
        if row["TFLOPs"]:
            assert row["frac_matmul"] == row["TFLOPs"] / ceil["matmul_TFLOPs"]
    assert set(report["plots"]) == {f"speedup_{p}.png" for p in PHASES}
    for name in report["plots"]:
        assert (merged / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "run 1: copy" in capsys.readouterr().out

    cut["runs"][0]["environment"]["torch"] = "0.0"
    (tmp_path / "other.json").write_text(json.dumps(cut))
    with pytest.raises(SystemExit, match="torch: 0.0 there"):
        main(["--tiny", "--resume", str(tmp_path / "other.json")])


def test_merge_joins_runs_that_split_the_plan(tmp_path, monkeypatch, capsys):
    """A run cut short, resumed by two runs with disjoint --configs (one per GPU, say), merged into one table."""
    cut, parts, merged = tmp_path / "cut", [tmp_path / "a", tmp_path / "b"], tmp_path / "merged"
    monkeypatch.setattr(Runner, "out_of_time", lambda self: len(self.results["rows"]) >= 12)
    main(["--tiny", "--out", str(cut)])
    monkeypatch.undo()
    first = json.loads((cut / "bench.json").read_text())
    left = {r["config"] for r in first["rows"] if spent(r)}
    assert {"g4", "fla"} & left and {"paper", "d128"} & left
    for part, configs in zip(parts, ("paper,d128", "g4,fla")):
        main(["--tiny", "--out", str(part), "--resume", str(cut / "bench.json"), "--configs", configs])
    main(["--merge", str(parts[0] / "bench.json"), str(parts[1] / "bench.json"), "--out", str(merged)])
    report = json.loads((merged / "bench.json").read_text())
    cases = [(r["config"], r["B"], r["T"], r["phase"], r["impl"]) for r in report["rows"]]
    assert len(cases) == len(set(cases)) == len(first["rows"])
    assert not any(spent(r) for r in report["rows"])
    # The cut run once, then one run per part; each row names the run that measured it.
    assert len(report["runs"]) == 3 and report["runs"][0] == first["runs"][0]
    assert {r["run"] for r in report["rows"]} == {0, 1, 2}
    assert {r["config"] for r in report["rows"] if r["run"] == 2} <= {"g4", "fla"}
    assert all(r["speedup"] > 0 for r in report["rows"] if r["status"] == "ok")
    assert set(report["plots"]) == {f"speedup_{p}.png" for p in PHASES}
    assert "run 2: copy" in capsys.readouterr().out

    # Two different measurements of one case cannot stand in one table.
    other = json.loads((parts[1] / "bench.json").read_text())
    row = next(r for r in other["rows"] if r["status"] == "ok" and r["run"] == 0)
    row["ms"] *= 2
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="measured in two"):
        main(["--merge", str(parts[0] / "bench.json"), str(tmp_path / "other.json")])


def test_bench_split_runs_one_process_per_group_and_merges(tmp_path):
    """benchmarks/bench_split.sh (here the tiny pass on the CPU): one part per configuration group, one merged table."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHON": sys.executable, "RESUME": "", "BUDGET": "100"}
    subprocess.run(["bash", os.path.join(root, "benchmarks", "bench_split.sh"), str(tmp_path), "paper", "g4"],
                   cwd=root, env=env, check=True, capture_output=True, timeout=900)
    report = json.loads((tmp_path / "bench.json").read_text())
    parts = [json.loads((tmp_path / f"part{i}" / "bench.json").read_text()) for i in range(2)]
    assert len(report["runs"]) == 2 and {r["run"] for r in report["rows"]} == {0, 1}
    assert len(report["rows"]) == sum(len(part["rows"]) for part in parts)
    assert {r["config"] for r in report["rows"] if r["phase"] == "fwd"} == {"paper", "g4"}
