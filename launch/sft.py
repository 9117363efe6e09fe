"""Supervised fine-tuning on (prompt, completion) pairs: the R1 "cold start" stage.

  python -m launch sft --config configs/X.yaml [--sft.steps=500 --sft.completion_template="{answer}"]

Trains model.path on data.split, completions formatted by sft.completion_template
from each row, loss on completion tokens only. Writes run.output_dir/sft/model, a
converted checkpoint: point a GRPO run's model.path at it.
"""

from __future__ import annotations

from launch.common import add_config_arguments, config_from_args


def add_arguments(parser):
    add_config_arguments(parser)
    parser.add_argument("--out", metavar="DIR", help="where to write (default: run.output_dir/sft)")


def main(args) -> int:
    from grpo_jax.sft import run_sft

    model_dir = run_sft(config_from_args(args), args.out)
    print(f"next: python -m launch train --config ... --model.path={model_dir}")
    return 0
