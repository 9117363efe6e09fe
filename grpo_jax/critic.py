"""PPO's critic (run.algorithm=ppo): a decoder of a supported family with a scalar value head.

V(s_t) for every completion token t is the head applied to the hidden state that predicts token t
(the same positions the policy's log-probs read), as TRL's value model: an HF
`*ForSequenceClassification` with one label, whose `score` head it reads for every position.
The critic has no unembedding: its decoder config is tied (`tie_word_embeddings`), so an untied
model's lm_head is never loaded, trained or checkpointed. Its params are
{"decoder": <the decoder's param dict>, "score": [D]}.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from grpo_jax import sharding
from grpo_jax.config import Config, ConfigError
from grpo_jax.models import transformer
from grpo_jax.models.hf import SCORE_HEAD, SafetensorsFile
from grpo_jax.policy import Policy, load_weights, model_source


class Critic(NamedTuple):
    """The critic's decoder (static under jit), its initial params on the mesh and where they live."""

    decoder: transformer.Decoder
    params: Any  # {"decoder": ..., "score": [D]}
    shardings: Any


def critic_config(config: transformer.TransformerConfig) -> transformer.TransformerConfig:
    """The critic's decoder config: the model's, without an unembedding of its own (the head reads hidden states)."""
    return config.replace(tie_word_embeddings=True)


def without_unembedding(params: dict) -> dict:
    return {k: v for k, v in params.items() if k != "lm_head"}


def load_critic(cfg: Config, policy: Policy) -> Critic:
    """The critic a PPO run starts from: ppo.critic_path's weights (and score head, if the folder has one),
    or a copy of the policy's; a head without weights to start from starts at 0 (values 0: the first
    advantages are the returns themselves)."""
    path = cfg.ppo.critic_path
    if path is None:
        return critic_from_policy(policy.config, policy.params, policy.mesh)
    source = model_source(path)
    overrides = cfg.model.decoder_overrides()
    if source.kind == "hf":
        overrides["tie_word_embeddings"] = True  # lm_head (absent from a value model) is not read
    config, decoder = load_weights(source, policy.mesh, overrides)
    config, decoder = critic_config(config), without_unembedding(decoder)
    if config.vocab_size != policy.config.vocab_size:
        raise ConfigError(f"ppo.critic_path={path}: its vocabulary has {config.vocab_size} tokens, the policy's "
                          f"{policy.config.vocab_size}; the critic reads the policy's token ids")
    head = read_score_head(Path(source.path), config.hidden_size) if source.local else None
    return make_critic(config, decoder, head, policy.mesh)


def critic_from_policy(config: transformer.TransformerConfig, params: dict, mesh) -> Critic:
    """A critic that starts as a copy of the policy's decoder (params placed on `mesh`) with a zero head."""
    return make_critic(critic_config(config), jax.tree.map(jnp.copy, without_unembedding(params)), None, mesh)


def make_critic(config: transformer.TransformerConfig, decoder: dict, head, mesh) -> Critic:
    """The Critic of a (tied) decoder config and its params, with the [D] head `head` (None: zeros), replicated."""
    dtype = config.param_jnp_dtype
    score = jnp.zeros((config.hidden_size,), dtype) if head is None else jnp.asarray(head, dtype)
    params = {"decoder": decoder, "score": jax.device_put(score, sharding.replicated(mesh))}
    return Critic(transformer.Decoder(config), params, jax.tree.map(lambda x: x.sharding, params))


def read_score_head(folder: Path, hidden: int):
    """The [D] value head of an HF *ForSequenceClassification folder with one label, or None without one."""
    for file in sorted(folder.glob("*.safetensors")):
        store = SafetensorsFile(file)
        if SCORE_HEAD in store.keys():
            score = np.asarray(store.get(SCORE_HEAD), np.float32)
            if score.shape != (1, hidden):
                raise ConfigError(f"{file}: {SCORE_HEAD} has shape {list(score.shape)}; a critic's head is "
                                  f"[1, {hidden}] (one label)")
            return score[0]
    return None


def critic_values(decoder: transformer.Decoder, params: Any, tokens, positions, attention_mask, n: int) -> jax.Array:
    """V [R, n] float32: the value of each of the last n tokens' prefixes (the state before each completion token)."""
    hidden = decoder.hidden_states(params["decoder"], tokens, positions, attention_mask)
    return jnp.einsum("rnd,d->rn", hidden[:, -n - 1:-1], params["score"].astype(hidden.dtype),
                      preferred_element_type=jnp.float32)
