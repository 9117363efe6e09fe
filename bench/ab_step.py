"""A/B of the whole GRPO step between two checkouts: this one and --base, rounds interleaved.

Each round runs `bench/grpo_step.py` (rollout, rewards, log-probs, update) of both checkouts, each
in its own process and in its own tree, in swapped order on odd rounds, so a shared machine that
drifts hits both alike. Reports each round's step time (median of steps 2..) and the median over
rounds of the paired ratio this / base.

    git worktree add /tmp/base HEAD~1
    .venv/bin/python bench/ab_step.py --base /tmp/base --workload small,smollm2 --steps 4 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def check_imports_from(checkout: str) -> None:
    """The checkout's own grpo_jax must be the one imported (not an installed copy of another tree)."""
    found = subprocess.run([sys.executable, "-c", "import grpo_jax; print(grpo_jax.__file__)"], cwd=checkout,
                           env=dict(os.environ, PYTHONPATH=checkout), check=True, capture_output=True, text=True)
    if not os.path.realpath(found.stdout.strip()).startswith(os.path.realpath(checkout)):
        raise SystemExit(f"{checkout} imports grpo_jax from {found.stdout.strip()}")


def step_seconds(checkout: str, workload: str, steps: int) -> float:
    """The step time of `workload` measured by `checkout`'s own bench/grpo_step.py."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run([sys.executable, "bench/grpo_step.py", "--workload", workload, "--steps", str(steps),
                        "--json", out.name], cwd=checkout, env=dict(os.environ, PYTHONPATH=checkout), check=True,
                       stdout=subprocess.DEVNULL)
        (result,) = json.load(open(out.name))["results"]
    return result["step_s"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="the other checkout (e.g. a git worktree of the previous commit)")
    ap.add_argument("--workload", default="small,smollm2")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    checkouts = {"this": ROOT, "base": os.path.abspath(args.base)}
    for checkout in checkouts.values():
        check_imports_from(checkout)
    for workload in args.workload.split(","):
        times = {name: [] for name in checkouts}
        for r in range(args.rounds):
            for name in (("this", "base") if r % 2 == 0 else ("base", "this")):
                times[name].append(step_seconds(checkouts[name], workload, args.steps))
            print(f"{workload} round {r + 1}: this {times['this'][-1]:.4f} s, base {times['base'][-1]:.4f} s",
                  flush=True)
        ratio = statistics.median(a / b for a, b in zip(times["this"], times["base"]))
        print(f"{workload}: this / base = {ratio:.3f} (median of {args.rounds} paired rounds)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
