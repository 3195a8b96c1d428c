"""Compile one Triton kernel for Hopper (sm_90) without a GPU and summarize its code: shared memory, whether the
loads are pipelined (async copies), tensor-core instructions, layout conversions, registers and spills (ptxas), and
the instructions between consecutive labels of the PTX (a loop's body, with any branch inside it that falls through).

    python3 benchmarks/kernel_ir.py OUT module:kernel WARPS STAGES NAME=VALUE ... NAME=:TYPE ...

NAME=VALUE sets a constexpr (an int, None for an argument passed as None, or a string such as tf32); NAME=:TYPE
gives a runtime argument's type (fp32, i32, *fp32, *i32, ...), NAME=:i32/16 an integer that Triton would see
divisible by 16 at run time (a stride of 192, say: without that, loads through it are neither vectorized nor
pipelined); other arguments are taken as *bf16 pointers. Pointers are marked 16-byte aligned, as Triton specializes
them at run time (without that the loads are not vectorized and not pipelined). OUT receives
the TTIR, TTGIR, LLVM IR and PTX. Example, the selection of the paper's configuration:

    python3 benchmarks/kernel_ir.py out/sel nsa.ops.topk:select_blocks_kernel 4 2 lse=:*fp32 idx=:*i32 \\
        cu_seqlens=:*i32 cu_cmp=:*i32 scale2=:fp32 HKV=:i32 G=16 G_PAD=16 DK=192 BLOCK_DK=128 BLOCK_DK2=64 \\
        BLOCK_T=8 BJ=16 R_PAD=4 KP=16 HEAD_BITS=75 K_BITS=9 NUM_SELECTED=16 NUM_INIT=1 NUM_LOCAL=2 CMP_BLOCK=32 \\
        CMP_STRIDE=16 SLC_BLOCK=64 DOT_PREC=tf32
"""

from __future__ import annotations

import collections
import importlib
import os
import re
import subprocess
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

# The package of the working directory (a copy with a variant compiles as such), before an installed one.
sys.path.insert(0, os.getcwd())


def compile_for_hopper(target: str, warps: int, stages: int, settings: list[str]):
    module, name = target.split(":")
    fn = getattr(importlib.import_module(module), name)
    while not isinstance(fn, JITFunction):  # an autotuner or heuristics wrapper
        fn = fn.fn
    constexprs, signature, divisible = {}, {}, set()
    for setting in settings:
        key, value = setting.split("=", 1)
        if value.startswith(":"):
            signature[key] = value[1:].removesuffix("/16")
            if value.endswith("/16"):
                divisible.add(key)
        else:
            constexprs[key] = int(value) if value.lstrip("-").isdigit() else None if value == "None" else value
    for arg in fn.arg_names:
        signature.setdefault(arg, "constexpr" if arg in constexprs else "*bf16")
    attrs = {(i,): [["tt.divisibility", 16]] for i, arg in enumerate(fn.arg_names)
             if signature[arg].startswith("*") or arg in divisible}
    source = ASTSource(fn, signature, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()},
                       attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))


def block_histograms(ptx: str) -> list[tuple[str, collections.Counter]]:
    """(label, opcode counts) of each basic block of the PTX."""
    blocks, current = [], ("entry", collections.Counter())
    blocks.append(current)
    for line in ptx.splitlines():
        line = line.strip()
        label = re.match(r"^\$(L__BB\w+):", line)
        if label:
            current = (label.group(1), collections.Counter())
            blocks.append(current)
            continue
        words = line.split()
        if not words or words[0][0] in "/{}$." or words[0] in ("(", ")"):
            continue
        op = words[1] if words[0].startswith("@") else words[0]
        current[1][op.split(".")[0].rstrip(";")] += 1
    return blocks


def register_usage(ptx_path: str) -> str:
    """ptxas's verbose report for sm_90a: registers per thread and spills (Triton keeps them out of its metadata
    until the kernel is loaded on a GPU)."""
    report = subprocess.run([get_ptxas(90).path, "-arch=sm_90a", "-v", ptx_path, "-o", os.devnull],
                            capture_output=True, text=True).stderr
    wanted = [line for line in report.splitlines() if "registers" in line or "spill" in line]
    return "; ".join(line.split("info    : ")[-1].strip() for line in wanted)


def main() -> None:
    out, target, warps, stages, *settings = sys.argv[1:]
    kernel = compile_for_hopper(target, int(warps), int(stages), settings)
    os.makedirs(out, exist_ok=True)
    for ext, text in kernel.asm.items():
        if isinstance(text, str):
            with open(os.path.join(out, f"kernel.{ext}"), "w") as f:
                f.write(text)
    ttgir = kernel.asm["ttgir"]
    print(f"shared memory {kernel.metadata.shared} B, async copies {ttgir.count('async_copy_global_to_local')}, "
          f"wgmma {ttgir.count('warp_group_dot ')}, layout conversions {ttgir.count('convert_layout')}")
    print(register_usage(os.path.join(out, "kernel.ptx")))
    for label, counts in block_histograms(kernel.asm["ptx"]):
        if sum(counts.values()) >= 50:
            print(f"{label:>12} {sum(counts.values()):5d}  " + " ".join(f"{k} {v}" for k, v in counts.most_common(12)))


if __name__ == "__main__":
    main()
