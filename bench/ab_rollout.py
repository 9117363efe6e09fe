"""Rollout time of two checkouts of grpo_jax, interleaved: is a change to the sampler or the model faster?

Two versions of the library cannot share one process, and timing them one after the other
on a shared, drifting machine mixes the change up with the machine. So this starts one
child process per checkout, lets each compile `rollout.generate` for a workload of
bench/peers/common.py, and then has them take turns, one `generate` call each per round
(the order alternating), so both see the same machine. It prints each side's times and
the paired ratios.

    git worktree add /tmp/base HEAD      # the version to compare against
    .venv/bin/python bench/ab_rollout.py --base /tmp/base --new . --workload small --rounds 10
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.peers.common import WORKLOADS  # noqa: E402

WORKLOAD_NAMES = list(WORKLOADS)

CHILD = r"""
import functools, os, sys, time
repo, name, prompts, group = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
sys.path.insert(0, repo)
import dataclasses
import jax, numpy as np
from flax import nnx
from bench import grpo_step
from bench.peers import common
from grpo_jax.models import transformer
from grpo_jax.rollout import SamplingParams, generate
assert os.path.realpath(transformer.__file__).startswith(os.path.realpath(repo)), transformer.__file__
w = common.WORKLOADS[name]
w = dataclasses.replace(w, prompts=prompts or w.prompts, group=group or w.group)
config = grpo_step.model_config(w)
params = nnx.to_pure_dict(nnx.state(transformer.Transformer(config, rngs=nnx.Rngs(common.SEED)), nnx.Param))
forward, init_cache = functools.partial(transformer.apply, config), functools.partial(transformer.init_cache, config)
sampling = SamplingParams(w.new_tokens, temperature=1.0, stop_token_ids=(), pad_token_id=0)
ids = np.asarray(common.random_prompts(w), np.int32)
mask = np.ones(ids.shape, bool)
def run(i):
    out = generate(forward, init_cache, params, ids, mask, jax.random.PRNGKey(i), sampling, group_size=w.group,
                   buckets=(w.prompt_len,))
    return np.asarray(out.tokens)
print("ready", int(run(0).sum()), flush=True)
for i, _ in enumerate(sys.stdin, start=1):
    t = time.perf_counter()
    run(i)
    print(time.perf_counter() - t, flush=True)
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="checkout to compare against (e.g. a git worktree of HEAD)")
    ap.add_argument("--new", default=".", help="checkout with the change (default: this one)")
    ap.add_argument("--workload", default="small", choices=WORKLOAD_NAMES, help="bench/peers/common.py's workloads")
    ap.add_argument("--prompts", type=int, default=0, help="override the workload's prompts")
    ap.add_argument("--group", type=int, default=0, help="override the workload's G")
    ap.add_argument("--rounds", type=int, default=8)
    args = ap.parse_args(argv)

    sides = {"base": os.path.abspath(args.base), "new": os.path.abspath(args.new)}
    for side, repo in sides.items():
        if not os.path.isdir(os.path.join(repo, "grpo_jax")):
            ap.error(f"--{side} {repo} is not a grpo_jax checkout (no grpo_jax/ in it)")
    child_args = [args.workload, str(args.prompts), str(args.group)]
    procs = {side: subprocess.Popen([sys.executable, "-c", CHILD, repo, *child_args], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True) for side, repo in sides.items()}
    checksums = {}
    for side, p in procs.items():
        line = p.stdout.readline().split()
        if not line or line[0] != "ready":
            raise SystemExit(f"{side} ({sides[side]}) failed to start; its error is above")
        checksums[side] = int(line[1])
    times = {side: [] for side in procs}
    for r in range(args.rounds):
        for side in (list(procs) if r % 2 == 0 else list(procs)[::-1]):
            procs[side].stdin.write("go\n")
            procs[side].stdin.flush()
            times[side].append(float(procs[side].stdout.readline()))
    for p in procs.values():
        p.stdin.close()
        p.wait()

    same = "same" if checksums["base"] == checksums["new"] else "DIFFERENT"
    print(f"{args.workload}: first call's sampled tokens {same} (checksums {checksums['base']} / {checksums['new']})")
    for side, ts in times.items():
        print(f"  {side:4s} median {statistics.median(ts):.3f} s, min {min(ts):.3f} s: "
              + " ".join(f"{t:.3f}" for t in ts))
    paired = [n / b for n, b in zip(times["new"], times["base"])]
    print(f"  new / base: median of paired ratios {statistics.median(paired):.3f} "
          f"(range {min(paired):.2f}-{max(paired):.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
