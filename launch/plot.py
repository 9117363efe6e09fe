"""Draw a run's curves as PNGs: reward (overall and per function), held-out accuracy,
KL, clip ratio and completion length over steps, into RUN_DIR/plots/.

  python -m launch plot RUN_DIR

Training draws them at the end of a run too; this redraws them from
RUN_DIR/metrics.jsonl at any time, also while the run is still going.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a training run's output dir (holds metrics.jsonl)")


def main(args: argparse.Namespace) -> int:
    from grpo_jax.metrics import plot_run

    for path in plot_run(args.run_dir):
        print(path)
    return 0
