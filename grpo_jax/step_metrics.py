"""What one GRPO step logs: rewards, advantages, lengths, timings and throughput over the global batch.

Multi-process: each process samples and scores its own rows; the logged numbers cover every
process's (`gather_rewards`, `combine_prompt_metrics`; both are no-ops on one process).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np

from grpo_jax import distributed
from grpo_jax.rewards.compute import RewardResult

# the metrics a run keeps in its history (checkpointed, returned by train())
HISTORY_KEYS = ("reward/mean", "loss", "kl", "entropy", "completion/mean_length", "time/step_s")


class TrainingStopped(ValueError):
    """Training cannot go on (e.g. non-finite losses in a row); the message says why."""


class SkippedUpdates:
    """Counts updates skipped for a non-finite loss or gradient (the train step leaves the state as it
    was); warns on each and stops the run after run.max_skipped_updates in a row."""

    def __init__(self, limit: int):
        self.limit, self.in_a_row = limit, 0

    def check(self, step: int, metrics: dict) -> None:
        skipped = metrics.get("update_skipped", 0.0)
        self.in_a_row = self.in_a_row + 1 if skipped else 0
        if skipped:
            print(f"warning: step {step + 1}: non-finite loss ({metrics.get('loss')}) or grad norm "
                  f"({metrics.get('grad_norm')}); update skipped", flush=True)
        if self.in_a_row >= self.limit:
            raise TrainingStopped(
                f"{self.in_a_row} steps in a row ending at step {step + 1} had a non-finite loss "
                f"(last: loss={metrics.get('loss')}, grad_norm={metrics.get('grad_norm')}); lower "
                "optim.learning_rate or check the rewards and data; the last good checkpoint is kept")


class StepTimes(NamedTuple):
    """Wall-clock seconds of a step's phases."""

    rollout: float
    reward: float
    train: float

    @property
    def step(self) -> float:
        return self.rollout + self.reward + self.train


def gather_rewards(result: RewardResult) -> RewardResult:
    """Every process's scores in one RewardResult; the result itself single-process."""
    if jax.process_count() == 1:
        return result
    rewards = distributed.allgather_rows(result.rewards)
    errors = distributed.allgather_rows(np.asarray([[result.num_errors.get(n, 0) for n in result.names]]))
    means = {}
    for k, name in enumerate(result.names):
        col = rewards[:, k][~np.isnan(rewards[:, k])]
        means[name] = float(col.mean()) if col.size else float("nan")
    return RewardResult(result.names, result.weights, rewards, distributed.allgather_rows(result.total), means,
                        {n: int(e) for n, e in zip(result.names, errors.sum(0))})


def combine_prompt_metrics(metrics: dict) -> dict:
    """Per-process prompt metrics over all processes: counts add up, maxima take the max, means average
    (every process has as many prompts). The dict itself single-process."""
    if jax.process_count() == 1:
        return metrics

    def combine(key, column):
        if key.endswith("_max"):
            return column.max()
        return column.sum() if key.startswith("data/prompts_") else column.mean()

    return {k: float(combine(k, column)) for k, column in distributed.allgather_scalars(metrics).items()}


def grpo_step_metrics(train: dict, result: RewardResult, abs_advantages: np.ndarray, lengths: np.ndarray,
                      truncated: np.ndarray, flat_groups: np.ndarray, times: StepTimes, train_flops: float,
                      prompt_metrics: dict, peak_tflops_per_device: float = 0.0) -> dict:
    """The step's metrics from the global batch's arrays (`gather_rewards`, `distributed.allgather_rows`)."""
    metrics = {
        **train,
        **result.stats("reward/"),
        "reward/mean": float(result.total.mean()),
        "reward/std": float(result.total.std()),
        "reward/zero_std_groups": float(np.mean(flat_groups)),
        "advantage/abs_mean": float(abs_advantages.mean()),
        "completion/mean_length": float(lengths.mean()),
        "completion/min_length": float(lengths.min()),
        "completion/max_length": float(lengths.max()),
        "completion/truncated": float(truncated.mean()),
        "time/rollout_s": times.rollout,
        "time/reward_s": times.reward,
        "time/train_s": times.train,
        "time/step_s": times.step,
        "throughput/generated_tokens_per_s": float(lengths.sum()) / max(times.rollout, 1e-9),
        "throughput/train_tflops": train_flops / max(times.train, 1e-9) / 1e12,
        **prompt_metrics,
    }
    if peak_tflops_per_device:
        metrics["throughput/train_mfu"] = metrics["throughput/train_tflops"] / (peak_tflops_per_device *
                                                                                jax.device_count())
    return metrics
