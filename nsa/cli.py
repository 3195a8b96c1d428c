"""The `nsa` command: `nsa demo`, and the subcommands the other parts of the package register."""

from __future__ import annotations

import argparse


def _demo(args: argparse.Namespace) -> None:
    from .demo import run

    run(out=args.out, seqlen=args.seqlen)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nsa", description="Native Sparse Attention for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="draw which keys a few queries attend through each branch; check the reference")
    demo.add_argument("--out", default="nsa_demo.png", help="where to save the picture (PNG)")
    demo.add_argument("--seqlen", type=int, default=2048, help="tokens of the random input")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
