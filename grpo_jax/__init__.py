"""grpo_jax: GRPO fine-tuning of LLMs in JAX/Flax, from one CPU to a TPU pod."""

from grpo_jax.config import Config, ConfigError, load_config
from grpo_jax.objective import group_advantages, k3_kl, policy_loss, token_entropy, token_logprobs

__version__ = "0.1.0"

__all__ = [
    "Config",
    "ConfigError",
    "load_config",
    "Policy",
    "SamplingParams",
    "generate",
    "group_advantages",
    "k3_kl",
    "policy_loss",
    "token_entropy",
    "token_logprobs",
]


def __getattr__(name):
    """`grpo_jax.Policy`, `grpo_jax.generate`, `grpo_jax.SamplingParams` on first use: they bring in
    Flax and transformers, which `import grpo_jax.config` (the CLI's first import) does not need."""
    if name in ("Policy", "generate"):
        from grpo_jax import policy

        return getattr(policy, name)
    if name == "SamplingParams":
        from grpo_jax.rollout import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'grpo_jax' has no attribute {name!r}")
