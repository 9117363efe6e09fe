"""Rewards scored by the dataset itself, e.g. reasoning-gym's `score_answer(answer, entry)`.

Columns:

- ``scorer``: per row, a callable ``scorer(answer, entry) -> float`` (for
  reasoning-gym: ``dataset.score_answer``); a row whose scorer is None scores None;
- ``entry``: per row, the object handed to the scorer as its second argument
  (reasoning-gym's entry dict). Without an ``entry`` column the scorer receives a
  dict of the row's other columns (``answer``, ``metadata``, ...).

The answer handed to the scorer depends on `extract`:
``"answer_tag"`` the content of the last ``<answer>...</answer>``, or None
(reasoning-gym's convention); ``"auto"`` that, else the last ``\\boxed{}``, else
the whole stripped completion; ``"none"`` the whole completion.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

from grpo_jax.rewards.math import answer_tag, last_boxed
from grpo_jax.rewards.registry import RewardError, register_factory


def _extract(completion: str, mode: str) -> Optional[str]:
    if mode == "none":
        return completion
    tagged = answer_tag(completion)
    if tagged is not None or mode == "answer_tag":
        return tagged
    boxed = last_boxed(completion)
    if boxed is not None:
        return boxed
    return completion.strip()


@register_factory("dataset_scorer")
def make_dataset_scorer_reward(extract: str = "answer_tag") -> Callable[..., list[Optional[float]]]:
    """Score each completion with the row's own `scorer(answer, entry)` column (see module docstring)."""
    if extract not in ("answer_tag", "auto", "none"):
        raise RewardError(f"dataset_scorer extract must be answer_tag, auto or none, got {extract!r}")

    def dataset_scorer(prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> list[Optional[float]]:
        n = len(completions)
        scorers = columns.get("scorer")
        if scorers is None:
            return [None] * n
        entries = columns.get("entry")
        others = {k: v for k, v in columns.items() if k not in ("scorer", "entry")}
        out: list[Optional[float]] = []
        for i, completion in enumerate(completions):
            scorer = scorers[i]
            if scorer is None:
                out.append(None)
                continue
            if not callable(scorer):
                raise RewardError(f"dataset_scorer: column 'scorer' row {i} is a {type(scorer).__name__}, "
                                  "not a callable")
            entry = entries[i] if entries is not None else {k: v[i] for k, v in others.items()}
            score = scorer(_extract(completion, extract), entry)
            out.append(None if score is None else float(score))
        return out

    return dataset_scorer
