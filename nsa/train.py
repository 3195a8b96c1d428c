"""`nsa train`: NSAForCausalLM and its dense twin trained on the same bytes, then compared on long-context retrieval.

Both models share every size, the data order (crops drawn from a generator seeded per step), the token budget and
the optimizer: AdamW with linear warmup and cosine decay, gradient clipping, bf16 autocast on a GPU. A checkpoint
(model, optimizer, step, history) is written every `ckpt_interval` steps; `--resume` continues from it and, since the
data depend only on the step, reproduces the uninterrupted run. After training, each model is scored on passkey
retrieval and MQAR at 1x, 2x and 4x the training context (nsa/evals.py). results.json, loss.png and retrieval.png
go into --out, with the command that made them.

Presets: "tiny" (the default) runs both models on a CPU in a couple of minutes; "gpu" is a ~100M model at an
8192-token context, sized by its FLOP count so that both models and their evaluations take about ten minutes on
an H200; "gpu32k" the same models at a 32768-token context.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import data, evals
from .config import SparsityConfig

# Dense bf16 throughput assumed for the time estimate: a fair effective rate for a 100M model on an H200.
ASSUMED_FLOPS = 300e12


@dataclass
class TrainConfig:
    """One run. `model` holds NSAConfig's size fields, `sparsity` SparsityConfig's; tokens per step are
    batch_size * grad_accum * seqlen."""

    corpus: str = "pydoc"
    seqlen: int = 256
    batch_size: int = 4
    grad_accum: int = 1
    steps: int = 100
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup: int = 10
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_interval: int = 20
    eval_batches: int = 4
    ckpt_interval: int = 50
    grad_checkpointing: bool = False
    eval_samples: int = 8
    eval_multiples: tuple = (1, 2, 4)
    seed: int = 0
    model: dict = field(default_factory=lambda: dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                                                     num_attention_heads=4, num_key_value_heads=2, head_dim=32))
    sparsity: dict = field(default_factory=lambda: dict(cmp_block=8, cmp_stride=4, slc_block=16, num_selected=4,
                                                        window=32))


PRESETS = {
    "tiny": TrainConfig(),
    # nsa_100m's width and heads with 14 layers and a 2560-wide MLP (102M dense and 112M NSA parameters with the
    # byte vocabulary), the paper's sparsity knobs, 16 sequences of 8192 tokens a step. 150 steps = 19.7M tokens,
    # so that both models and their evaluations fit one ten-minute run on an H200: a 3-step probe there trained
    # dense at ~2.5 s and NSA at up to ~6 s per 524k tokens (compilation included).
    "gpu": TrainConfig(corpus="stdlib", seqlen=8192, batch_size=8, grad_accum=2, steps=150, lr=1.5e-3, min_lr=1.5e-4,
                       warmup=15, eval_interval=25, eval_batches=8, ckpt_interval=75, eval_samples=32,
                       model=dict(num_hidden_layers=14, intermediate_size=2560), sparsity={}),
}
# The same models at a 32768-token context, where NSA's kernels outrun cuDNN's (`nsa bench`): 4 sequences a step,
# 100 steps = 13.1M tokens, evaluated at 32k, 64k and 128k; sized by FLOPs to fit one ten-minute run as well.
PRESETS["gpu32k"] = dataclasses.replace(PRESETS["gpu"], seqlen=32768, batch_size=2, grad_accum=2, steps=100,
                                        eval_interval=20, eval_batches=4, ckpt_interval=50, eval_samples=16)


def model_config(cfg: TrainConfig, attn_impl: str):
    from .models import NSAConfig

    return NSAConfig.nsa_100m(**cfg.model, vocab_size=data.VOCAB_SIZE, bos_token_id=data.SEP,
                              eos_token_id=data.SEP, max_position_embeddings=cfg.seqlen, attn_impl=attn_impl,
                              sparsity=SparsityConfig(**cfg.sparsity))


def attended_keys(mc, seqlen: int) -> float:
    """Keys a query attends to, averaged over the positions of a sequence: causal dense, or NSA's three branches
    (compressed tokens visible, selected blocks, window)."""
    t = torch.arange(1, seqlen + 1, dtype=torch.float64)
    if mc.attn_impl == "dense":
        return t.mean().item()
    s = mc.sparsity
    cmp = ((t - s.cmp_block) // s.cmp_stride + 1).clamp_min(0)
    slc = torch.minimum(torch.ceil(t / s.slc_block), torch.tensor(float(s.num_selected))) * s.slc_block
    return (cmp + torch.minimum(slc, t) + t.clamp_max(s.window)).mean().item()


def estimate(cfg: TrainConfig, mc, num_params: int) -> dict:
    """Training FLOPs: 6 per parameter per token, plus attention's QK^T and PV (2 * keys * (DK + DV) per head
    forward, three times that with the backward) in every layer."""
    keys = attended_keys(mc, cfg.seqlen)
    attn = 6 * keys * mc.num_attention_heads * (mc.head_dim + mc.v_head_dim) * mc.num_hidden_layers
    per_token = 6 * num_params + attn
    tokens = cfg.steps * cfg.batch_size * cfg.grad_accum * cfg.seqlen
    return {"flops_per_token": per_token, "tokens": tokens, "flops": per_token * tokens,
            "seconds_at_assumed_rate": per_token * tokens / ASSUMED_FLOPS, "assumed_flops": ASSUMED_FLOPS}


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warmup to lr over `warmup` steps, then cosine decay to min_lr at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def step_generator(cfg: TrainConfig, step: int, micro: int) -> torch.Generator:
    """The data of (step, micro-batch) alone: what makes a resumed run draw the crops the uninterrupted one would."""
    return torch.Generator().manual_seed((cfg.seed * 1_000_003 + step) * 1_009 + micro)


def build(cfg: TrainConfig, attn_impl: str, device: torch.device):
    """The model (seeded, so a run starts from the same weights) and AdamW, decay on matrices only."""
    from .models import NSAForCausalLM

    torch.manual_seed(cfg.seed)
    model = NSAForCausalLM(model_config(cfg, attn_impl)).to(device)
    if cfg.grad_checkpointing:
        # transformers >= 5.2x renamed gradient_checkpointing_enable (the old name now warns).
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    return model, opt


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    return torch.bfloat16 if device.type == "cuda" else None


def lm_loss(model, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Mean next-byte cross entropy of inputs x [B, T] against targets y [B, T]."""
    dtype = autocast_dtype(device)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        logits = model(input_ids=x.to(device), use_cache=False).logits
    return F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten())


