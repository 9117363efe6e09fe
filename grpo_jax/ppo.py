"""PPO's advantage stage: per-token rewards, GAE and the critic's value loss (run.algorithm=ppo).

Pure functions of arrays, jit-able, float32 math (float64 when the inputs are, for reference checks).
They follow TRL's `PPOTrainer` term for term: `masked_whiten` as `trl.trainer.utils`, GAE as its
reverse loop, the value loss clipped around the old values. One convention differs: TRL adds the
task score one position past the last completion token (its `sequence_lengths_p1`, a padding
position it keeps in the mask); here the score is the reward of the last completion token itself,
and every sum runs over the completion mask.
Shapes: `B` completions, `N` completion length.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from grpo_jax.config import KL_ESTIMATORS, Config
from grpo_jax.objective import StepTotals, k3_kl


def kl_in_reward(cfg: Config) -> bool:
    """Whether grpo.beta's KL is a per-token reward (run.algorithm=ppo, ppo.kl_penalty=reward) rather than the
    loss's k3 term."""
    return cfg.run.algorithm == "ppo" and cfg.ppo.kl_penalty == "reward"


class AdvantageSettings(NamedTuple):
    """What the advantage stage reads of a config (`ppo_advantages`)."""

    beta: float  # the reward's KL coefficient: grpo.beta with ppo.kl_penalty=reward, else 0
    kl_estimator: str = "k1"
    gamma: float = 1.0
    lam: float = 0.95
    whiten_rewards: bool = False
    whiten_advantages: bool = True

    @classmethod
    def from_config(cls, cfg: Config) -> "AdvantageSettings":
        p = cfg.ppo
        return cls(cfg.grpo.beta if kl_in_reward(cfg) else 0.0, p.kl_estimator, p.gamma, p.lam,
                   p.whiten_rewards, p.whiten_advantages)


class Advantages(NamedTuple):
    advantages: jax.Array  # [B, N] per-token GAE advantages (whitened over the batch's tokens by default)
    returns: jax.Array  # [B, N] the value targets: GAE advantages before whitening + old values
    rewards: jax.Array  # [B, N] the per-token rewards GAE ran on (score at the last token, - beta KL)


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.sum(jnp.where(mask, x, 0.0)) / jnp.sum(mask)


def masked_var(x: jax.Array, mask: jax.Array, unbiased: bool = True) -> jax.Array:
    """TRL's masked_var: the mean square deviation over mask, times n / (n - 1) when unbiased."""
    centered = jnp.where(mask, x - masked_mean(x, mask), 0.0)
    var = masked_mean(centered**2, mask)
    if unbiased:
        n = jnp.sum(mask)
        var = var * n / jnp.maximum(n - 1, 1)
    return var


def masked_whiten(x: jax.Array, mask: jax.Array, shift_mean: bool = True) -> jax.Array:
    """(x - mean) / sqrt(var + 1e-8) over mask (TRL's masked_whiten); shift_mean=False adds the mean back."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * jax.lax.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


def token_kl(logp: jax.Array, ref_logp: jax.Array, estimator: str) -> jax.Array:
    """The per-token KL(policy || ref) estimate the reward subtracts: k1 = log pi - log ref, or k3."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator={estimator!r}: expected one of {', '.join(KL_ESTIMATORS)}")
    return logp - ref_logp if estimator == "k1" else k3_kl(ref_logp, logp)


def last_token(mask: jax.Array) -> jax.Array:
    """[B, N] bool: each row's last completion token (none in a row without one)."""
    index = mask.shape[1] - 1 - jnp.argmax(mask[:, ::-1], axis=1)
    return (jnp.arange(mask.shape[1])[None] == index[:, None]) & jnp.any(mask, axis=1, keepdims=True)


