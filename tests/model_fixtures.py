"""Tiny random HF models of every supported family, and helpers to compare against them.

Reusable by other tests (e.g. rollout): ``make_hf_model(family, tmpdir)`` saves a tiny
transformers model with randomised weights (norms and biases too, so a mixed-up
weight mapping cannot hide) and returns ``(folder, torch_model)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

VOCAB = 160
PAD = 0

# family name -> (transformers config class name, model class name, config kwargs)
FAMILIES = {
    # Llama 2 style: untied embeddings, MHA (GQA ratio 1)
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, tie_word_embeddings=False, rope_theta=10000.0)),
    # Llama 3.2 style: tied, GQA ratio 4, llama3 rope scaling with a short original context so it matters
    "llama3": ("LlamaConfig", "LlamaForCausalLM", dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, head_dim=8, tie_word_embeddings=True, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16})),
    # Mistral: sliding window (4) shorter than the sequences, GQA ratio 2
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=4, tie_word_embeddings=False)),
    # Qwen2.5: q/k/v biases, tied, linear rope scaling
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1000000.0,
        rope_scaling={"rope_type": "linear", "factor": 2.0})),
    # Qwen3: q/k norms, head_dim (32) != hidden / heads (16)
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, tie_word_embeddings=True)),
    # Gemma 2: soft-capping (small caps so they bite), alternating sliding/global, GeGLU, pre+post norms
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24, attn_logit_softcapping=5.0,
        final_logit_softcapping=3.0, sliding_window=4)),
    # Gemma 3 text: q/k norms, local rope base on sliding layers, linear-scaled global rope
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, sliding_window=4,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        rope_theta=1000000.0, rope_local_base_freq=10000.0, rope_scaling={"rope_type": "linear", "factor": 8.0})),
}


def family_config(family: str, **overrides):
    """Our decoder config of a family's tiny HF config (FAMILIES)."""
    import transformers

    from grpo_jax.models.hf import config_from_hf

    config_cls, _, kwargs = FAMILIES[family]
    hf = getattr(transformers, config_cls)(vocab_size=VOCAB, **kwargs).to_dict()
    return config_from_hf(hf, **overrides)


def random_params(config, seed=0):
    """Random params of our decoder, scaled up (x3, plus noise in norms and biases) so mistakes show."""
    from flax import nnx

    from grpo_jax.models import Transformer

    params = nnx.to_pure_dict(nnx.state(Transformer(config, rngs=nnx.Rngs(seed)), nnx.Param))
    keys = iter(jax.random.split(jax.random.PRNGKey(seed + 1), len(jax.tree.leaves(params))))
    return jax.tree.map(lambda x: x * 3.0 + 0.1 * jax.random.normal(next(keys), x.shape), params)


def make_hf_model(family: str, folder, seed: int = 0, std: float = 0.15, **overrides):
    """Build, randomise and save a tiny transformers model; returns (folder, torch model in eval mode)."""
    import torch
    import transformers

    cfg_cls, model_cls, kw = FAMILIES[family]
    kw = {**kw, **overrides}
    config = getattr(transformers, cfg_cls)(
        vocab_size=VOCAB, pad_token_id=PAD, bos_token_id=None, eos_token_id=None, max_position_embeddings=256, **kw)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config)
    gemma = family.startswith("gemma")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.2 + (0.0 if gemma else 1.0))
            elif name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.2)
            else:
                p.copy_(torch.randn_like(p) * std)
    model.eval()
    model.save_pretrained(str(folder))
    return folder, model


def left_padded_batch(lengths=(7, 3, 9), seed=0, vocab=VOCAB):
    """tokens [B, T] int32 (pad id 0 on the left) and mask [B, T] int32."""
    rng = np.random.default_rng(seed)
    T = max(lengths)
    tokens = np.full((len(lengths), T), PAD, np.int32)
    mask = np.zeros((len(lengths), T), np.int32)
    for i, n in enumerate(lengths):
        tokens[i, T - n:] = rng.integers(3, vocab, n)
        mask[i, T - n:] = 1
    return tokens, mask


def hf_positions(mask: np.ndarray) -> np.ndarray:
    return np.maximum(np.cumsum(mask, -1) - 1, 0)


def torch_logits(model, tokens, mask) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens, dtype=torch.long),
                    attention_mask=torch.tensor(mask, dtype=torch.long),
                    position_ids=torch.tensor(hf_positions(mask), dtype=torch.long))
    return out.logits.float().numpy()


def torch_greedy(model, tokens, mask, n: int) -> np.ndarray:
    """[B, n] greedy continuation ids from transformers' generate."""
    import torch

    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor(tokens, dtype=torch.long),
                             attention_mask=torch.tensor(mask, dtype=torch.long),
                             do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=PAD)
    return out[:, tokens.shape[1]:].numpy()


def greedy_decode(model, tokens, mask, n: int, cache_dtype=None):
    """Greedy decoding with our KV cache: one prefill call, then n - 1 calls with T = 1.

    Returns (ids [B, n], list of per-step logits [B, V]).
    """
    from flax import nnx

    from grpo_jax.models import forward, init_cache, positions_from_mask

    graphdef, state = nnx.split(model)
    fwd = jax.jit(forward, donate_argnums=(5,))
    tokens = jnp.asarray(tokens, jnp.int32)
    mask = jnp.asarray(mask, jnp.int32)
    B, P = tokens.shape
    cache = init_cache(model.config, B, P + n, cache_dtype)
    positions = positions_from_mask(mask)
    logits, cache = fwd(graphdef, state, tokens, positions, mask, cache)
    step_logits = [logits[:, -1]]
    nxt = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)
    pos = positions[:, -1] + 1
    out = [nxt]
    ones = jnp.ones((B, 1), jnp.int32)
    for _ in range(n - 1):
        logits, cache = fwd(graphdef, state, nxt[:, None], pos[:, None], ones, cache)
        step_logits.append(logits[:, -1])
        nxt = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)
        pos = pos + 1
        out.append(nxt)
    return np.stack([np.asarray(t) for t in out], 1), [np.asarray(s) for s in step_logits]


def ours_logits(model, tokens, mask) -> np.ndarray:
    from grpo_jax.models import positions_from_mask

    logits, _ = model(jnp.asarray(tokens), positions_from_mask(mask), jnp.asarray(mask))
    return np.asarray(logits)


def max_diff_valid(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    d = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max(-1)
    return float((d * (np.asarray(mask) > 0)).max())
