"""Run the R1 recipe's stages in one run dir: distill -> sft -> train -> eval, each one's model feeding the next.

  python -m launch pipeline --config configs/r1-smollm2-arithmetic.yaml [--run.seed=1 --run.output_dir=DIR]

pipeline.stages lists the stages (kind: distill | sft | train | eval, an optional name, and the
config overrides of that stage). Outputs go to run.output_dir/stage-N-NAME/; the before/after
table across stages is printed at the end and written to run.output_dir/results.md. Re-running
the same command resumes at the first unfinished stage.
"""

from __future__ import annotations

from launch.common import add_config_arguments, config_from_args


def add_arguments(parser):
    add_config_arguments(parser)
    parser.add_argument("--dry-run", action="store_true", help="plan and validate the stages, print them, run nothing")


def main(args) -> int:
    from grpo_jax.loop import train
    from grpo_jax.pipeline import plan, run_pipeline

    cfg = config_from_args(args)
    if args.dry_run:
        for s in plan(cfg):
            print(f"stage {s.number}: {s.name} ({s.kind}) model {s.cfg.model.path} -> {s.dir}")
        return 0
    run_pipeline(cfg, train)
    return 0
