"""Device rewards: jittable functions of token ids, `fn(completion_ids, completion_mask, **arrays) -> f32[B]`."""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp

from grpo_jax.rewards.registry import RewardError, device_reward, register_factory


@register_factory("target_token")
def make_target_token_reward(token_id: int = 0, mode: str = "fraction") -> Callable:
    """Reward emitting `token_id`: "fraction" of the completion's (masked-in) tokens that
    are it, or "presence" 1.0 if it appears at all. Mostly for end-to-end tests: a policy
    trained on it should learn to emit the token."""
    if mode not in ("fraction", "presence"):
        raise RewardError(f"target_token mode must be fraction or presence, got {mode!r}")
    token_id = int(token_id)

    @device_reward
    def target_token(completion_ids, completion_mask, **arrays):
        """completion_ids: i32[B, N]; completion_mask: [B, N] (1 for real tokens) -> f32[B]."""
        mask = completion_mask.astype(jnp.float32)
        hits = (completion_ids == token_id).astype(jnp.float32) * mask
        if mode == "presence":
            return (hits.sum(axis=-1) > 0).astype(jnp.float32)
        return hits.sum(axis=-1) / jnp.maximum(mask.sum(axis=-1), 1.0)

    return target_token
