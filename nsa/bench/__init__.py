"""`nsa bench` (also `python -m nsa.bench`): NSA and dense attention side by side on one GPU.

Light at import: the suite itself (torch work, triton, fla, matplotlib) loads when the command runs.
"""

from __future__ import annotations

import argparse


def _lengths(text: str) -> list[int]:
    """"8k,64k,1000" -> [8192, 65536, 1000]."""
    values = []
    for item in text.split(","):
        item = item.strip().lower()
        values.append(int(item[:-1]) * 1024 if item.endswith("k") else int(item))
    return values


def _names(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `nsa bench`."""
    parser.add_argument("--quick", action="store_true",
                        help="short pass (about 2 minutes): paper and fla configurations at 8k and 64k")
    parser.add_argument("--out", metavar="DIR", help="write bench.json and speedup_<phase>.png here")
    parser.add_argument("--configs", type=_names, help="comma-separated subset of: paper, d128, g4, fla")
    parser.add_argument("--seqlens", type=_lengths, help="comma-separated lengths (and decode and generate contexts), e.g. 8k,32k")
    parser.add_argument("--phases", type=_names, help="comma-separated subset of: fwd, bwd, fwdbwd, layer, decode, generate")
    parser.add_argument("--decode-layers", type=int, metavar="L",
                        help="time decode steps as L layers of one CUDA graph, each on its own cache (default 1; "
                             "the inputs take L times the memory, cut to what half the free memory holds)")
    parser.add_argument("--budget", type=float, metavar="S",
                        help="seconds after which rows not yet started are skipped (default 480 full, 100 quick)")
    parser.add_argument("--resume", metavar="FILE",
                        help="bench.json of an earlier run cut short: keep its rows, measure only those its time "
                             "budget left out, write the merged result to --out (same mode, GPU, torch, triton)")
    parser.add_argument("--merge", nargs="+", metavar="FILE",
                        help="measure nothing: merge the bench.json files of runs that split the plan (a --configs "
                             "subset per GPU, each resuming the same run) into one, written to --out")
    parser.add_argument("--warmup", type=int, default=25, help="do_bench warmup in ms")
    parser.add_argument("--rep", type=int, default=100, help="do_bench repetition time in ms")
    parser.add_argument("--backend", choices=("reference", "triton"),
                        help="nsa_attention's backend (default: triton on a GPU, reference elsewhere)")
    parser.add_argument("--tiny", action="store_true",
                        help="the tiny reference pass that runs without a GPU, even where there is one")


def run(args: argparse.Namespace) -> dict:
    from .suite import run as run_suite

    return run_suite(args)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="nsa bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
