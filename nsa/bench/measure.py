"""Timing, memory and the machine's ceilings, on a GPU (do_bench) or on a CPU (a plain timer, CI only)."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import subprocess
import time

import torch

# The nsa package's folder: its sources name the code a run measured.
PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# H200's L2: inputs smaller than a few times this are rotated so that a timing does not read them from L2.
L2_BYTES = 60 * 2**20


def bench_ms(fn, device: torch.device, warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds of fn(): triton's do_bench on CUDA; elsewhere one call, since the pass without
    a GPU checks the harness, not speed (the suite has already called fn once to size its output)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> float | None:
    """Peak allocated memory since reset_peak, in GB; None where torch does not track it (CPU)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 1e9


def ceilings(device: torch.device) -> dict:
    """Copy bandwidth (bytes read + written by a large device-to-device copy) and bf16 matmul rate."""
    if device.type == "cuda":
        numel, n, dtype = 2**29, 8192, torch.bfloat16
    else:
        numel, n, dtype = 2**20, 256, torch.float32
    src = torch.randn(numel, device=device, dtype=dtype)
    dst = torch.empty_like(src)
    copy_ms = bench_ms(lambda: dst.copy_(src), device)
    copy_bytes = 2 * src.numel() * src.element_size()
    del src, dst
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    mm_ms = bench_ms(lambda: a @ b, device)
    return {
        "copy_GBps": copy_bytes / copy_ms / 1e6,
        "copy_how": f"dst.copy_(src) of {copy_bytes // 2 / 2**30:.3g} GiB, bytes read + written",
        "matmul_TFLOPs": 2 * n**3 / mm_ms / 1e9,
        "matmul_how": f"{n}^3 {str(dtype).removeprefix('torch.')} a @ b",
    }


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def _commit() -> str | None:
    """The checkout's commit, where the suite runs from a git working tree, with "+modified" when the package's
    files differ from it (then only `source` identifies the code)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=20, cwd=PACKAGE)
        status = subprocess.run(["git", "status", "--porcelain", "--", "."], capture_output=True, text=True,
                                timeout=20, cwd=PACKAGE)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0 or not head.stdout.strip():
        return None
    return head.stdout.strip() + ("+modified" if status.returncode != 0 or status.stdout.strip() else "")


def source_digest() -> str:
    """sha256 (first 16 hex digits) of the package's Python sources, paths included: names the code that ran
    whatever the state of git."""
    digest = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(PACKAGE)):
        dirs.sort()
        for name in sorted(f for f in files if f.endswith(".py")):
            path = os.path.join(root, name)
            digest.update(os.path.relpath(path, PACKAGE).encode() + b"\0")
            with open(path, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()[:16]


def environment(device: torch.device) -> dict:
    import triton

    env = {
        "device": str(device), "python": platform.python_version(), "torch": torch.__version__,
        "triton": triton.__version__, "cuda": torch.version.cuda, "fla": _version("fla-core"), "commit": _commit(),
        "source": source_digest(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                   memory_GB=props.total_memory / 1e9, driver=_driver(), cudnn=torch.backends.cudnn.version())
    else:
        env.update(gpu=None, cpu=platform.processor() or platform.machine())
    return env
