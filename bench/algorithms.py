"""GRPO against PPO with a critic, measured side by side: the article's comparison table, with numbers.

Four parts, each in one run of this script (`--part`, default all):

  steps   seconds per step split by phase and peak RSS on the `small` and `smollm2` shapes
          (bench/peers/common.py: random-weight decoders, float32, completions forced to full length,
          reward = fraction of even token ids). Both algorithms sample the same number of completions
          per step: GRPO `prompts` x G, PPO prompts x G prompts with G = 1. PPO's step also runs the
          critic (the policy's copy with a value head): its values before the update, GAE, and its
          forward + backward in the update. One subprocess per (workload, algorithm) so each RSS is its
          own; the rounds alternate GRPO, PPO, GRPO, PPO, ... and the table reports medians.
          Phases: rollout, reward (host), logps (reference, old log-probs and, PPO, the critic's
          values), advantages (group baseline, or GAE), update.
  plan    `python -m launch plan`'s per-device peak for Qwen2.5-7B (configs/r1-zero-qwen2.5-1.5b-gsm8k.yaml's
          256 completions of 1024 tokens with --model-preset qwen2.5-7b) on a v5p-64 (fsdp 64) and on
          8 x H100 (fsdp 8), both algorithms at the same micro-batch.
  demo    held-out accuracy against steps and wall-clock on the demo task (configs/demo.yaml), 3 seeds:
          each seed's warm start (SFT) once, then GRPO (32 prompts x 8) and PPO (256 prompts x 1, the same
          completions per step) from it.
  drift   the sampler-trainer drift (`sampling/*` in metrics.jsonl) of GRPO on the demo, float32 and bfloat16
          compute, and bfloat16 with truncated importance sampling (grpo.tis_cap).

    .venv/bin/python bench/algorithms.py [--part steps,plan,demo,drift] [--workload small,smollm2] [--steps 5]
        [--rounds 2] [--seeds 0,1,2] [--demo-steps 300] [--drift-steps 50] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.peers import common  # noqa: E402

PHASES = ("rollout", "reward", "logps", "advantages", "update")
ALGORITHMS = ("grpo", "ppo")
PLAN_CONFIG = "configs/r1-zero-qwen2.5-1.5b-gsm8k.yaml"
PLAN_TARGETS = {  # a fixed micro-batch (one row, then two, per device) for both algorithms
    "v5p-64": ["--devices", "64", "--device-kind", "v5p", "--mesh.fsdp=64", "--mesh.data=1",
               "--grpo.micro_batch_size=64"],
    "8 x H100": ["--devices", "8", "--device-kind", "h100", "--mesh.fsdp=8", "--mesh.data=1",
                 "--grpo.micro_batch_size=16"]}


# ---------------------------------------------------------------- steps (one child per workload x algorithm)


def run_steps(w: common.Workload, algorithm: str, steps: int) -> dict:
    """`steps` steps of `algorithm` on workload w, phases timed apart (each blocked on)."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from bench.grpo_step import model_config, run_config
    from grpo_jax import sharding
    from grpo_jax.config import PPOConfig, RunConfig
    from grpo_jax.critic import critic_from_policy
    from grpo_jax.models import transformer
    from grpo_jax.objective import group_advantages
    from grpo_jax.optim import make_critic_optimizer, make_optimizer
    from grpo_jax.rollout import SamplingParams, generate
    from grpo_jax.trainer import CriticModel, assemble_batch, init_train_state, make_steps, ppo_batch, train_on_batch

    ppo = algorithm == "ppo"
    group = 1 if ppo else w.group
    prompts = w.prompts * w.group // group  # the same completions per step
    config, cfg = model_config(w), run_config(w)
    cfg = dataclasses.replace(cfg, run=RunConfig(algorithm=algorithm), ppo=PPOConfig(),
                              rollout=dataclasses.replace(cfg.rollout, group_size=group),
                              data=dataclasses.replace(cfg.data, batch_size=prompts))
    mesh = sharding.make_mesh(cfg.mesh)
    model = transformer.Transformer(config, rngs=nnx.Rngs(common.SEED))
    params = jax.device_put(nnx.to_pure_dict(nnx.state(model, nnx.Param)),
                            transformer.param_shardings(model, mesh, sharding.DEFAULT_RULES))
    decoder = transformer.Decoder(config)
    optimizer = make_optimizer(cfg.optim, steps)
    critic = critic_params = critic_shardings = None
    if ppo:  # as a run starts it (critic.load_critic): a copy of the policy's weights, a zero value head
        start = critic_from_policy(config, params, mesh)
        critic_params, critic_shardings = start.params, start.shardings
        critic = CriticModel(start.decoder, make_critic_optimizer(cfg, steps))
    state = init_train_state(params, optimizer, jax.random.PRNGKey(common.SEED), keep_reference=w.beta != 0,
                             critic_params=critic_params, critic_optimizer=critic and critic.optimizer)
    state_shardings = sharding.train_state_shardings(state, optimizer, jax.tree.map(lambda x: x.sharding, params),
                                                     mesh, critic and critic.optimizer, critic_shardings)
    state = jax.device_put(state, state_shardings)
    logps_step, update_step = make_steps(decoder, optimizer, cfg, state_shardings, critic=critic)
    advantages_step = jax.jit(lambda batch, scores: ppo_batch(batch, scores, cfg))
    sampling = SamplingParams(w.new_tokens, temperature=1.0, stop_token_ids=(), pad_token_id=0)
    prompt_ids = np.asarray(common.random_prompts(dataclasses.replace(w, prompts=prompts)), np.int32)
    prompt_mask = np.ones(prompt_ids.shape, bool)
    rows_ids, rows_mask = np.repeat(prompt_ids, group, axis=0), np.repeat(prompt_mask, group, axis=0)

    step_times, splits = [], []
    for step in range(steps):
        t0 = time.perf_counter()
        out = generate(decoder, decoder.init_cache, state.params, prompt_ids, prompt_mask,
                       jax.random.fold_in(state.rng, step), sampling, group_size=group, buckets=(w.prompt_len,))
        tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
        t1 = time.perf_counter()
        rewards = np.asarray([common.even_fraction(row[m]) for row, m in zip(tokens, mask)], np.float32)
        t2 = time.perf_counter()
        batch = assemble_batch(rows_ids, rows_mask, tokens, mask, np.zeros(len(tokens), np.float32),
                               np.asarray(out.logprobs))
        batch = jax.block_until_ready(logps_step(state, sharding.shard_rows(batch, mesh)))
        t3 = time.perf_counter()
        scores = jax.device_put(jnp.asarray(rewards), sharding.rows_sharding(jnp.asarray(rewards), mesh))
        if ppo:
            batch, _ = advantages_step(batch, scores)
        else:
            advantages = group_advantages(scores, group, cfg.grpo.scale_rewards, cfg.grpo.advantage_eps)
            batch = batch._replace(advantages=jax.device_put(advantages, sharding.rows_sharding(advantages, mesh)))
        batch = jax.block_until_ready(batch)
        t4 = time.perf_counter()
        state, metrics = train_on_batch(state, batch, update_step, cfg)
        jax.block_until_ready((state, metrics))
        t5 = time.perf_counter()
        step_times.append(t5 - t0)
        splits.append({"rollout": t1 - t0, "reward": t2 - t1, "logps": t3 - t2, "advantages": t4 - t3,
                       "update": t5 - t4})
        print(f"  {w.name} {algorithm} step {step + 1}: {t5 - t0:.3f} s (loss {float(metrics['loss']):+.4f})",
              file=sys.stderr, flush=True)
    later = splits[1:] or splits
    return {"workload": w.name, "algorithm": algorithm, "rows": len(tokens), "prompts": prompts, "group": group,
            "step_s": statistics.median(step_times[1:] or step_times),
            "split_s": {p: statistics.median(s[p] for s in later) for p in PHASES},
            "peak_rss_mb": common.peak_rss_mb()}