@torch.no_grad()
def val_loss(model, cfg: TrainConfig, val: torch.Tensor, device: torch.device) -> float:
    """Mean loss over the same eval_batches crops of the validation split at every evaluation."""
    model.eval()
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    losses = [lm_loss(model, *data.get_batch(val, cfg.batch_size, cfg.seqlen, gen), device).item()
              for _ in range(cfg.eval_batches)]
    model.train()
    return sum(losses) / len(losses)


def train_step(model, opt, cfg: TrainConfig, train: torch.Tensor, step: int, device: torch.device) -> float:
    """One optimizer step over grad_accum micro-batches; returns the mean training loss."""
    for group in opt.param_groups:
        group["lr"] = lr_at(cfg, step)
    total = 0.0
    for micro in range(cfg.grad_accum):
        x, y = data.get_batch(train, cfg.batch_size, cfg.seqlen, step_generator(cfg, step, micro))
        loss = lm_loss(model, x, y, device) / cfg.grad_accum
        loss.backward()
        total += loss.item()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return total


def _progress(total: int, initial: int, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc=desc, file=sys.stderr, dynamic_ncols=True)


def save_checkpoint(path: str, model, opt, step: int, history: dict, cfg: TrainConfig) -> None:
    tmp = path + ".tmp"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "history": history,
                "config": dataclasses.asdict(cfg)}, tmp)
    os.replace(tmp, path)  # a run killed mid-write keeps the previous checkpoint


