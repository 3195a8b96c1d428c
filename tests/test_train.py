"""`nsa train` on the CPU: data splits, loss going down for both models, bitwise resume, the retrieval evals."""

import json
import os
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("transformers")

from nsa import data, evals, train  # noqa: E402
from nsa.cli import main  # noqa: E402

# Smaller than the tiny preset, so that every test here runs in seconds.
SMALL = train.TrainConfig(seqlen=96, batch_size=2, steps=6, lr=1e-2, min_lr=1e-3, warmup=2, eval_interval=3,
                          eval_batches=1, ckpt_interval=2, eval_samples=2, eval_multiples=(1, 2),
                          model=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=1, head_dim=32),
                          sparsity=dict(cmp_block=8, cmp_stride=4, slc_block=16, num_selected=4, window=16))


@pytest.fixture(scope="module")
def splits():
    return data.load("pydoc")


def test_split_is_held_out(splits):
    docs = data.documents("pydoc")
    stream = torch.cat([splits.train, splits.val])
    assert len(stream) == sum(len(d) + 1 for d in docs)
    assert int((stream == data.SEP).sum()) == len(docs)
    assert 0.04 < len(splits.val) / len(stream) < 0.06
    # The validation split is the stream's tail, byte for byte, and training crops come from the head only.
    assert bytes(splits.val[:200].tolist()) in b"".join(docs)[-len(splits.val) - len(docs):]
    x, y = data.get_batch(splits.train, 4, 32, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 32) and torch.equal(x[:, 1:], y[:, :-1])
    assert data.decode(data.encode("pass key 42")) == "pass key 42"


@pytest.mark.parametrize("attn_impl", ["nsa", "dense"])
def test_loss_decreases(attn_impl, splits, tmp_path):
    history = train.train_model(SMALL, attn_impl, splits, str(tmp_path), torch.device("cpu"))
    losses = [r["loss"] for r in history["train"]]
    assert len(losses) == SMALL.steps and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.3
    assert history["val"][-1]["step"] == SMALL.steps and history["val"][-1]["loss"] < history["val"][0]["loss"]


def test_resume_is_bitwise(splits, tmp_path):
    cpu = torch.device("cpu")
    whole = train.train_model(SMALL, "nsa", splits, str(tmp_path / "whole"), cpu)
    train.train_model(SMALL, "nsa", splits, str(tmp_path / "cut"), cpu, stop_at=3)
    resumed = train.train_model(SMALL, "nsa", splits, str(tmp_path / "cut"), cpu, resume=True)
    assert [r["loss"] for r in resumed["train"]] == [r["loss"] for r in whole["train"]]
    assert [r["loss"] for r in resumed["val"]] == [r["loss"] for r in whole["val"]]
    for name, p in whole["model"].state_dict().items():
        assert torch.equal(p, resumed["model"].state_dict()[name]), name


def test_tasks_are_well_formed(splits):
    gen = torch.Generator().manual_seed(0)
    for task in (evals.passkey(splits.val, 200, 3, gen), evals.mqar(200, 3, gen)):
        assert task.tokens.shape == (3, 200)
        assert torch.equal(task.tokens.gather(1, task.positions), task.answers)
        assert ((task.answers >= ord("0")) & (task.answers <= ord("9"))).all()
    sample = evals.passkey(splits.val, 300, 1, gen)
    text = data.decode(sample.tokens[0].tolist())
    assert text.count(data.decode(sample.answers[0].tolist())) >= 2


class _NextTokenOracle(torch.nn.Module):
    """A 'model' whose argmax at every position is the next input token: scores 1.0 when the positions are right."""

    def __init__(self):
        super().__init__()
        self.lm_head = torch.nn.Linear(data.VOCAB_SIZE, data.VOCAB_SIZE, bias=False)
        self.lm_head.weight.data = torch.eye(data.VOCAB_SIZE)
        self.model = lambda input_ids, use_cache: SimpleNamespace(
            last_hidden_state=torch.nn.functional.one_hot(input_ids.roll(-1, 1), data.VOCAB_SIZE).float())


