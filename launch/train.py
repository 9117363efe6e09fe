"""Train a model with GRPO.

  python -m launch train --config configs/demo.yaml [--section.key=value ...]

Prints the resolved config and saves it, with metrics.jsonl, samples, plots and
checkpoints, into run.output_dir. Re-running the same command resumes from the
newest valid checkpoint there; a finished run says so and exits 0, and one with
changed training settings is refused unless run.resume says otherwise
(override | new_dir). SIGTERM / Ctrl-C finishes the current step, saves, and exits 0.
"""

from __future__ import annotations

from launch.common import add_config_arguments, config_from_args


def add_arguments(parser):
    add_config_arguments(parser)


def main(args) -> int:
    from grpo_jax.loop import train

    summary = train(config_from_args(args))
    if "stopped_at" in summary or "complete_at" in summary:
        return 0
    before, after = summary.get("before") or {}, summary.get("after") or {}
    if before or after:
        print("\nheld-out evaluation (greedy):")
        for key in sorted(set(before) | set(after)):
            if key.startswith("eval/") and key not in ("eval/time_s", "eval/examples"):
                b, a = before.get(key), after.get(key)
                fmt = lambda v: "   n/a" if v is None else f"{v:6.3f}"  # noqa: E731
                print(f"  {key[5:]:<24} before {fmt(b)}  after {fmt(a)}")
    print(f"\nrun dir: {summary['run_dir']}")
    for p in summary.get("plots", []):
        print(f"  plot: {p}")
    return 0
