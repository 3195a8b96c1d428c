"""The `nsa` command: `nsa demo`, and the subcommands the other parts of the package register."""

from __future__ import annotations

import argparse

from .bench import add_arguments as add_bench_arguments
from .bench import run as run_bench
from .train import add_arguments as add_train_arguments


def _train(args: argparse.Namespace) -> None:
    from .train import run

    run(args)


def _demo(args: argparse.Namespace) -> None:
    from .demo import run

    run(out=args.out, seqlen=args.seqlen)
    if not args.no_train:
        # The tiny preset of `nsa train`: NSA and its dense twin on the CPU in a couple of minutes.
        _train(build_parser().parse_args(["train", "--out", args.train_out]))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nsa", description="Native Sparse Attention for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="draw which keys a few queries attend through each branch; check the reference; "
                                           "train a tiny NSA and its dense twin")
    demo.add_argument("--out", default="nsa_demo.png", help="where to save the picture (PNG)")
    demo.add_argument("--seqlen", type=int, default=2048, help="tokens of the random input")
    demo.add_argument("--train-out", default="nsa_demo_train", metavar="DIR",
                      help="where the demo's tiny training run (nsa train's tiny preset) writes its results")
    demo.add_argument("--no-train", action="store_true", help="skip the tiny training run")
    demo.set_defaults(func=_demo)
    bench = sub.add_parser("bench", help="time NSA beside dense attention (cuDNN, flash, FlexAttention) and fla")
    add_bench_arguments(bench)
    bench.set_defaults(func=run_bench)
    train = sub.add_parser("train", help="train NSA and its dense twin on the same bytes; compare loss and retrieval")
    add_train_arguments(train)
    train.set_defaults(func=_train)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