def train_model(cfg: TrainConfig, attn_impl: str, splits: data.Splits, out: str, device: torch.device,
                resume: bool = False, stop_at: int | None = None) -> dict:
    """Train one model to cfg.steps (or stop after `stop_at` steps, checkpointed, as an interrupted run would) and
    return its history: {"train": [{step, tokens, loss, lr}], "val": [{step, tokens, loss}], "seconds", ...}."""
    os.makedirs(out, exist_ok=True)
    model, opt = build(cfg, attn_impl, device)
    num_params = sum(p.numel() for p in model.parameters())
    ckpt = os.path.join(out, f"ckpt_{attn_impl}.pt")
    history = {"train": [], "val": [], "seconds": 0.0, "num_params": num_params,
               "estimate": estimate(cfg, model.config, num_params)}
    step = 0
    if resume and os.path.exists(ckpt):
        state = torch.load(ckpt, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, history = state["step"], state["history"]
        print(f"{attn_impl}: resumed at step {step} from {ckpt}", file=sys.stderr)
    est = history["estimate"]
    print(f"{attn_impl}: {num_params / 1e6:.1f}M parameters, {est['tokens']:,} tokens, {est['flops']:.3g} FLOPs: "
          f"~{est['seconds_at_assumed_rate'] / 60:.1f} min at {ASSUMED_FLOPS / 1e12:.0f} TFLOP/s", file=sys.stderr)
    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seqlen
    last = cfg.steps if stop_at is None else min(cfg.steps, stop_at)
    bar = _progress(cfg.steps, step, attn_impl)
    model.train()
    start = time.perf_counter() - history["seconds"]
    while step < last:
        if step % cfg.eval_interval == 0:
            history["val"].append({"step": step, "tokens": step * tokens_per_step,
                                   "loss": val_loss(model, cfg, splits.val, device)})
        t0 = time.perf_counter()
        loss = train_step(model, opt, cfg, splits.train, step, device)  # ends in .item(): the step is done
        step += 1
        history["train"].append({"step": step, "tokens": step * tokens_per_step, "loss": loss,
                                 "lr": lr_at(cfg, step - 1), "seconds": time.perf_counter() - t0})
        history["seconds"] = time.perf_counter() - start
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", val=f"{history['val'][-1]['loss']:.3f}")
        if step % cfg.ckpt_interval == 0 or step == last:
            save_checkpoint(ckpt, model, opt, step, history, cfg)
    if bar is not None:
        bar.close()
    if step == cfg.steps and (not history["val"] or history["val"][-1]["step"] != step):
        history["val"].append({"step": step, "tokens": step * tokens_per_step,
                               "loss": val_loss(model, cfg, splits.val, device)})
        save_checkpoint(ckpt, model, opt, step, history, cfg)
    history["tokens_per_second"] = throughput(history["train"], tokens_per_step)
    history["model"] = model
    return history


def throughput(train: list[dict], tokens_per_step: int) -> float | None:
    """Training tokens per second: the median step after the first three, which compile and autotune (a shorter
    run: the median of all its steps)."""
    times = sorted(r["seconds"] for r in (train[3:] if len(train) > 3 else train) if "seconds" in r)
    return tokens_per_step / times[len(times) // 2] if times else None


def plot(results: dict, out: str) -> list[str]:
    """loss.png (train and validation loss against tokens) and retrieval.png (accuracy against context length)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (name, run) in enumerate(results["models"].items()):
        train = run["train"]
        ax.plot([r["tokens"] for r in train], [r["loss"] for r in train], color=f"C{i}", alpha=0.35, lw=0.8,
                label=f"{name} train")
        ax.plot([r["tokens"] for r in run["val"]], [r["loss"] for r in run["val"]], color=f"C{i}", marker="o",
                ms=3, label=f"{name} validation")
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats per byte)")
    ax.set_title(f"{results['preset']} preset, corpus {results['config']['corpus']}, context {results['config']['seqlen']}",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "loss.png"), dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, task, metric in ((axes[0], "passkey", "passkey retrieval (all 5 digits)"),
                             (axes[1], "mqar", "MQAR (queried values right)")):
        for i, (name, run) in enumerate(results["models"].items()):
            points = sorted((int(length), r["accuracy"]) for length, r in run["evals"][task].items())
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", color=f"C{i}", label=name)
        ax.axvline(results["config"]["seqlen"], color="gray", ls="--", lw=1, label="training context")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length")
        ax.set_title(metric, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("accuracy")
    axes[0].set_ylim(-0.03, 1.03)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "retrieval.png"), dpi=110)
    plt.close(fig)
    return ["loss.png", "retrieval.png"]


def write_results(results: dict, out: str) -> dict:
    """results.json and the plots in `out`, with the models that another `nsa train` wrote there under the same
    configuration (say `--attn nsa` and `--attn dense` on two GPUs with one --out): read, merged and written under
    a file lock, so that two processes finishing together both stay in. Returns the merged results."""
    path = os.path.join(out, "results.json")
    with open(os.path.join(out, ".results.lock"), "w") as lock:
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        except ImportError:  # no POSIX locks (Windows): one process per --out
            pass
        if os.path.exists(path):
            with open(path) as f:
                earlier = json.load(f)
            same = {k: results[k] for k in ("preset", "config")}
            if {k: earlier.get(k) for k in same} == json.loads(json.dumps(same)):  # as JSON: tuples read as lists
                others = {k: v for k, v in earlier["models"].items() if k not in results["models"]}
                models = {**others, **results["models"]}
                results = {**results, "models": {k: models[k] for k in sorted(models, key=("nsa", "dense").index)},
                           "commands": list(dict.fromkeys(earlier["commands"] + results["commands"]))}
            else:
                print(f"{path} came from another configuration: replaced", file=sys.stderr)
        results["plots"] = plot(results, out)
        with open(path + ".tmp", "w") as f:
            json.dump(results, f, indent=1)
        os.replace(path + ".tmp", path)
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `nsa train`."""
    parser.add_argument("--preset", choices=tuple(PRESETS), default="tiny",
                        help="tiny: both models on a CPU in a couple of minutes; gpu: ~100M at 8k context, "
                             "both models in about ten minutes on an H200; gpu32k: the same at 32k context")
    parser.add_argument("--attn", choices=("both", "nsa", "dense"), default="both", help="which model(s) to train")
    parser.add_argument("--out", default="train_out", metavar="DIR",
                        help="checkpoints, results.json, loss.png and retrieval.png go here")
    parser.add_argument("--steps", type=int, help="override the preset's optimizer steps")
    parser.add_argument("--corpus", choices=data.CORPORA, help="override the preset's corpus")
    parser.add_argument("--grad-checkpointing", action="store_true", help="recompute each layer in the backward")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    parser.add_argument("--device", help="default: cuda where there is one, else cpu")


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run, every option spelled out."""
    parts = ["nsa", "train", "--preset", args.preset, "--attn", args.attn, "--out", args.out]
    for name in ("steps", "corpus", "device"):
        if getattr(args, name) is not None:
            parts += [f"--{name}", str(getattr(args, name))]
    parts += [flag for flag, on in (("--grad-checkpointing", args.grad_checkpointing), ("--resume", args.resume)) if on]
    return shlex.join(parts)


def run(args: argparse.Namespace) -> dict:
    """`nsa train`: train the chosen models, evaluate them, write results.json and the plots into --out."""
    cfg = dataclasses.replace(PRESETS[args.preset])
    if args.steps is not None:
        cfg.steps = args.steps
    if args.corpus is not None:
        cfg.corpus = args.corpus
    cfg.grad_checkpointing = cfg.grad_checkpointing or args.grad_checkpointing
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    splits = data.load(cfg.corpus)
    print(splits.describe(), file=sys.stderr)
    lengths = [m * cfg.seqlen for m in cfg.eval_multiples]
    command = command_line(args)
    results = {"commands": [command], "preset": args.preset, "config": dataclasses.asdict(cfg),
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "models": {}}
    for attn_impl in (("nsa", "dense") if args.attn == "both" else (args.attn,)):
        run_ = train_model(cfg, attn_impl, splits, args.out, device, resume=args.resume)
        model = run_.pop("model")
        run_["command"] = command
        run_["evals"] = evals.evaluate(model, splits.val, lengths, cfg.eval_samples, cfg.seed, autocast_dtype(device))
        results["models"][attn_impl] = run_
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        final = run_["val"][-1]["loss"]
        summary = ", ".join(f"{length}: passkey {r['accuracy']:.2f} mqar {run_['evals']['mqar'][length]['accuracy']:.2f}"
                            for length, r in run_["evals"]["passkey"].items())
        rate = run_["tokens_per_second"]
        print(f"{attn_impl}: validation loss {final:.4f} after {run_['seconds']:.0f} s "
              f"({'?' if rate is None else f'{rate:,.0f}'} tokens/s); {summary}", file=sys.stderr)
        # Written after every model, so that a run cut short keeps what it finished.
        results = write_results(results, args.out)
    print(f"wrote {', '.join(['results.json', *results['plots']])} to {args.out}", file=sys.stderr)
    return results
