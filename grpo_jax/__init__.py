"""grpo_jax: GRPO fine-tuning of LLMs in JAX/Flax, from one CPU to a TPU pod."""

from grpo_jax.config import Config, ConfigError, load_config
from grpo_jax.objective import group_advantages, k3_kl, policy_loss, token_entropy, token_logprobs

__version__ = "0.1.0"

__all__ = [
    "Config",
    "ConfigError",
    "load_config",
    "group_advantages",
    "k3_kl",
    "policy_loss",
    "token_entropy",
    "token_logprobs",
]