def steps_part(workloads: list[common.Workload], steps: int, rounds: int) -> list[dict]:
    rows = []
    for w in workloads:
        runs = {a: [] for a in ALGORITHMS}
        for r in range(rounds):
            for algorithm in ALGORITHMS:  # interleaved: the machine's drift hits both alike
                print(f"[steps] {w.name} {algorithm} round {r + 1}/{rounds}", file=sys.stderr, flush=True)
                out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", w.name, algorithm,
                                      str(steps)], capture_output=True, text=True, cwd=ROOT)
                if out.returncode:
                    raise SystemExit(f"{w.name} {algorithm} failed:\n{out.stderr[-3000:]}")
                runs[algorithm].append(json.loads(out.stdout.strip().splitlines()[-1]))
        for results in runs.values():
            row = dict(results[0], step_s=statistics.median(x["step_s"] for x in results),
                       peak_rss_mb=max(x["peak_rss_mb"] for x in results), rounds=len(results))
            row["split_s"] = {p: statistics.median(x["split_s"][p] for x in results) for p in PHASES}
            rows.append(row)
    return rows


# ---------------------------------------------------------------- plan


def plan_part() -> list[dict]:
    rows = []
    for target, flags in PLAN_TARGETS.items():
        for algorithm in ALGORITHMS:
            extra = ["--run.algorithm=ppo", "--rollout.group_size=1", "--data.batch_size=256"] if algorithm == "ppo" \
                else []  # PPO: the config's 32 prompts x 8 as 256 prompts x 1
            print(f"[plan] {target} {algorithm}", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, "-m", "launch", "plan", "--config", PLAN_CONFIG, "--model-preset",
                                  "qwen2.5-7b", "--no-micro-batch-search", "--json", *flags, *extra],
                                 capture_output=True, text=True, cwd=ROOT)
            if out.returncode:
                raise SystemExit(f"plan {target} {algorithm} failed:\n{out.stderr[-3000:]}")
            report = json.loads(out.stdout[out.stdout.index("{"):])
            per = report["per_device_bytes"]
            rows.append({"target": target, "algorithm": algorithm, "peak_gib": report["peak_bytes"] / 2**30,
                         "resident_gib": per["resident_state"] / 2**30,
                         "critic_gib": (per.get("critic_params", 0) + per.get("critic_optimizer_state", 0)) / 2**30,
                         "verdict": report.get("verdict_line", ""), "plan_s": time.perf_counter() - t0})
    return rows


