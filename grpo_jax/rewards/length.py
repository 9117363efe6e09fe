"""Length-shaped rewards: Kimi 1.5 length penalty, open-r1 cosine scaling, DAPO soft overlong punishment.

Lengths: when the trainer passes a `completion_lengths` column (token counts
of each completion), it is used; otherwise `length` and `cosine` count
characters (as open-r1 does) and `soft_overlong` counts whitespace-separated
words (a rough stand-in for tokens; pass `completion_lengths` for exact DAPO).

Correctness for `length` and `cosine` is `accuracy`'s (math answer vs the
`answer` / `solution` column); completions without a reference score None.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

from grpo_jax.rewards.math import is_correct, references_from
from grpo_jax.rewards.registry import RewardError, register_factory


def _lengths(completions: Sequence[str], columns: dict, unit: str) -> list[float]:
    given = columns.get("completion_lengths")
    if given is not None:
        return [float(x) for x in given]
    if unit == "words":
        return [float(len(c.split())) for c in completions]
    return [float(len(c)) for c in completions]


def prompt_groups(prompts: Sequence[str], n: int, group_size: Optional[int]) -> list[list[int]]:
    """Indices of each group: consecutive chunks of `group_size`, else completions sharing a prompt."""
    if group_size:
        if n % group_size:
            raise RewardError(f"{n} completions do not split into groups of {group_size}")
        return [list(range(i, i + group_size)) for i in range(0, n, group_size)]
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)
    return list(groups.values())


@register_factory("length")
def make_length_reward(group_size: Optional[int] = None) -> Callable[..., list[Optional[float]]]:
    """Kimi 1.5 length reward within each prompt group.

    lambda = 0.5 - (len - min_len) / (max_len - min_len) over the group; a correct
    completion scores lambda, a wrong one min(0, lambda); 0 when all lengths are
    equal. group_size: consecutive groups of this size; None groups completions
    by identical prompt text.
    """

    def length(prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> list[Optional[float]]:
        n = len(completions)
        refs = references_from(columns, n)
        correct = [is_correct(c, r) for c, r in zip(completions, refs)]
        lengths = _lengths(completions, columns, "chars")
        out: list[Optional[float]] = [None] * n
        for group in prompt_groups(prompts, n, group_size):
            lo = min(lengths[i] for i in group)
            hi = max(lengths[i] for i in group)
            for i in group:
                if correct[i] is None:
                    continue
                if hi == lo:
                    out[i] = 0.0
                    continue
                lam = 0.5 - (lengths[i] - lo) / (hi - lo)
                out[i] = lam if correct[i] else min(0.0, lam)
        return out

    length.per_completion = False  # type: ignore[attr-defined]  # depends on the whole group
    return length


@register_factory("cosine")
def make_cosine_reward(
    min_value_wrong: float = -1.0,
    max_value_wrong: float = -0.5,
    min_value_correct: float = 0.5,
    max_value_correct: float = 1.0,
    max_len: int = 1000,
) -> Callable[..., list[Optional[float]]]:
    """open-r1's cosine-scaled reward: short correct answers score max_value_correct,
    falling to min_value_correct at max_len; short wrong answers score min_value_wrong
    (the harshest), rising to max_value_wrong at max_len. Lengths past max_len count as max_len."""
    if max_len <= 0:
        raise RewardError(f"cosine reward needs max_len > 0, got {max_len}")

    def cosine(prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> list[Optional[float]]:
        refs = references_from(columns, len(completions))
        lengths = _lengths(completions, columns, "chars")
        out: list[Optional[float]] = []
        for c, r, n in zip(completions, refs, lengths):
            ok = is_correct(c, r)
            if ok is None:
                out.append(None)
                continue
            progress = min(1.0, max(0.0, n / max_len))
            cos = math.cos(progress * math.pi)
            if ok:
                lo, hi = min_value_correct, max_value_correct
            else:  # swapped: longer wrong answers are punished less
                lo, hi = max_value_wrong, min_value_wrong
            out.append(lo + 0.5 * (hi - lo) * (1.0 + cos))
        return out

    return cosine


@register_factory("soft_overlong")
def make_soft_overlong_reward(
    max_completion_len: int = 256, soft_cache_len: Optional[int] = None
) -> Callable[..., list[float]]:
    """DAPO soft overlong punishment: 0 up to max_completion_len - soft_cache_len tokens,
    then falling linearly to -1 at max_completion_len (and -1 beyond).

    soft_cache_len defaults to max_completion_len // 4. The trainer's context fills
    max_completion_len from rollout.max_completion_length.
    """
    cache = max_completion_len // 4 if soft_cache_len is None else soft_cache_len
    if max_completion_len <= 0 or not 0 < cache <= max_completion_len:
        raise RewardError(
            f"soft_overlong needs 0 < soft_cache_len <= max_completion_len, got {cache} and {max_completion_len}"
        )
    start = max_completion_len - cache

    def soft_overlong(prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> list[float]:
        out = []
        for n in _lengths(completions, columns, "words"):
            if n <= start:
                out.append(0.0)
            elif n <= max_completion_len:
                out.append((start - n) / cache)
            else:
                out.append(-1.0)
        return out

    return soft_overlong