def test_evals_score(splits):
    oracle = evals.evaluate(_NextTokenOracle(), splits.val, [96, 192], num_samples=3)
    assert all(r["accuracy"] == 1.0 for task in oracle.values() for r in task.values())
    model, _ = train.build(SMALL, "nsa", torch.device("cpu"))
    scores = evals.evaluate(model, splits.val, [96, 192], num_samples=2)
    assert set(scores) == {"passkey", "mqar"} and set(scores["passkey"]) == {96, 192}
    assert all(0.0 <= v <= 1.0 for task in scores.values() for r in task.values() for v in r.values())


def test_cli_writes_results(tmp_path, monkeypatch):
    monkeypatch.setitem(train.PRESETS, "tiny", train.TrainConfig(**{**SMALL.__dict__, "steps": 2}))
    out = str(tmp_path / "run")
    main(["train", "--out", out])
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    assert results["commands"] == [f"nsa train --preset tiny --attn both --out {out}"]
    assert set(results["models"]) == {"nsa", "dense"}
    assert all(run["tokens_per_second"] > 0 for run in results["models"].values())
    for name in ("loss.png", "retrieval.png", "ckpt_nsa.pt", "ckpt_dense.pt"):
        assert os.path.getsize(os.path.join(out, name)) > 0


def test_two_processes_fill_one_results_file(tmp_path, monkeypatch):
    """--attn nsa and --attn dense with one --out (one per GPU, say): one results.json with both models, each
    naming its command; a run of another configuration replaces the file instead of mixing with it."""
    monkeypatch.setitem(train.PRESETS, "tiny", train.TrainConfig(**{**SMALL.__dict__, "steps": 2}))
    out = str(tmp_path / "run")
    for attn in ("dense", "nsa"):
        main(["train", "--attn", attn, "--out", out])
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    assert list(results["models"]) == ["nsa", "dense"]
    commands = [f"nsa train --preset tiny --attn {attn} --out {out}" for attn in ("dense", "nsa")]
    assert results["commands"] == commands
    assert [run["command"] for run in results["models"].values()] == commands[::-1]
    main(["train", "--attn", "nsa", "--steps", "1", "--out", out])
    with open(os.path.join(out, "results.json")) as f:
        assert list(json.load(f)["models"]) == ["nsa"]


def test_demo_trains_the_tiny_preset(tmp_path, monkeypatch):
    monkeypatch.setitem(train.PRESETS, "tiny", train.TrainConfig(**{**SMALL.__dict__, "steps": 2}))
    picture, out = str(tmp_path / "demo.png"), str(tmp_path / "train")
    main(["demo", "--out", picture, "--seqlen", "256", "--train-out", out])
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    assert os.path.getsize(picture) > 0 and set(results["models"]) == {"nsa", "dense"}
    assert results["commands"] == [f"nsa train --preset tiny --attn both --out {out}"]


@pytest.mark.parametrize("preset,seqlen", [("gpu", 8192), ("gpu32k", 32768)])
def test_gpu_presets_are_sized_for_ten_minutes_with_both_models(preset, seqlen):
    cfg = train.PRESETS[preset]
    minutes = 0.0
    for attn_impl in ("nsa", "dense"):
        mc = train.model_config(cfg, attn_impl)
        assert mc.vocab_size == data.VOCAB_SIZE and cfg.seqlen == seqlen
        with torch.device("meta"):
            from nsa.models import NSAForCausalLM

            num_params = sum(p.numel() for p in NSAForCausalLM(mc).parameters())
        assert num_params > 100e6, (attn_impl, num_params)
        minutes += train.estimate(cfg, mc, num_params)["seconds_at_assumed_rate"] / 60
    assert 1 < minutes < 8, minutes
