"""The decoder with each attention backend equals the dense one: every family, logits and gradients.

Sequences are longer than the sliding windows and than two attention blocks (blocks of 8 here),
with left padding; greedy decoding, whose prefill takes the long-chunk path over the KV cache,
gives the same tokens. Splash runs in Pallas interpret mode (its kernel needs 128-token blocks).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from model_fixtures import FAMILIES, family_config, greedy_decode, left_padded_batch, random_params

from grpo_jax.models import Transformer, transformer


def logits_and_grads(config, params, tokens, mask, mesh=None):
    positions = transformer.positions_from_mask(mask)
    cot = jax.random.normal(jax.random.PRNGKey(7), tokens.shape + (config.vocab_size,)) * mask[..., None]

    def loss(p):
        with transformer.shard_activations(mesh):  # rows split over the mesh, as the trainer's steps run
            logits, _ = transformer.apply(config, p, tokens, positions, mask)
        return jnp.sum(logits * cot), logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return np.asarray(logits), jax.tree.map(np.asarray, grads)


def assert_same(dense, other, mask, what):
    logits_d, grads_d = dense
    logits_o, grads_o = other
    valid = np.asarray(mask, bool)
    np.testing.assert_allclose(logits_o[valid], logits_d[valid], rtol=1e-5, atol=1e-5 * np.abs(logits_d).max(),
                               err_msg=what)
    for (path, gd), go in zip(jax.tree_util.tree_flatten_with_path(grads_d)[0], jax.tree.leaves(grads_o)):
        assert np.isfinite(go).all(), (what, path)
        # relative in norm: a bias gradient sums many cancelling terms, so single entries carry rounding.
        # 5e-5: float32 dense is itself ~1.5e-5 from a float64 run of qwen3 (QK norms on weights x3), and
        # the two paths' summation orders land either side of that; a masking or rescaling bug is > 1e-2.
        err, scale = np.linalg.norm(go - gd), np.linalg.norm(gd)
        assert err <= 5e-5 * scale + 1e-6, (what, jax.tree_util.keystr(path), float(err), float(scale))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_blockwise_decoder_equals_dense(family):
    dense = family_config(family, attention_impl="dense")
    blockwise = dataclasses.replace(dense, attention_impl="blockwise", attention_block_q=8, attention_block_kv=8)
    params = random_params(dense)
    tokens, mask = left_padded_batch(lengths=(21, 9, 26))
    tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)
    assert_same(logits_and_grads(dense, params, tokens, mask), logits_and_grads(blockwise, params, tokens, mask),
                mask, family)


def test_greedy_tokens_identical_with_blockwise_prefill():
    """Prompts over 16 tokens prefill through `attend` over the cache (S > T, offset query slots)."""
    from flax import nnx

    dense = family_config("gemma2", attention_impl="dense")
    tokens, mask = left_padded_batch(lengths=(20, 9, 24))
    runs = {}
    for impl in ("dense", "blockwise"):
        config = dataclasses.replace(dense, attention_impl=impl, attention_block_q=8, attention_block_kv=8)
        model = Transformer(config, rngs=nnx.Rngs(0))
        nnx.update(model, random_params(config))
        runs[impl] = greedy_decode(model, tokens, mask, 6)
    np.testing.assert_array_equal(runs["blockwise"][0], runs["dense"][0])
    for a, b in zip(runs["blockwise"][1], runs["dense"][1]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


def test_splash_decoder_equals_dense_in_interpret_mode():
    """Gemma 2: soft-caps, alternating sliding / global layers (a traced per-layer flag), GQA, left padding."""
    dense = family_config("gemma2", attention_impl="dense", num_layers=2, layer_types=None)
    splash = dataclasses.replace(dense, attention_impl="splash", attention_block_q=128, attention_block_kv=128)
    params = random_params(dense)
    tokens, mask = left_padded_batch(lengths=(128, 70))
    tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)
    want = logits_and_grads(dense, params, tokens, mask)
    assert_same(want, logits_and_grads(splash, params, tokens, mask), mask, "splash")
    # on a mesh the kernel runs per device on its rows (shard_map): the same numbers
    from grpo_jax import sharding
    from grpo_jax.config import load_config

    mesh = sharding.make_mesh(load_config(None, ["--mesh.data=1", "--mesh.fsdp=2"]).mesh, jax.devices()[:2])
    assert_same(want, logits_and_grads(splash, params, tokens, mask, mesh), mask, "splash on a mesh")


def test_auto_and_fallbacks_choose_as_documented(caplog):
    from grpo_jax.models import attention as A

    q = jnp.zeros((1, 40, 4, 8))
    k = jnp.zeros((1, 40, 2, 8))
    mask = A.AttentionMask(jnp.arange(40), jnp.arange(40), jnp.ones((1, 40), bool))
    assert A.resolve_impl("auto", q, k, mask, None) == ("dense", None)  # CPU, short
    long_k = jnp.zeros((1, A.DENSE_MAX_KEYS_ON_CPU + 1, 2, 8))
    long_mask = mask._replace(kv_slots=jnp.arange(long_k.shape[1]), kv_valid=jnp.ones((1, long_k.shape[1]), bool))
    assert A.resolve_impl("auto", q, long_k, long_mask, None) == ("blockwise", None)
    impl, why = A.resolve_impl("cudnn", q, k, mask, None)
    assert impl == "blockwise" and "not gpu" in why
    impl, why = A.resolve_impl("splash", q, k, mask, None)
    assert impl == "blockwise" and "128" in why  # T = 40 is not a multiple of the kernel's 128
    with pytest.raises(ValueError, match="unknown attention_impl"):
        A.resolve_impl("flash", q, k, mask, None)
    with caplog.at_level("INFO", logger="grpo_jax.attention"):
        A.attend(q, k, k, mask, impl="cudnn", scale=1.0)
    assert "attention_impl=cudnn does not apply" in caplog.text


def test_mlp_in_chunks_equals_the_whole_sequence():
    """model.mlp_chunk_size: the MLP a few positions at a time (ragged last chunk), same logits and gradients."""
    whole = family_config("qwen2", attention_impl="dense")
    chunked = dataclasses.replace(whole, mlp_chunk=5)
    params = random_params(whole)
    tokens, mask = left_padded_batch(lengths=(13, 7))
    tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)
    assert_same(logits_and_grads(whole, params, tokens, mask), logits_and_grads(chunked, params, tokens, mask),
                mask, "mlp chunks")
