"""The ``medcam`` command. Heavy imports happen inside each command, so ``medcam --help`` is instant."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    from monai_medcam.demo.run import run_demo

    result = run_demo(args.output, count=args.count, device=args.device)
    print(f"{'image':>5} {'label':>5} {'p(input)':>9} {'p(evidence)':>11} {'area':>7} {'verified':>8} {'steps':>5}")
    for i, row in enumerate(result.summary()):
        print(
            f"{i:>5} {row['label']:>5} {row['prob_input']:>9.3f} {row['prob_evidence']:>11.3f} "
            f"{row['area']:>7.2%} {str(row['verified']):>8} {row['steps']:>5}"
        )
    print(f"wrote {args.output}/panels.png, {args.output}/summary.csv and one evidence_N.npy per image")
    return 0 if bool(result.verified.all()) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medcam", description="Med-CAM minimal evidence masks for frozen classifiers.")
    parser.add_argument("--verbose", "-v", action="store_true", help="log more detail")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="explain embedded demo images with the committed demo classifier")
    demo.add_argument("--output", default="medcam_demo_output", help="folder for the pictures and tables")
    demo.add_argument("--count", type=int, default=4, help="number of images")
    demo.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
