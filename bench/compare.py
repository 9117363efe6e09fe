"""grpo_jax vs TRL vs google-tunix, seconds per GRPO step on the same workloads, and the ratios.

Measures this machine's matmul rate once (bench/peak.py), then runs `--rounds` rounds; in each,
for each workload, ours (bench/grpo_step.py, in .venv), TRL (bench/peers/trl_grpo.py, in .venv-trl)
and tunix (bench/peers/tunix_grpo.py, in .venv-tunix) one after another, each in its own
subprocess, in reversed order on odd rounds. A shared machine that drifts during the run then
hits the frameworks alike: each ratio is the median over rounds of that round's ratio (paired),
each time the median over rounds. A peer whose venv is missing is skipped with a message
(`make bench-peers` builds both); ours always runs.

    make bench                     (= .venv/bin/python bench/compare.py --json runs/bench/compare.json)
    .venv/bin/python bench/compare.py [--workload tiny|small|smollm2|all] [--steps 5] [--rounds 3] [--json out.json]
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
sys.path.insert(0, ROOT)

from bench.peers import common  # noqa: E402

FRAMEWORKS = {  # name: (python, script)
    "grpo_jax": (sys.executable, "bench/grpo_step.py"),
    "trl": (".venv-trl/bin/python", "bench/peers/trl_grpo.py"),
    "tunix": (".venv-tunix/bin/python", "bench/peers/tunix_grpo.py"),
}


def run_one(name: str, workload: str, steps: int, gflops: float, timeout: float | None) -> dict | None:
    """One framework on one workload; its JSON document, or None when it could not run."""
    python, script = FRAMEWORKS[name]
    python = python if os.path.isabs(python) else os.path.join(ROOT, python)
    if not os.path.exists(python):
        print(f"{name}: {os.path.relpath(python, ROOT)} is missing; run `make bench-peers` to build it. Skipped.",
              flush=True)
        return None
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.json")
        cmd = [python, os.path.join(ROOT, script), "--workload", workload, "--steps", str(steps),
               "--matmul-gflops", str(gflops), "--json", out]
        if timeout:
            cmd += ["--timeout", str(timeout)]
        print(f"== {name} {workload}: {' '.join(os.path.relpath(c, ROOT) if c.startswith(ROOT) else c for c in cmd)}",
              flush=True)
        subprocess.run(cmd, cwd=ROOT)
        if not os.path.exists(out):
            return common.document(name, {}, gflops, [{"workload": workload, "error": "no JSON written"}])
        with open(out) as f:
            return json.load(f)


def ratio(a, b) -> float:
    return a / b if common.finite_positive(a) and common.finite_positive(b) else float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", default="all")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of every framework on every workload (interleaved)")
    ap.add_argument("--frameworks", default=",".join(FRAMEWORKS))
    ap.add_argument("--timeout", type=float, default=None, help="seconds per workload subprocess")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from bench.peak import matmul_flops_per_s

    gflops = matmul_flops_per_s() / 1e9
    print(f"matmul f32: {gflops:.1f} GFLOP/s", flush=True)
    names = [n for n in args.frameworks.split(",") if n]
    docs: dict[str, dict] = {}
    per_round: list[dict] = []  # {(framework, workload): result row} of each round
    for r in range(args.rounds):
        got = {}
        for w in common.select(args.workload):
            for name in (names if r % 2 == 0 else names[::-1]):
                doc = run_one(name, w.name, args.steps, gflops, args.timeout)
                if doc is None:
                    continue
                for result in doc["results"]:
                    got[(name, result["workload"])] = dict(result, round=r)
                if name in docs:
                    docs[name]["results"] += doc["results"]
                else:
                    docs[name] = doc
        per_round.append(got)

    def ok(result):
        return result is not None and "error" not in result

    rows = []
    for w in common.select(args.workload):
        row = {"workload": w.name, "floor_s": common.floor_flops(w)["total"] / (gflops * 1e9), "rounds": args.rounds}
        for n in docs:
            runs = [got.get((n, w.name)) for got in per_round]
            good = [x for x in runs if ok(x)]
            row[f"{n}_step_s"] = statistics.median(x["step_s"] for x in good) if good else None
            row[f"{n}_first_step_s"] = statistics.median(x["first_step_s"] for x in good) if good else None
            row[f"{n}_peak_rss_mb"] = max(x["peak_rss_mb"] for x in good) if good else None
            if n != "grpo_jax":
                paired = [ratio(x["step_s"], ours["step_s"]) for got in per_round
                          for x, ours in [(got.get((n, w.name)), got.get(("grpo_jax", w.name)))]
                          if ok(x) and ok(ours)]
                row[f"{n}_over_ours"] = statistics.median(paired) if paired else None
                row[f"{n}_over_ours_per_round"] = paired
        rows.append(row)

    print(f"\nGRPO step, seconds (median of steps 2..{args.steps}, then over {args.rounds} interleaved rounds; "
          f"ratios: median of each round's); matmul {gflops:.0f} GFLOP/s")
    peers = [n for n in names if n in docs and n != "grpo_jax"]
    head = f"{'workload':<9}{'floor':>8}{'grpo_jax':>10}{'x floor':>9}"
    for n in peers:
        head += f"{n:>10}{n + '/ours':>12}"
    head += f"{'first step (compile) s':>26}{'peak RSS MB':>24}"
    print(head)
    for row in rows:
        ours = row.get("grpo_jax_step_s")
        line = f"{row['workload']:<9}{row['floor_s']:8.3f}{_num(ours, 10, 3)}{_num(ratio(ours, row['floor_s']), 9, 1)}"
        for n in peers:
            line += f"{_num(row.get(f'{n}_step_s'), 10, 3)}{_num(row.get(f'{n}_over_ours'), 12, 2)}"
        firsts = "/".join(_short(row.get(f"{n}_first_step_s")) for n in ["grpo_jax", *peers])
        rss = "/".join(_short(row.get(f"{n}_peak_rss_mb"), 0) for n in ["grpo_jax", *peers])
        line += f"{firsts:>26}{rss:>24}"
        print(line)
    print(f"(first step and RSS: {' / '.join(['grpo_jax', *peers])})")
    for doc in docs.values():
        common.print_table(doc)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"matmul_gflops": gflops, "date": common.DATE, "ratios": rows, "runs": docs}, f, indent=2)
    return 0


def _num(x, width: int, digits: int) -> str:
    return f"{x:{width}.{digits}f}" if isinstance(x, (int, float)) else f"{'-':>{width}}"


def _short(x, digits: int = 1) -> str:
    return f"{x:.{digits}f}" if isinstance(x, (int, float)) else "-"


if __name__ == "__main__":
    sys.exit(main())
