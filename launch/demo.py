"""The built-in default job.

Today it walks through the GRPO objective on the worked example from the design
notes: group-relative advantages, the clipped surrogate loss under each loss_type,
and the check that on-policy its gradient is the REINFORCE gradient. No model is
trained by this command yet: training runs through `python -m launch train`, and
a CPU demo that visibly teaches a model is the next milestone.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from launch.common import add_config_arguments, config_from_args


def add_arguments(parser):
    add_config_arguments(parser)


def main(args) -> int:
    import jax
    import jax.numpy as jnp

    from grpo_jax.objective import LOSS_TYPES, group_advantages, policy_loss

    cfg = config_from_args(args)
    g = cfg.grpo
    fmt = lambda xs: "[" + ", ".join(f"{float(x):+.5f}" for x in np.asarray(xs)) + "]"

    print("grpo_jax demo: the GRPO objective, worked by hand (no model is trained by this build)\n")
    rewards = jnp.array([1.0, 0.9, 0.0, 1.0])
    print(f"1. One group of G=4 completions scored {fmt(rewards)}")
    print(f"   group mean {float(rewards.mean()):.5f}, sample std {float(jnp.std(rewards, ddof=1)):.6f}")
    for scale in ("group", "none", "rloo"):
        adv = group_advantages(rewards, 4, scale=scale, eps=g.advantage_eps)
        print(f"   advantages scale={scale:<6} {fmt(adv)}")
    print("   all-equal group [1, 1, 1, 1] ->", fmt(group_advantages(jnp.ones(4), 4)))

    print("\n2. The clipped surrogate on that group, 6-token completions, after one update")
    key = jax.random.PRNGKey(cfg.run.seed)
    k1, k2, k3 = jax.random.split(key, 3)
    old = -jax.random.uniform(k1, (4, 6), minval=0.5, maxval=3.0)
    logp = old + 0.3 * jax.random.normal(k2, (4, 6))  # the policy moved a little
    ref = old + 0.1 * jax.random.normal(k3, (4, 6))
    mask = jnp.array([[1] * 6, [1] * 4 + [0] * 2, [1] * 5 + [0], [1] * 3 + [0] * 3])
    adv = group_advantages(rewards, 4, scale=g.scale_rewards, eps=g.advantage_eps)
    print(f"   beta={g.beta} epsilon={g.epsilon} epsilon_high={g.epsilon_upper} "
          f"importance_sampling_level={g.importance_sampling_level}")
    print("   loss_type   loss       kl        clip(low/high)  mean ratio")
    for loss_type in LOSS_TYPES:
        c = dataclasses.replace(g, loss_type=loss_type)
        loss, m = policy_loss(logp, old, ref, adv, mask, c)
        kl = float(m.get("kl", 0.0))
        print(f"   {loss_type:<10} {float(loss):+.5f}  {kl:.5f}   "
              f"{float(m['clip_ratio/low']):.3f}/{float(m['clip_ratio/high']):.3f}     {float(m['ratio']):.4f}")

    print("\n3. On-policy (old = current policy, beta = 0) the loss gradient is the REINFORCE gradient")
    c = dataclasses.replace(g, beta=0.0, loss_type="bnpo")
    grad = jax.grad(lambda lp: policy_loss(lp, None, None, adv, mask, c)[0])(logp)
    reinforce = -(adv[:, None] * mask) / mask.sum()
    print(f"   max |d loss/d logp - (-A * mask / tokens)| = {float(jnp.max(jnp.abs(grad - reinforce))):.2e}")
    print("\nTraining (python -m launch train --config configs/...) uses these same functions in its jitted step.")
    return 0
