"""Where the update step's time goes: the compiled train step alone, timed, then traced.

The update (forward + backward + AdamW over one generation batch) is our largest phase
in bench/grpo_step.py. This times it on a fixed random batch of a workload's shape
(no rollout), then traces two steps with `jax.profiler` and sums the device time by
XLA fusion kind (`ynn_fusion.12` and `ynn_fusion.3` count as `ynn_fusion`: matmuls on
XLA:CPU; `copy*` / `transpose*`: layout copies; ...), largest first.

    .venv/bin/python bench/update_profile.py [--workload small] [--steps 6] [--top 12]
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.grpo_step import model_config, run_config  # noqa: E402
from bench.peers import common  # noqa: E402


def build(w: common.Workload):
    """(state, batch, update, cfg) of a workload as loop.Run sets them up; beta 0: the update alone."""
    import jax
    import numpy as np
    from flax import nnx

    from grpo_jax import sharding
    from grpo_jax.models import transformer as tf
    from grpo_jax.optim import make_optimizer
    from grpo_jax.trainer import assemble_batch, init_train_state, make_steps

    config, cfg = model_config(w), run_config(w)
    cfg = dataclasses.replace(cfg, grpo=dataclasses.replace(cfg.grpo, beta=0.0))
    mesh = sharding.make_mesh(cfg.mesh)
    model = tf.Transformer(config, rngs=nnx.Rngs(common.SEED))
    params = jax.device_put(nnx.to_pure_dict(nnx.state(model, nnx.Param)),
                            tf.param_shardings(model, mesh, sharding.DEFAULT_RULES))
    optimizer = make_optimizer(cfg.optim, 1000)
    state = init_train_state(params, optimizer, jax.random.PRNGKey(common.SEED), keep_reference=False)
    shardings = sharding.train_state_shardings(state, optimizer, jax.tree.map(lambda x: x.sharding, params), mesh)
    state = jax.device_put(state, shardings)
    _, update = make_steps(functools.partial(tf.apply, config), optimizer, cfg, shardings)
    rng = np.random.default_rng(common.SEED)
    prompts = rng.integers(1, w.vocab, (w.rows, w.prompt_len)).astype(np.int32)
    completions = rng.integers(1, w.vocab, (w.rows, w.new_tokens)).astype(np.int32)
    batch = assemble_batch(prompts, np.ones_like(prompts, bool), completions, np.ones_like(completions, bool),
                           rng.standard_normal(w.rows).astype(np.float32))
    return state, sharding.shard_rows(batch, mesh), update, cfg


def time_by_fusion_kind(trace_dir: str, steps: int) -> collections.Counter:
    """Milliseconds per step of each XLA op kind in a jax.profiler trace (host-side Python excluded)."""
    path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))[-1]
    totals = collections.Counter()
    for event in json.load(gzip.open(path))["traceEvents"]:
        name = event.get("name", "")
        if event.get("ph") == "X" and "dur" in event and not name.startswith(("$", "Thunk")):
            totals[re.sub(r"[.\d]+$", "", name)] += event["dur"] / 1e3 / steps
    return totals


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="small", choices=sorted(common.WORKLOADS))
    parser.add_argument("--steps", type=int, default=6, help="timed steps after the first (compile) one")
    parser.add_argument("--top", type=int, default=12, help="op kinds to print")
    args = parser.parse_args(argv)

    import jax
    import numpy as np

    from grpo_jax.trainer import train_on_batch

    state, batch, update, cfg = build(common.WORKLOADS[args.workload])

    def step(state):
        state, metrics = train_on_batch(state, batch, update, cfg)
        return jax.block_until_ready(state), metrics

    t0 = time.perf_counter()
    state, _ = step(state)
    first = time.perf_counter() - t0
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, _ = step(state)
        times.append(time.perf_counter() - t0)
    print(f"{args.workload} update step: first {first:.2f} s (compile), then median {np.median(times):.3f} s, "
          f"min {min(times):.3f} s over {args.steps}")
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            for _ in range(2):
                state, _ = step(state)
        totals = time_by_fusion_kind(trace_dir, 2)
    print(f"device time per step by op kind ({sum(totals.values()):.0f} ms in all):")
    for kind, ms in totals.most_common(args.top):
        print(f"  {ms:8.1f} ms  {kind}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
