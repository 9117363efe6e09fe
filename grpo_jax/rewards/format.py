"""Format rewards: the R1 template ``<think>...</think><answer>...</answer>``, or a bare number.

When the prompt already ends with ``<think>`` (the R1-Zero template opens the
think block for the model), the completion is scored as if it began with
``<think>\\n`` so that a well-formed continuation still gets full credit.
"""

from __future__ import annotations

import re
from typing import Any, Optional, Sequence

from grpo_jax.rewards.registry import register

STRICT_FORMAT = re.compile(r"^<think>\n.*?\n</think>\n<answer>\n.*?\n</answer>$", re.DOTALL)
LENIENT_FORMAT = re.compile(r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$", re.DOTALL)
NUMBER_ONLY = re.compile(r"^\s*-?\d[\d,]*(\.\d+)?\s*$")


def with_prompt_prefix(prompt: Optional[str], completion: str) -> str:
    """Prepend the ``<think>`` the prompt opened, if it did."""
    if prompt and prompt.rstrip().endswith("<think>") and not completion.lstrip().startswith("<think>"):
        return "<think>\n" + (completion[1:] if completion.startswith("\n") else completion)
    return completion


def _texts(prompts: Sequence[Optional[str]], completions: Sequence[str]) -> list[str]:
    prompts = list(prompts) if prompts is not None else [None] * len(completions)
    return [with_prompt_prefix(p, c) for p, c in zip(prompts, completions)]


@register("format")
def format_reward(prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> list[float]:
    """1.0 if the completion is exactly ``<think>\\n...\\n</think>\\n<answer>\\n...\\n</answer>``, else 0.0."""
    return [1.0 if STRICT_FORMAT.match(t) else 0.0 for t in _texts(prompts, completions)]


@register("format_lenient")
def format_lenient(prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> list[float]:
    """1.0 for ``<think>...</think> <answer>...</answer>`` with any whitespace around and between, else 0.0."""
    return [1.0 if LENIENT_FORMAT.match(t) else 0.0 for t in _texts(prompts, completions)]


def count_tags(text: str) -> float:
    """open-r1's tag count: 0.25 for each of the four R1 tags (with their newlines) appearing exactly once."""
    score = 0.0
    if text.count("<think>\n") == 1:
        score += 0.25
    if text.count("\n</think>\n") == 1:
        score += 0.25
    if text.count("\n<answer>\n") == 1:
        score += 0.25
    if text.count("\n</answer>") == 1:
        score += 0.25
    return score


@register("tag_count")
def tag_count(prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> list[float]:
    """Partial format credit in [0, 1]: 0.25 per R1 tag appearing exactly once (open-r1)."""
    return [count_tags(t) for t in _texts(prompts, completions)]


@register("number_only")
def number_only(prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> list[float]:
    """1.0 if the completion is just a number (``-12``, ``1,024``, ``0.5``), else 0.0: the short-answer format."""
    return [1.0 if NUMBER_ONLY.match(c) else 0.0 for c in completions]
