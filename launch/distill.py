"""Sample a corpus from a teacher, keep the completions the rewards accept: distillation / rejection sampling.

  python -m launch distill --config configs/X.yaml [--distill.teacher=MODEL --distill.samples_per_prompt=8]

Writes run.output_dir/distill.jsonl (prompt, completion, answer, reward columns, teacher), which
`sft` reads with data.source=jsonl, data.path=<it>, data.prompt_column=prompt and
sft.completion_template="{completion}". Re-running the same command continues a killed run.
"""

from __future__ import annotations

from launch.common import add_config_arguments, config_from_args


def add_arguments(parser):
    add_config_arguments(parser)
    parser.add_argument("--out", metavar="DIR", help="where to write (default: run.output_dir)")


def main(args) -> int:
    from grpo_jax.distill import run_distill

    summary = run_distill(config_from_args(args), args.out)
    if summary.complete:
        print(f"next: python -m launch sft --config ... --data.source=jsonl --data.path={summary.corpus} "
              "--data.prompt_column=prompt --sft.completion_template='{completion}'")
    return 0
