"""Reward functions: registry, built-ins, and batch scoring.

Host reward: `fn(prompts, completions, **columns) -> list[float | None]`.
Device reward (`@device_reward`): `fn(completion_ids, completion_mask, **arrays) -> f32[B]`.
Config entries: a registry name (`accuracy`), a name with factory kwargs
(`cosine(max_len=512)`), or `package.module:function`.

Built-ins: accuracy, format, format_lenient, number_only, tag_count, language_consistency,
reasoning_steps, length, cosine, repetition, soft_overlong, dataset_scorer,
target_token (device).
"""

from grpo_jax.rewards.compute import (
    RewardResult,
    RewardSet,
    call_host_reward,
    compute_rewards,
    reward_columns,
    validate_result,
)
from grpo_jax.rewards.device import make_target_token_reward
from grpo_jax.rewards.format import format_lenient, format_reward, number_only, tag_count
from grpo_jax.rewards.length import make_cosine_reward, make_length_reward, make_soft_overlong_reward
from grpo_jax.rewards.math import (
    accuracy,
    answers_match,
    extract_answer,
    extract_reference,
    is_correct,
    last_boxed,
    math_verify_available,
)
from grpo_jax.rewards.registry import (
    RewardError,
    available_rewards,
    device_reward,
    get_reward,
    is_device_reward,
    parse_spec,
    register,
    register_factory,
    reward_name,
)
from grpo_jax.rewards.scorer import make_dataset_scorer_reward
from grpo_jax.rewards.text import (
    make_language_consistency_reward,
    make_repetition_reward,
    reasoning_steps,
)

__all__ = [
    "RewardError",
    "RewardResult",
    "RewardSet",
    "reward_columns",
    "accuracy",
    "answers_match",
    "available_rewards",
    "call_host_reward",
    "compute_rewards",
    "device_reward",
    "extract_answer",
    "extract_reference",
    "format_lenient",
    "format_reward",
    "get_reward",
    "is_correct",
    "is_device_reward",
    "last_boxed",
    "make_cosine_reward",
    "make_dataset_scorer_reward",
    "make_language_consistency_reward",
    "make_length_reward",
    "make_repetition_reward",
    "make_soft_overlong_reward",
    "make_target_token_reward",
    "math_verify_available",
    "number_only",
    "parse_spec",
    "reasoning_steps",
    "register",
    "register_factory",
    "reward_name",
    "tag_count",
    "validate_result",
]