def token_rewards(scores: jax.Array, logp: Optional[jax.Array], ref_logp: Optional[jax.Array], mask: jax.Array,
                  kl_coef: float, estimator: str = "k1") -> jax.Array:
    """[B, N]: the task score [B] at each completion's last token, minus kl_coef x KL at every token."""
    mask = mask.astype(bool)
    dtype = jnp.promote_types(scores.dtype, jnp.float32)
    rewards = jnp.where(last_token(mask), scores.astype(dtype)[:, None], 0.0)
    if kl_coef != 0:
        kl = token_kl(logp.astype(dtype), ref_logp.astype(dtype), estimator)
        rewards = rewards - kl_coef * jnp.where(mask, kl, 0.0)
    return jnp.where(mask, rewards, 0.0)


def gae(rewards: jax.Array, values: jax.Array, mask: jax.Array, gamma: float,
        lam: float) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimates and returns [B, N], by a reverse scan over the completion positions.

    delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}, returns = A + V; values and
    rewards count only inside the mask (V past a completion's end is 0), as TRL's masked values.
    """
    mask = mask.astype(bool)
    rewards = jnp.where(mask, rewards, 0.0)
    values = jnp.where(mask, values.astype(rewards.dtype), 0.0)
    next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)
    deltas = rewards + gamma * next_values - values

    def back(carry, delta):
        carry = delta + gamma * lam * carry
        return carry, carry

    _, advantages = jax.lax.scan(back, jnp.zeros_like(deltas[:, 0]), deltas.T, reverse=True)
    advantages = jnp.where(mask, advantages.T, 0.0)
    return advantages, jnp.where(mask, advantages + values, 0.0)


def ppo_advantages(scores: jax.Array, old_logp: Optional[jax.Array], ref_logp: Optional[jax.Array],
                   values: jax.Array, mask: jax.Array, cfg: AdvantageSettings) -> Advantages:
    """The advantage stage of run.algorithm=ppo over one generation batch (every row: whitening is global).

    scores [B]: the task rewards; old_logp / ref_logp [B, N]: the sampling policy's and the reference's
    log-probs (the reward's KL; None when it has none); values [B, N]: the critic's before the update.
    cfg: `AdvantageSettings`."""
    mask = mask.astype(bool)
    rewards = token_rewards(scores, old_logp, ref_logp, mask, cfg.beta, cfg.kl_estimator)
    if cfg.whiten_rewards:
        rewards = jnp.where(mask, masked_whiten(rewards, mask, shift_mean=False), 0.0)
    advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        advantages = jnp.where(mask, masked_whiten(advantages, mask), 0.0)
    return Advantages(advantages, returns, rewards)


def value_loss(values: jax.Array, old_values: jax.Array, returns: jax.Array, mask: jax.Array, cliprange_value: float,
               totals: Optional[StepTotals] = None):
    """0.5 x the token mean of max((V - R)^2, (clip(V, V_old +- c) - R)^2) (TRL's vf_loss). Returns (loss, metrics).

    totals: the whole update's token count when this is one micro-batch of it (the shares add up)."""
    mask = mask.astype(bool)
    dtype = jnp.promote_types(values.dtype, jnp.float32)
    values, old_values, returns = (jnp.where(mask, x.astype(dtype), 0.0) for x in (values, old_values, returns))
    clipped = jnp.clip(values, old_values - cliprange_value, old_values + cliprange_value)
    unclipped_loss, clipped_loss = (values - returns) ** 2, (clipped - returns) ** 2
    tokens = jnp.sum(mask.astype(dtype)) if totals is None else jnp.asarray(totals.tokens, dtype)
    tokens = jnp.maximum(tokens, 1.0)

    def token_mean(x):
        return jnp.sum(jnp.where(mask, x, 0.0)) / tokens

    loss = 0.5 * token_mean(jnp.maximum(unclipped_loss, clipped_loss))
    metrics = {"value/loss": loss, "value/clip_fraction": token_mean((clipped_loss > unclipped_loss).astype(dtype)),
               "value/mean": token_mean(values), "value/error": token_mean(unclipped_loss)}
    return loss, metrics


def explained_variance(values, returns, mask) -> jax.Array:
    """1 - Var(returns - values) / Var(returns) over the mask: how much of the returns the critic predicts."""
    mask = mask.astype(bool)
    return 1.0 - masked_var(returns - values, mask, unbiased=False) / jnp.maximum(
        masked_var(returns, mask, unbiased=False), 1e-8)
