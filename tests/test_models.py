"""The decoder on its own: cache semantics, remat, dtypes, hidden states, logical axes, config."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from model_fixtures import greedy_decode, left_padded_batch, max_diff_valid, ours_logits

from grpo_jax.models import (
    KVCache,
    Transformer,
    TransformerConfig,
    abstract_model,
    forward,
    init_cache,
    logical_axes,
    logits_from_hidden,
    param_shardings,
    positions_from_mask,
    unembedding,
)
from grpo_jax.models.attention import CACHED_ATTENTION_MAX_QUERIES

LOGICAL_NAMES = {"vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "layers", "norm"}

# A Gemma-3-like config that switches on nearly every feature at once.
RICH = TransformerConfig(
    vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8,
    rope_theta=1e6, rope_type="linear", rope_factor=4.0, rope_local_theta=1e4, norm_style="gemma", post_norms=True,
    qk_norm=True, qkv_bias=True, o_bias=True, activation="gelu_pytorch_tanh", embed_scale=32 ** 0.5,
    query_pre_attn_scalar=12.0, attn_logit_softcap=20.0, final_logit_softcap=15.0, sliding_window=3,
    layer_types=("sliding_attention", "full_attention", "sliding_attention"), model_type="gemma3_text")
PLAIN = TransformerConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                          num_kv_heads=1, head_dim=8)


def make(config, seed=0, scale=3.0):
    """Random model; weights scaled up from the 0.02 init so the logits are far from uniform."""
    model = Transformer(config, rngs=nnx.Rngs(seed))
    graphdef, state = nnx.split(model)
    key = jax.random.PRNGKey(seed + 1)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(key, len(leaves))
    leaves = [x * scale + 0.1 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))


def test_positions_from_mask():
    mask = jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    np.testing.assert_array_equal(positions_from_mask(mask),
                                  [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 0, 0, 0, 0]])
    assert positions_from_mask(mask.astype(bool)).dtype == jnp.int32


@pytest.mark.parametrize("config", [RICH, PLAIN], ids=["rich", "plain"])
def test_cache_decode_matches_full_forward(config):
    model = make(config)
    tokens, mask = left_padded_batch(lengths=(5, 2, 6), vocab=config.vocab_size)
    # greedy continuation with the cache, then one full forward over prompt + continuation
    ids, step_logits = greedy_decode(model, tokens, mask, 7)
    full_tokens = np.concatenate([tokens, ids], 1)
    full_mask = np.concatenate([mask, np.ones_like(ids)], 1)
    full = ours_logits(model, full_tokens, full_mask)
    P = tokens.shape[1]
    for i, lg in enumerate(step_logits):
        np.testing.assert_allclose(lg, full[:, P - 1 + i], atol=2e-5, rtol=1e-5)
    # prefill in two chunks of several tokens gives the same as one call
    g, s = nnx.split(model)
    cache = init_cache(config, 3, 16)
    pos = positions_from_mask(mask)
    a, cache = forward(g, s, tokens[:, :4], pos[:, :4], mask[:, :4], cache)
    b, cache = forward(g, s, tokens[:, 4:], pos[:, 4:], mask[:, 4:], cache)
    assert int(cache.index) == P
    np.testing.assert_array_equal(np.asarray(cache.slot_mask[:, :P]), mask.astype(bool))
    assert not np.asarray(cache.slot_mask[:, P:]).any()
    assert max_diff_valid(np.concatenate([a, b], 1), full[:, :P], mask) < 2e-5


@pytest.mark.parametrize("config", [RICH, PLAIN], ids=["rich", "plain"])
def test_long_prefill_then_short_chunks_match_full_forward(config):
    """A prefill longer than CACHED_ATTENTION_MAX_QUERIES takes the other path (written into the heads-major
    cache, then `attention` over every slot); a 3-token chunk and a single token after it take
    `cached_attention`. Each call's logits equal the full forward's at its positions."""
    model = make(config)
    tokens, mask = left_padded_batch(lengths=(20, 17, 24), vocab=config.vocab_size)
    P = tokens.shape[1]
    assert P > CACHED_ATTENTION_MAX_QUERIES
    extra = np.random.default_rng(1).integers(1, config.vocab_size, (3, 4)).astype(np.int32)
    full_tokens, full_mask = np.concatenate([tokens, extra], 1), np.concatenate([mask, np.ones_like(extra)], 1)
    full = ours_logits(model, full_tokens, full_mask)
    g, s = nnx.split(model)
    cache = init_cache(config, 3, P + 4)
    pos = positions_from_mask(full_mask)
    logits = []
    for lo, hi in ((0, P), (P, P + 3), (P + 3, P + 4)):
        out, cache = forward(g, s, full_tokens[:, lo:hi], pos[:, lo:hi], full_mask[:, lo:hi], cache)
        logits.append(np.asarray(out))
    assert int(cache.index) == P + 4
    assert max_diff_valid(np.concatenate(logits, 1), full, full_mask) < 2e-5


def test_cache_layout():
    cache = init_cache(RICH, batch=3, max_len=11)
    assert isinstance(cache, KVCache)
    assert cache.k.shape == cache.v.shape == (3, 3, 2, 11, 8) and cache.k.dtype == jnp.float32  # [L, B, K, S, Dh]
    assert cache.slot_mask.shape == (3, 11) and cache.slot_mask.dtype == jnp.bool_
    assert cache.index.shape == () and cache.index.dtype == jnp.int32
    bf = init_cache(RICH.replace(compute_dtype="bfloat16"), 1, 4)
    assert bf.k.dtype == jnp.bfloat16
    # a pytree: jit with donation round-trips it
    g, s = nnx.split(make(PLAIN))
    fn = jax.jit(forward, donate_argnums=(5,))
    cache = init_cache(PLAIN, 2, 6)
    tok = jnp.ones((2, 3), jnp.int32)
    logits, cache = fn(g, s, tok, positions_from_mask(tok), tok, cache)
    assert logits.shape == (2, 3, 128) and logits.dtype == jnp.float32 and int(cache.index) == 3


def test_remat_identical_logits_and_grads():
    tokens, mask = left_padded_batch(lengths=(6, 4), vocab=RICH.vocab_size)
    pos = positions_from_mask(mask)
    base = make(RICH)
    g0, state = nnx.split(base)

    def loss_for(policy):
        g, _ = nnx.split(Transformer(RICH.replace(remat_policy=policy), rngs=nnx.Rngs(0)))

        def loss(st):
            logits, _ = forward(g, st, tokens, pos, mask)
            return jnp.sum(jax.nn.log_softmax(logits)[..., 0] * mask), logits

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(state)

    (l0, lg0), gr0 = loss_for("none")
    for policy in ("full", "dots_saveable", "nothing_saveable"):
        (l1, lg1), gr1 = loss_for(policy)
        np.testing.assert_allclose(lg1, lg0, atol=1e-6, rtol=0)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5), gr1, gr0)
    with pytest.raises(ValueError):
        RICH.replace(remat_policy="sometimes")


@pytest.mark.parametrize("activation", ["silu", "gelu_pytorch_tanh", "gelu", "relu"])
def test_gated_mlp_backward_matches_autodiff(activation):
    """The hand-written backward of layers.gated_mlp equals autodiff of its formula, dtypes kept."""
    from grpo_jax.models import layers

    def plain(x, wg, wu, wd):
        act = layers.activation_fn(activation)
        return jnp.einsum("btf,fd->btd", act(jnp.einsum("btd,df->btf", x, wg)) * jnp.einsum("btd,df->btf", x, wu), wd)

    keys = jax.random.split(jax.random.PRNGKey(0), 5)
    x = jax.random.normal(keys[0], (2, 5, 8))
    ws = [jax.random.normal(k, s) / 3 for k, s in zip(keys[1:4], [(8, 16), (8, 16), (16, 8)])]
    probe = jax.random.normal(keys[4], (2, 5, 8))
    for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 5e-2)):
        args = [a.astype(dtype) for a in (x, *ws)]
        ours = jax.grad(lambda *a: jnp.sum(layers.gated_mlp(*a, activation).astype(jnp.float32) * probe),
                        argnums=(0, 1, 2, 3))(*args)
        ref = jax.grad(lambda *a: jnp.sum(plain(*a).astype(jnp.float32) * probe), argnums=(0, 1, 2, 3))(*args)
        for got, want in zip(ours, ref):
            assert got.dtype == want.dtype == dtype and got.shape == want.shape
            scale = float(jnp.abs(want.astype(jnp.float32)).max())
            assert float(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32)).max()) <= tol * max(1.0, scale)


def test_bf16_compute_close_to_f32():
    model = make(RICH, scale=1.0)
    tokens, mask = left_padded_batch(lengths=(6, 4), vocab=RICH.vocab_size)
    ref = ours_logits(model, tokens, mask)
    g, s = nnx.split(model)
    g16, _ = nnx.split(Transformer(RICH.replace(compute_dtype="bfloat16"), rngs=nnx.Rngs(0)))
    lg, _ = forward(g16, s, tokens, positions_from_mask(mask), mask)  # f32 params, bf16 compute
    assert lg.dtype == jnp.float32 and np.isfinite(np.asarray(lg)).all()
    assert max_diff_valid(ref, lg, mask) < 0.05 * max(1.0, np.abs(ref).max())
    # bf16 params too
    s16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), s)
    g16b, _ = nnx.split(Transformer(RICH.replace(compute_dtype="bfloat16", param_dtype="bfloat16"),
                                    rngs=nnx.Rngs(0)))
    lg2, _ = jax.jit(forward)(g16b, s16, tokens, positions_from_mask(mask), mask)
    assert max_diff_valid(ref, lg2, mask) < 0.05 * max(1.0, np.abs(ref).max())


@pytest.mark.parametrize("config", [RICH, PLAIN], ids=["tied_softcap", "untied"])
def test_hidden_states_and_chunked_logits(config):
    config = config.replace(tie_word_embeddings=config is RICH)
    model = make(config)
    tokens, mask = left_padded_batch(lengths=(6, 4), vocab=config.vocab_size)
    pos = positions_from_mask(mask)
    logits, _ = model(tokens, pos, mask)
    hidden, _ = model.hidden_states(tokens, pos, mask)
    assert hidden.shape == (2, 6, config.hidden_size)
    chunks = [model.logits(hidden[:, i:i + 2]) for i in range(0, 6, 2)]
    np.testing.assert_allclose(np.concatenate(chunks, 1), logits, atol=1e-5)
    W = model.unembedding()
    assert W.shape == (config.hidden_size, config.vocab_size)
    raw = jnp.einsum("btd,dv->btv", hidden, W)
    if config.final_logit_softcap is None:
        np.testing.assert_allclose(raw, logits, atol=1e-4)
    np.testing.assert_allclose(logits_from_hidden(config, model.params(), hidden), logits, atol=1e-6)
    np.testing.assert_allclose(unembedding(config, model.params()), W)
    g, s = nnx.split(model)
    h2, _ = jax.jit(forward, static_argnames="return_hidden")(g, s, tokens, pos, mask, return_hidden=True)
    np.testing.assert_allclose(h2, hidden, atol=1e-5)


def test_logical_axes_on_every_param():
    model = make(RICH)
    axes = logical_axes(model)
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    assert len(axes) == len(list(flat))
    for path, names in axes.items():
        value = model.params()
        for k in path:
            value = value[k]
        assert len(names) == value.ndim, (path, names)
        assert set(names) <= LOGICAL_NAMES, (path, names)
        if path[0] == "layers":
            assert names[0] == "layers"
    assert axes[("layers", "wq")] == ("layers", "embed", "heads", "head_dim")
    assert axes[("layers", "wk")] == ("layers", "embed", "kv_heads", "head_dim")
    assert axes[("embed",)] == ("vocab", "embed")
    # abstract model: same names, no memory
    abs_axes = logical_axes(abstract_model(RICH))
    assert abs_axes == axes


def test_param_shardings_follow_rules():
    if jax.device_count() < 8:
        pytest.skip("needs 8 (fake) devices")
    mesh = jax.make_mesh((2, 4), ("fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    rules = {"embed": "fsdp", "heads": "tensor", "kv_heads": "tensor", "mlp": "tensor", "vocab": "tensor"}
    sh = param_shardings(abstract_model(RICH), mesh, rules)
    P = jax.sharding.PartitionSpec
    assert sh["layers"]["wq"].spec == P(None, "fsdp", "tensor", None)
    assert sh["layers"]["wk"].spec == P(None, "fsdp", None, None)  # 2 kv heads do not split 4 ways
    assert sh["layers"]["w_down"].spec == P(None, "tensor", "fsdp")
    assert sh["embed"].spec == P("tensor", "fsdp")


def test_config_json_roundtrip_and_hashable():
    assert TransformerConfig.from_json(RICH.to_json()) == RICH
    assert hash(RICH) == hash(TransformerConfig.from_dict(json.loads(RICH.to_json())))
    with pytest.raises(ValueError, match="unknown TransformerConfig fields: colour"):
        TransformerConfig.from_dict({**RICH.to_dict(), "colour": 1})
    with pytest.raises(ValueError):
        TransformerConfig(num_heads=6, num_kv_heads=4)
    assert RICH.sliding_layers == (True, False, True)
    assert PLAIN.replace(sliding_window=5).sliding_layers == (True, True)
    assert RICH.replace(param_dtype="bf16").param_dtype == "bfloat16"


def test_scan_compile_time_smollm_shape():
    """30 stacked layers compile as one scanned body: a forward of the SmolLM2-135M shape compiles fast."""
    import time

    cfg = TransformerConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                            num_heads=9, num_kv_heads=3, head_dim=64, tie_word_embeddings=True)
    g, abs_state = nnx.split(abstract_model(cfg))
    tok = jax.ShapeDtypeStruct((2, 16), jnp.int32)
    t0 = time.perf_counter()
    jax.jit(forward).lower(g, abs_state, tok, tok, tok).compile()
    assert time.perf_counter() - t0 < 30
