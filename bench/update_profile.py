"""Where the update step's time goes: the compiled train step alone, timed, then traced.

The update (forward + backward + AdamW over one generation batch) is our largest phase
in bench/grpo_step.py. This times it on a fixed random batch of a workload's shape
(no rollout), then traces two steps with `jax.profiler` and sums the device time by
XLA fusion kind (`ynn_fusion.12` and `ynn_fusion.3` count as `ynn_fusion`: matmuls on
XLA:CPU; `copy*` / `transpose*`: layout copies; ...), largest first. `--by op` lists
single ops instead, each with its output shape and the JAX operation it came from (from
the compiled HLO), which is how to find *which* copy or matmul is slow; it also prints
how much of the device time ran concurrently on XLA:CPU's threads.

    .venv/bin/python bench/update_profile.py [--workload small] [--steps 6] [--top 12] [--by kind|op]
        [--lora-rank R]
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
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


def build(w: common.Workload, lora_rank: int = 0):
    """(state, batch, update, cfg) of a workload as loop.Run sets them up; beta 0: the update alone.
    lora_rank > 0: rank-R adapters on every linear train, on the frozen base (`update` binds it)."""
    import functools

    import jax
    import numpy as np
    from flax import nnx

    from grpo_jax import sharding
    from grpo_jax.models import lora, transformer
    from grpo_jax.optim import make_optimizer
    from grpo_jax.trainer import assemble_batch, init_train_state, make_steps

    config, cfg = model_config(w), run_config(w, lora_rank=lora_rank)
    cfg = dataclasses.replace(cfg, grpo=dataclasses.replace(cfg.grpo, beta=0.0))
    mesh = sharding.make_mesh(cfg.mesh)
    model = transformer.Transformer(config, rngs=nnx.Rngs(common.SEED))
    params = jax.device_put(nnx.to_pure_dict(nnx.state(model, nnx.Param)),
                            transformer.param_shardings(model, mesh, sharding.DEFAULT_RULES))
    optimizer = make_optimizer(cfg.optim, 1000)
    spec = lora.LoraSpec.from_config(cfg.model)
    trained, trained_shardings = params, jax.tree.map(lambda x: x.sharding, params)
    if spec is not None:
        trained = jax.jit(lora.init_adapters, static_argnums=1)(params, spec, jax.random.PRNGKey(common.SEED))
        trained_shardings = lora.adapter_shardings(trained, trained_shardings)
    state = init_train_state(trained, optimizer, jax.random.PRNGKey(common.SEED), keep_reference=False)
    shardings = sharding.train_state_shardings(state, optimizer, trained_shardings, mesh)
    state = jax.device_put(state, shardings)
    update = functools.partial(make_steps(transformer.Decoder(config), optimizer, cfg, shardings).update,
                               frozen=None if spec is None else params)
    rng = np.random.default_rng(common.SEED)
    prompts = rng.integers(1, w.vocab, (w.rows, w.prompt_len)).astype(np.int32)
    completions = rng.integers(1, w.vocab, (w.rows, w.new_tokens)).astype(np.int32)
    batch = assemble_batch(prompts, np.ones_like(prompts, bool), completions, np.ones_like(completions, bool),
                           rng.standard_normal(w.rows).astype(np.float32))
    return state, sharding.shard_rows(batch, mesh), update, cfg


def device_events(trace_dir: str) -> list[dict]:
    """The complete ("X") events of XLA ops in a jax.profiler trace (host-side Python excluded)."""
    path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))[-1]
    return [e for e in json.load(gzip.open(path))["traceEvents"]
            if e.get("ph") == "X" and "dur" in e and not e.get("name", "").startswith(("$", "Thunk"))]


def time_by_fusion_kind(events: list[dict], steps: int) -> collections.Counter:
    """Milliseconds per step of each XLA op kind (`copy_bitcast_fusion.7` counts as `copy_bitcast_fusion`)."""
    totals = collections.Counter()
    for event in events:
        totals[re.sub(r"[.\d]+$", "", event["name"])] += event["dur"] / 1e3 / steps
    return totals


def time_by_op(events: list[dict], steps: int) -> tuple[collections.Counter, collections.Counter]:
    """(milliseconds per step, calls per step) of each single op."""
    totals, calls = collections.Counter(), collections.Counter()
    for event in events:
        totals[event["name"]] += event["dur"] / 1e3 / steps
        calls[event["name"]] += 1 / steps
    return totals, calls


def describe_ops(hlo_text: str) -> dict[str, str]:
    """op name -> "output shape  JAX operation" from compiled HLO text."""
    out = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+)", line)
        if m and m.group(1) not in out:
            source = re.search(r'op_name="([^"]+)"', line)
            out[m.group(1)] = f"{m.group(2)}  {source.group(1)[-60:] if source else ''}"
    return out


def busy_ms(events: list[dict], steps: int) -> float:
    """Milliseconds per step during which at least one thread ran an op (sum minus the overlap)."""
    total, end = 0.0, None
    spans = ((e["ts"], e["ts"] + e["dur"]) for e in events if not e["name"].startswith("PjitFunction"))
    for start, stop in sorted(spans):
        if end is None or start > end:
            total, end = total + (stop - start), stop
        elif stop > end:
            total, end = total + (stop - end), stop
    return total / 1e3 / steps


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="small", choices=sorted(common.WORKLOADS))
    parser.add_argument("--lora-rank", type=int, default=0, help="train rank-R LoRA adapters (0: the whole model)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps after the first (compile) one")
    parser.add_argument("--top", type=int, default=12, help="op kinds (or ops) to print")
    parser.add_argument("--by", choices=("kind", "op"), default="kind",
                        help="sum by op kind, or list single ops with their shapes")
    args = parser.parse_args(argv)

    import jax
    import numpy as np

    from grpo_jax.trainer import train_on_batch

    state, batch, update, cfg = build(common.WORKLOADS[args.workload], args.lora_rank)

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
        events = device_events(trace_dir)
    if args.by == "kind":
        totals = time_by_fusion_kind(events, 2)
        print(f"device time per step by op kind ({sum(totals.values()):.0f} ms in all):")
        for kind, ms in totals.most_common(args.top):
            print(f"  {ms:8.1f} ms  {kind}")
        return 0
    totals, calls = time_by_op(events, 2)
    ops = describe_ops(update.func.lower(state, batch, **update.keywords).compile().as_text())
    print(f"device time per step by op ({sum(totals.values()):.0f} ms in all, "
          f"{busy_ms(events, 2):.0f} ms with at least one thread busy):")
    for name, ms in totals.most_common(args.top):
        print(f"  {ms:8.1f} ms  x{calls[name]:<4.0f} {name:32s} {ops.get(name, '')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
