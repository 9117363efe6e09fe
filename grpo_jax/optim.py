"""The optax optimizer of a run: schedule, global-norm clipping, AdamW (or friends)."""

from __future__ import annotations

import dataclasses

import optax

from grpo_jax.config import Config, OptimConfig


def learning_rate_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0, then constant / cosine / linear decay to 0 at `total_steps` updates."""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    decay_steps = max(total_steps - warmup, 1)
    if cfg.schedule == "constant":
        after = optax.constant_schedule(cfg.learning_rate)
    elif cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(cfg.learning_rate, decay_steps)
    else:
        after = optax.linear_schedule(cfg.learning_rate, 0.0, decay_steps)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.learning_rate, warmup), after], [warmup])


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """`total_steps` counts optimizer updates (steps x num_iterations x num_minibatches)."""
    lr = learning_rate_schedule(cfg, total_steps)
    if cfg.optimizer == "adamw":
        opt = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "adafactor":
        opt = optax.adafactor(lr, weight_decay_rate=cfg.weight_decay or None)
    else:
        opt = optax.sgd(lr)
    if cfg.max_grad_norm is not None:
        opt = optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), opt)
    return opt


def make_critic_optimizer(cfg: Config, total_steps: int) -> optax.GradientTransformation:
    """PPO's critic's own optimizer: optim's settings at ppo.critic_learning_rate (default optim.learning_rate)."""
    lr = cfg.ppo.critic_learning_rate
    return make_optimizer(cfg.optim if lr is None else dataclasses.replace(cfg.optim, learning_rate=lr), total_steps)
