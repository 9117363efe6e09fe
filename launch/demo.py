"""The built-in default job: watch GRPO teach a small model to carry the one, on a CPU.

    python -m launch demo --config configs/demo.yaml      (what `make demo` runs)

1. Build a small character-level model with random weights (no downloads).
2. Warm start (SFT) on answers from a sloppy teacher who forgets to carry the one
   60% of the time (47+8 -> "45"): the model learns to add, and learns the mistake.
3. GRPO with one reward, "is the answer right?": no teacher, no labels of how.
4. Held-out accuracy before and after GRPO, as a table, plus the run's plots.

More supervised steps cannot fix step 2's mistake (the data has it); the reward can.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

from launch.common import add_config_arguments, config_from_args

CHAR_MODEL = dict(hidden=128, layers=4, heads=4, kv_heads=2, mlp=384)  # 0.8M parameters


def add_arguments(parser):
    add_config_arguments(parser)


def main(args) -> int:
    from grpo_jax.loop import train
    from grpo_jax.models.tiny import make_char_model
    from grpo_jax.sft import run_sft

    cfg = config_from_args(args)
    t0 = time.perf_counter()
    out = Path(cfg.run.output_dir)
    base, sft_dir, grpo_dir = out / "base", out / "sft", out / "grpo"
    stale = [d for d in (base, sft_dir, grpo_dir) if d.exists()]
    if stale:
        print(f"replacing the previous demo's outputs in {out}", flush=True)
        for d in stale:
            shutil.rmtree(d)
    print(__doc__.split("\n\n", 1)[1], flush=True)

    print(f"[1/3] a random {CHAR_MODEL['layers']}-layer character-level model -> {base}", flush=True)
    make_char_model(base, seed=cfg.run.seed, **CHAR_MODEL)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=str(base)))

    print(f"\n[2/3] warm start: {cfg.sft.steps} supervised steps on the sloppy teacher's answers", flush=True)
    t_sft = time.perf_counter()
    model_dir = run_sft(cfg, sft_dir)
    t_sft = time.perf_counter() - t_sft

    algorithm = cfg.run.algorithm.upper()  # --run.algorithm=ppo runs the same demo with PPO and a critic
    print(f"\n[3/3] {algorithm}: {cfg.run.steps} steps, reward = {' + '.join(_weighted(cfg.rewards))}", flush=True)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=str(model_dir)),
                              run=dataclasses.replace(cfg.run, output_dir=str(grpo_dir)))
    t_grpo = time.perf_counter()
    summary = train(cfg, show_config=False)  # one line saying where the resolved config went
    t_grpo = time.perf_counter() - t_grpo
    if "stopped_at" in summary:  # a signal: the step is saved, and `make demo` starts over anyway
        return 0

    print()
    print(results_table(summary["before"], summary["after"], summary["history"], algorithm))
    print(f"\nwall time {time.perf_counter() - t0:.0f} s (warm start {t_sft:.0f} s, {algorithm} with its evaluations "
          f"{t_grpo:.0f} s)")
    print("outputs:")
    print(f"  {grpo_dir / 'metrics.jsonl'}  (every step's metrics; `python -m launch plot {grpo_dir}` redraws)")
    for plot in summary["plots"]:
        print(f"  {plot}")
    print(f"  {grpo_dir / 'checkpoints'}  (`python -m launch export --run {grpo_dir} --out DIR` -> HF folder)")
    print(f"  {model_dir}  (the warm-started model, before {algorithm})")
    return 0


def _weighted(rewards_cfg) -> list[str]:
    weights = rewards_cfg.weights or [1.0] * len(rewards_cfg.functions)
    return [f"{w:g} x {name}" for name, w in zip(rewards_cfg.functions, weights) if w]


def results_table(before: dict, after: dict, history: list[dict], algorithm: str = "GRPO") -> str:
    """Held-out metrics before and after RL, and the training reward at the start and the end."""
    rows = [("held-out accuracy (greedy)", "eval/pass@1", "{:.1%}"),
            ("answers that are a bare number", "eval/number_only", "{:.1%}"),
            ("mean completion length (tokens)", "eval/mean_length", "{:.2f}")]
    lines = [f"{'':34}{'before ' + algorithm:>14}{'after ' + algorithm:>14}{'change':>10}"]
    for label, key, fmt in rows:
        if key in before and key in after:
            b, a = before[key], after[key]
            change = f"{(a - b) * 100:+.1f} pt" if fmt.endswith("%}") else f"{a - b:+.2f}"
            lines.append(f"{label:34}{fmt.format(b):>14}{fmt.format(a):>14}{change:>10}")
    rewards = [h["reward/mean"] for h in history if "reward/mean" in h]
    if len(rewards) >= 2:
        k = max(1, len(rewards) // 10)
        first, last = sum(rewards[:k]) / k, sum(rewards[-k:]) / k
        lines.append(f"{f'training reward (mean of {k} steps)':34}{first:>14.3f}{last:>14.3f}{last - first:>+10.3f}")
    n = int(after.get("eval/examples", before.get("eval/examples", 0)))
    lines.append(f"({n} held-out problems, never seen in the warm start or in {algorithm})")
    return "\n".join(lines)
