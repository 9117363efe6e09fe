"""The floor of a GRPO step at its own matmul shapes: what XLA:CPU's kernel does with them here.

bench/grpo_step.py divides a step's matmul FLOPs by the rate of one large square product
(bench/peak.py). The products inside a step are thinner: [64, 256] @ [256, 512] for each
decode token of the small workload, [6144, 256] @ [256, 512] in its update. XLA:CPU runs
those slower, so part of a step's distance from that floor belongs to the kernel and not
to the code around it. This splits the two. It lists the weight matmuls that
`common.floor_flops` counts (prefill and decode, the update's forward and both gradient
products, the reference forward), times each distinct shape alone
(`peak.matmul_shape_rates`), and adds them up. Attention FLOPs, a small share, are charged
at the square product's rate.

A phase near its kernel floor is bound by the kernel. The rest of a phase's time is the
work around the matmuls: layout copies, softmax, cache writes, per-op overhead.
With `--measured` (a JSON from bench/grpo_step.py or bench/compare.py), it also prints each
phase's measured time as a multiple of both floors.

    .venv/bin/python bench/kernel_floor.py --workload small [--measured runs/bench/compare.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.peak import matmul_flops_per_s, matmul_shape_rates  # noqa: E402
from bench.peers import common  # noqa: E402

PHASES = ("rollout", "update", "reference")
# bench/grpo_step.py's split: the reference forward is timed as "logps"
MEASURED_PHASE = {"rollout": "rollout", "update": "update", "reference": "logps"}


def kernel_floor(plan: dict, peak_flops_per_s: float, seconds_of: dict) -> dict:
    """Per phase of a `common.floor_matmuls` plan: FLOPs, the floor at the square product's rate, and the
    floor at each shape's own rate."""
    out = {}
    for phase in PHASES:
        matmuls, attention = plan["matmuls"][phase], plan["attention"][phase]
        flops = sum(2.0 * m * k * n * c for (m, k, n), c in matmuls.items()) + attention
        at_shapes = sum(seconds_of[shape] * c for shape, c in matmuls.items()) + attention / peak_flops_per_s
        out[phase] = {"gflop": flops / 1e9, "floor_s": flops / peak_flops_per_s, "kernel_floor_s": at_shapes}
    return out


def measured_splits(path: str) -> dict:
    """{workload: split_s} for grpo_jax from a bench/grpo_step.py or bench/compare.py JSON."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        raise SystemExit(f"--measured {path}: cannot read it as JSON ({e})") from None
    ours = doc["runs"].get("grpo_jax") if "runs" in doc else doc  # compare.py keeps each side's document
    if not ours or ours.get("framework") != "grpo_jax":
        raise SystemExit(f"{path}: no grpo_jax results in it")
    return {r["workload"]: r["split_s"] for r in ours["results"] if "split_s" in r}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", default="all", help="tiny | small | smollm2 | all (or a comma list)")
    ap.add_argument("--measured", default=None, help="a bench/grpo_step.py or bench/compare.py JSON")
    ap.add_argument("--json", default=None, help="write the result here")
    args = ap.parse_args(argv)
    measured = measured_splits(args.measured) if args.measured else {}

    peak = matmul_flops_per_s()
    workloads = common.select(args.workload)
    plans = {w.name: common.floor_matmuls(w) for w in workloads}
    shapes = sorted({s for plan in plans.values() for p in PHASES for s in plan["matmuls"][p]})
    rates = {tuple(int(d) for d in r["shape"].split("x")): r for r in matmul_shape_rates(shapes)}
    seconds_of = {shape: r["ms"] / 1e3 for shape, r in rates.items()}

    print(f"square product: {peak / 1e9:.0f} GFLOP/s; each shape alone (M x K x N: ms, GFLOP/s):")
    for r in rates.values():
        print(f"  {r['shape']:>18}  {r['ms']:9.3f} ms  {r['gflops']:6.1f}")
    result = {"matmul_gflops": peak / 1e9, "shapes": list(rates.values()), "workloads": {}}
    print(f"\n{'workload':<9}{'phase':<10}{'GFLOP':>9}{'floor s':>10}{'kernel s':>10}{'kernel/floor':>13}"
          + (f"{'measured s':>12}{'x floor':>9}{'x kernel':>9}" if measured else ""))
    for w in workloads:
        floors = kernel_floor(plans[w.name], peak, seconds_of)
        for phase, f in floors.items():
            if not f["gflop"]:
                continue
            line = (f"{w.name:<9}{phase:<10}{f['gflop']:9.1f}{f['floor_s']:10.3f}{f['kernel_floor_s']:10.3f}"
                    f"{f['kernel_floor_s'] / f['floor_s']:13.2f}")
            split = measured.get(w.name)
            if split is not None:
                took = split[MEASURED_PHASE[phase]]
                f["measured_s"] = took
                line += f"{took:12.3f}{took / f['floor_s']:9.2f}{took / f['kernel_floor_s']:9.2f}"
            print(line)
        result["workloads"][w.name] = floors
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