# ---------------------------------------------------------------- demo (learning)


def warm_start(tmp: str, seed: int) -> Path:
    """The demo's warm-started model of `seed` (its steps 1-2), in tmp/seedS/sft/model."""
    base = Path(tmp) / f"seed{seed}"
    if not (base / "sft" / "model").exists():
        print(f"[demo] seed {seed}: warm start", file=sys.stderr, flush=True)
        launch("demo", "--config", "configs/demo.yaml", f"--run.seed={seed}", "--run.steps=0",
               "--data.eval_split=null", f"--run.output_dir={base}")
    return base


def demo_part(tmp: str, seeds: list[int], demo_steps: int) -> list[dict]:
    rows = []
    for seed in seeds:
        base = warm_start(tmp, seed)
        for algorithm in ALGORITHMS:
            flags = ["--run.algorithm=ppo", "--rollout.group_size=1", "--data.batch_size=256"] \
                if algorithm == "ppo" else []
            run_dir = base / algorithm
            print(f"[demo] seed {seed}: {algorithm}", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            rows_ = demo_train(base, run_dir, seed, demo_steps, *flags)
            wall = time.perf_counter() - t0
            curve = [(r["step"], r["time"], r["eval/accuracy"]) for r in rows_ if "eval/accuracy" in r]
            rows.append({"seed": seed, "algorithm": algorithm, "wall_s": wall, "curve": curve,
                         "before": curve[0][2], "after": curve[-1][2]})
    return rows


def demo_train(base: Path, run_dir: Path, seed: int, steps: int, *flags: str) -> list[dict]:
    """`launch train` of the demo config from `base`'s warm start; its metrics.jsonl rows."""
    launch("train", "--config", "configs/demo.yaml", f"--model.path={base / 'sft' / 'model'}", f"--run.seed={seed}",
           f"--run.steps={steps}", f"--run.output_dir={run_dir}", "--logging.progress_bar=false", *flags)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


DRIFT_RUNS = {"float32": [], "bfloat16": ["--model.compute_dtype=bfloat16"],
              "bfloat16 + tis_cap 2": ["--model.compute_dtype=bfloat16", "--grpo.tis_cap=2.0"]}
DRIFT_KEYS = ("sampling/logp_difference/mean", "sampling/logp_difference/max", "sampling/kl", "sampling/ratio/max")


def drift_part(tmp: str, steps: int) -> list[dict]:
    """The sampler-trainer drift GRPO logs every step on the demo (seed 0), float32 against bfloat16 compute
    (the sampler's KV-cache decode and the trainer's whole-sequence forward round differently)."""
    base, rows = warm_start(tmp, 0), []
    for name, flags in DRIFT_RUNS.items():
        print(f"[drift] {name}", file=sys.stderr, flush=True)
        logged = [r for r in demo_train(base, base / f"drift-{len(rows)}", 0, steps, "--data.eval_split=null", *flags)
                  if DRIFT_KEYS[0] in r]
        assert len(logged) == steps, "the drift metrics are logged every step"
        rows.append({"run": name, "steps": steps,
                     "reward_last10": statistics.mean(r["reward/mean"] for r in logged[-10:]),
                     **{k: (max if k.endswith("/max") else statistics.mean)(r[k] for r in logged) for k in DRIFT_KEYS}})
    return rows


def launch(*args: str) -> None:
    out = subprocess.run([sys.executable, "-m", "launch", *args], capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise SystemExit(f"launch {args[0]} failed:\n{out.stderr[-3000:]}")


# ---------------------------------------------------------------- tables


def print_tables(doc: dict) -> None:
    if doc.get("steps"):
        print("\nseconds per step (median of steps 2..N, median over rounds) and peak RSS")
        print(f"{'workload':<9}{'algo':<6}{'rows':>5}{'step s':>9}" + "".join(f"{p:>11}" for p in PHASES)
              + f"{'RSS MB':>9}")
        for r in doc["steps"]:
            s = r["split_s"]
            print(f"{r['workload']:<9}{r['algorithm']:<6}{r['rows']:>5}{r['step_s']:9.3f}"
                  + "".join(f"{s[p]:11.4f}" for p in PHASES) + f"{r['peak_rss_mb']:9.0f}")
    if doc.get("plan"):
        print("\nQwen2.5-7B, launch plan per-device peak (GiB)")
        for r in doc["plan"]:
            print(f"  {r['target']:<9}{r['algorithm']:<6} peak {r['peak_gib']:7.2f}  resident {r['resident_gib']:7.2f}"
                  f"  critic {r['critic_gib']:6.2f}  {r['verdict']}")
    if doc.get("demo"):
        print("\ndemo task, held-out accuracy (greedy) before -> after, and the curve (step: accuracy @ seconds)")
        for r in doc["demo"]:
            curve = ", ".join(f"{s}: {a:.3f} @ {t:.0f}s" for s, t, a in r["curve"])
            print(f"  seed {r['seed']} {r['algorithm']:<5} {r['before']:.3f} -> {r['after']:.3f} "
                  f"(wall {r['wall_s']:.0f} s)  [{curve}]")
    if doc.get("drift"):
        print("\nsampler-trainer drift on the demo (GRPO, seed 0; means over steps, maxima for /max)")
        for r in doc["drift"]:
            print(f"  {r['run']:<22}" + "  ".join(f"{k.split('/', 1)[1]} {r[k]:.3g}" for k in DRIFT_KEYS)
                  + f"  reward (last 10) {r['reward_last10']:.3f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", default="steps,plan,demo,drift")
    ap.add_argument("--workload", default="small,smollm2")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--demo-steps", type=int, default=300)
    ap.add_argument("--drift-steps", type=int, default=50)
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", nargs=3, metavar=("WORKLOAD", "ALGORITHM", "STEPS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        name, algorithm, steps = args.child
        print(json.dumps(run_steps(common.WORKLOADS[name], algorithm, int(steps))))
        return 0
    parts = args.part.split(",")
    doc = {"date": time.strftime("%Y-%m-%d"), "host": {"cpus": os.cpu_count()}}
    if "steps" in parts:
        doc["steps"] = steps_part(common.select(args.workload), args.steps, args.rounds)
    if "plan" in parts:
        doc["plan"] = plan_part()
    with tempfile.TemporaryDirectory() as tmp:  # the demo's warm starts, shared by the demo and drift parts
        if "demo" in parts:
            doc["demo"] = demo_part(tmp, [int(s) for s in args.seeds.split(",")], args.demo_steps)
        if "drift" in parts:
            doc["drift"] = drift_part(tmp, args.drift_steps)
    print_tables(doc)
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
