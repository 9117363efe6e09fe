"""Held-out evaluation: greedy pass@1, and sampled pass@k / maj@k.

A completion is correct when the `correct_by` reward function (default: `accuracy`,
else the first configured reward) scores it > 0.5. maj@k takes the most common
extracted answer among the k samples (math answer extraction: <answer>, \\boxed{},
`#### N`, last number) and is correct when a sample with that answer is.
"""

from __future__ import annotations

import collections
import math
import time
from typing import Any, Callable, Optional

import jax
import numpy as np

from grpo_jax import distributed
from grpo_jax.data import DataError, batches, overlong_filter
from grpo_jax.policy import Policy
from grpo_jax.rewards.compute import RewardSet
from grpo_jax.rewards.math import extract_answer
from grpo_jax.rollout import SamplingParams


class EvaluationStopped(Exception):
    """A stop signal arrived during an evaluation, which ended early (its metrics are not kept)."""


def metric_names(reward_names: list[str], k: int = 1) -> list[str]:
    """The metrics `evaluate` returns for these rewards: what checkpoint.keep_best_metric may name."""
    scores = [f"eval/pass@{k}"] if k == 1 else [f"eval/pass@{k}", f"eval/maj@{k}", f"eval/mean@{k}"]
    return [f"eval/{name}" for name in reward_names] + scores + ["eval/mean_length", "eval/examples", "eval/time_s"]


def correctness_index(names: list[str], correct_by: Optional[str] = None) -> int:
    if correct_by is not None:
        if correct_by not in names:
            raise ValueError(f"eval correctness reward {correct_by!r} is not among the rewards ({', '.join(names)})")
        return names.index(correct_by)
    for preferred in ("accuracy", "dataset_scorer"):
        if preferred in names:
            return names.index(preferred)
    return 0


def majority_correct(completions: list[str], correct: np.ndarray) -> bool:
    answers = [extract_answer(c) for c in completions]
    votes = collections.Counter(a for a in answers if a is not None)
    if not votes:
        return False
    top = votes.most_common(1)[0][0]
    return bool(any(c for a, c in zip(answers, correct) if a == top))


def evaluate(policy: Policy, rewards: RewardSet, dataset, max_examples: int, k: int = 1,
             sampling: Optional[SamplingParams] = None, seed: int = 0, correct_by: Optional[str] = None,
             params: Any = None, stop: Optional[Callable[[], bool]] = None) -> dict:
    """Score the policy on up to `max_examples` rows of `dataset` (this process's share of them).

    params: the weights to score (default: the policy's loaded ones; a run passes its train state's).
    stop: asked before each batch (on every process together); True raises EvaluationStopped.
    k = 1 decodes greedily (pass@1); k > 1 samples k completions per prompt with `sampling`
    (default: the config's) and adds pass@k and maj@k.
    """
    t0 = time.perf_counter()
    n = min(len(dataset), max_examples)
    sp = policy.greedy if k == 1 else (sampling or policy.sampling)
    prompts_per_batch = max(1, policy.cfg.data.batch_size * policy.cfg.rollout.group_size // k)
    it = batches(dataset, prompts_per_batch, seed=0, shuffle=False, repeat=False, process_index=jax.process_index(),
                 process_count=jax.process_count(), pad_last=True, keep=overlong_filter(policy.cfg, policy.formatter))
    scores, lengths, pass_k, maj_k, seen = [], [], [], [], 0
    ci = correctness_index(rewards.names, correct_by)
    for b, batch in enumerate(it):
        if seen >= n:
            break
        if stop is not None and distributed.any_process(stop()):
            raise EvaluationStopped
        samples = policy.sample(batch["prompt"], jax.random.fold_in(jax.random.PRNGKey(seed), b), sp, k, params)
        tokens, mask = samples.local.tokens, samples.local.mask
        completions = policy.decode(tokens, mask)
        result = rewards.score_groups(samples.prompts.texts, completions, batch, k, tokens, mask)
        valid = np.asarray(batch["valid"], bool) & (np.arange(len(batch["valid"])) + seen < n)
        rows = np.repeat(valid, k)
        scores.append(result.rewards[rows])
        lengths.append(mask.sum(1)[rows])
        correct = np.nan_to_num(result.rewards[:, ci]) > 0.5
        for i in np.flatnonzero(valid):
            group = slice(i * k, (i + 1) * k)
            pass_k.append(bool(correct[group].any()))
            maj_k.append(majority_correct(completions[group], correct[group]))
        seen += int(np.asarray(batch["valid"], bool).sum())
    if not scores:
        raise DataError(f"{getattr(dataset, 'name', 'the evaluation split')}: no prompt to evaluate (every one is "
                        f"longer than rollout.max_prompt_length={policy.cfg.rollout.max_prompt_length}, "
                        "with data.overlong_prompts=drop)")
    scores, lengths = np.concatenate(scores), np.concatenate(lengths)
    names = rewards.names
    metrics = {f"eval/{name}": float(np.nanmean(scores[:, j])) if np.isfinite(scores[:, j]).any() else math.nan
               for j, name in enumerate(names)}
    if k == 1:
        metrics["eval/pass@1"] = float(np.mean(pass_k))
    else:
        metrics[f"eval/pass@{k}"] = float(np.mean(pass_k))
        metrics[f"eval/maj@{k}"] = float(np.mean(maj_k))
        metrics[f"eval/mean@{k}"] = float(np.mean(np.nan_to_num(scores[:, ci]) > 0.5))
    metrics["eval/mean_length"] = float(lengths.mean())
    metrics["eval/examples"] = float(len(pass_k))
    metrics["eval/time_s"] = time.perf_counter() - t0
    return metrics


def evaluate_over_processes(policy: Policy, rewards: RewardSet, dataset, max_examples: int, **kwargs) -> dict:
    """`evaluate` with the examples split over the processes, the metrics combined weighted by examples."""
    processes = jax.process_count()
    metrics = evaluate(policy, rewards, dataset, -(-max_examples // processes), **kwargs)
    if processes == 1:
        return metrics
    columns = distributed.allgather_scalars(metrics)
    weights = columns["eval/examples"]
    metrics = {k: float(np.average(column, weights=weights)) for k, column in columns.items()}
    metrics["eval/examples"] = float(weights.sum())
    metrics["eval/time_s"] = float(columns["eval/time_s"].max())
    return metrics
