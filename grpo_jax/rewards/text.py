"""Text-shape rewards: language consistency (DeepSeek-R1), reasoning steps and n-gram repetition (open-r1)."""

from __future__ import annotations

import re
from typing import Any, Callable, Optional, Sequence

from grpo_jax.rewards.format import with_prompt_prefix
from grpo_jax.rewards.registry import RewardError, register, register_factory

# ---------------------------------------------------------------------------
# Language consistency

SCRIPTS: dict[str, str] = {
    "latin": "A-Za-z\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u024f\u1e00-\u1eff",
    "han": "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff",
    "kana": "\u3040-\u30ff\u31f0-\u31ff\uff66-\uff9f",
    "hangul": "\uac00-\ud7af\u1100-\u11ff\u3130-\u318f",
    "cyrillic": "\u0400-\u052f",
    "greek": "\u0370-\u03ff\u1f00-\u1fff",
    "arabic": "\u0600-\u06ff\u0750-\u077f",
    "hebrew": "\u0590-\u05ff",
    "devanagari": "\u0900-\u097f",
    "thai": "\u0e00-\u0e7f",
}

LANGUAGE_SCRIPTS: dict[str, tuple[str, ...]] = {
    **{lang: ("latin",) for lang in ("en", "fr", "de", "es", "it", "pt", "nl", "sv", "da", "no", "fi", "pl",
                                     "cs", "ro", "hu", "tr", "id", "ms", "vi", "ca", "hr", "sk", "sl")},
    "zh": ("han",),
    "ja": ("han", "kana"),
    "ko": ("hangul",),
    **{lang: ("cyrillic",) for lang in ("ru", "uk", "bg", "sr", "be", "kk")},
    "el": ("greek",),
    **{lang: ("arabic",) for lang in ("ar", "fa", "ur")},
    "he": ("hebrew",),
    **{lang: ("devanagari",) for lang in ("hi", "mr", "ne")},
    "th": ("thai",),
}

# Words: each Han / kana character on its own (those scripts do not separate words
# with spaces), otherwise runs of letters; digits, punctuation and "_" are skipped.
_SPLIT_CHARS = SCRIPTS["han"] + SCRIPTS["kana"]
_WORD = re.compile(rf"[{_SPLIT_CHARS}]|[^\W\d_{_SPLIT_CHARS}]+")
_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_TAGS = re.compile(r"</?(?:think|answer)>")


def words(text: str) -> list[str]:
    """Letter words of `text` (each CJK ideograph / kana counts as one word)."""
    return _WORD.findall(text)


def language_fraction(text: str, target: str = "en") -> Optional[float]:
    """Fraction of the words of `text` written wholly in the target language's script; None without words."""
    pattern = _script_pattern(target)
    ws = words(text)
    if not ws:
        return None
    return sum(1 for w in ws if pattern.fullmatch(w)) / len(ws)


def _script_pattern(target: str) -> "re.Pattern[str]":
    key = target.lower()
    if key in LANGUAGE_SCRIPTS:
        scripts = LANGUAGE_SCRIPTS[key]
    elif key in SCRIPTS:
        scripts = (key,)
    else:
        raise RewardError(
            f"unknown language {target!r} (known: {', '.join(sorted(LANGUAGE_SCRIPTS))}; "
            f"or a script: {', '.join(sorted(SCRIPTS))})"
        )
    return re.compile("[" + "".join(SCRIPTS[s] for s in scripts) + "]+")


def _section(text: str, section: str) -> Optional[str]:
    if section == "all":
        return _TAGS.sub(" ", text)
    found = (_THINK if section == "think" else _ANSWER).findall(text)
    return found[-1] if found else None


@register_factory("language_consistency")
def make_language_consistency_reward(target: str = "en", section: str = "all") -> Callable[..., list[Optional[float]]]:
    """DeepSeek-R1's language consistency reward: the fraction of words in the target
    language's script. target: a language code (en, zh, ja, ko, ru, ...) or a script
    name (latin, han, cyrillic, ...). section: "all" (tags removed), "think" or
    "answer" (the last such block; None when absent). None when there are no words."""
    _script_pattern(target)  # fail at config time on an unknown language
    if section not in ("all", "think", "answer"):
        raise RewardError(f"language_consistency section must be all, think or answer, got {section!r}")

    def language_consistency(prompts: Sequence[str], completions: Sequence[str],
                             **columns: Any) -> list[Optional[float]]:
        out: list[Optional[float]] = []
        for p, c in zip(prompts, completions):
            part = _section(with_prompt_prefix(p, c), section)
            out.append(None if part is None else language_fraction(part, target))
        return out

    return language_consistency


# ---------------------------------------------------------------------------
# Reasoning steps

# open-r1's pattern, with numbered items matched at the start of any line
# (open-r1 only matched one at the very start of the text).
STEP_PATTERN = re.compile(r"(Step \d+:|^[ \t]*\d+\.\s|\n-|\n\*|First,|Second,|Next,|Finally,)", re.MULTILINE)


@register("reasoning_steps")
def reasoning_steps(prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> list[float]:
    """min(1, n / 3) for n step markers ("Step 1:", "1.", "- ", "* ", "First," ...), as in open-r1."""
    return [min(1.0, len(STEP_PATTERN.findall(c)) / 3) for c in completions]


# ---------------------------------------------------------------------------
# Repetition


def ngram_repetition(text: str, ngram_size: int = 3) -> float:
    """Share of repeated word n-grams: 1 - unique / total (0 when there are fewer words than n)."""
    ws = text.lower().split()
    if len(ws) < ngram_size:
        return 0.0
    grams = list(zip(*[ws[i:] for i in range(ngram_size)]))
    return 1.0 - len(set(grams)) / len(grams)


@register_factory("repetition")
def make_repetition_reward(ngram_size: int = 3, max_penalty: float = -1.0) -> Callable[..., list[float]]:
    """open-r1's n-gram repetition penalty: max_penalty * (1 - unique n-grams / n-grams), in [max_penalty, 0]."""
    if max_penalty > 0:
        raise RewardError(f"repetition max_penalty must be <= 0, got {max_penalty}")
    if ngram_size < 1:
        raise RewardError(f"repetition ngram_size must be >= 1, got {ngram_size}")

    def repetition(prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> list[float]:
        return [ngram_repetition(c, ngram_size) * max_penalty + 0.0 for c in completions]

    return repetition
