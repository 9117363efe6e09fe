"""The splash (Pallas TPU) attention backend against dense_attention, in Pallas interpret mode on CPU.

Interpret mode is slow, so the shapes are the smallest the kernel takes: T=256 (its kv-side blocks are
multiples of 128; 128-sized blocks give 2x2 block grids, so block skipping and partial blocks are exercised),
Dh=128, B<=2. Comparisons are in float32 at 1e-5: the kernel's online softmax only reorders float32 sums.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grpo_jax.models.attention import AttentionMask, block_mask, dense_attention, window_of
from grpo_jax.models.splash import splash_attention, supports

T, DH = 256, 128
BLOCKS_128 = dict(block_q=128, block_kv=128, block_kv_compute=128, block_q_dkv=128, block_kv_dkv=128,
                  block_kv_dkv_compute=128, block_q_dq=128, block_kv_dq=128)
TOL = dict(rtol=1e-5, atol=1e-5)


def _inputs(b, h, kv_heads, seed=0, q_mult=1.0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(ks[0], (b, T, h, DH), jnp.float32) * q_mult
    k = jax.random.normal(ks[1], (b, T, kv_heads, DH), jnp.float32)
    v = jax.random.normal(ks[2], (b, T, kv_heads, DH), jnp.float32)
    ct = jax.random.normal(ks[3], (b, T, h, DH), jnp.float32)
    return q, k, v, ct


def _mask(pads, segments=None):
    """Left padding of `pads[b]` tokens per row; segments: per-row lists of packed-sequence lengths."""
    slots = jnp.arange(T, dtype=jnp.int32)
    valid = jnp.stack([slots >= p for p in pads])
    if segments is None:
        return AttentionMask(slots, slots, valid)
    seg = np.zeros((len(pads), T), np.int32)
    for r, (pad, lengths) in enumerate(zip(pads, segments)):
        assert pad + sum(lengths) == T
        seg[r, pad:] = np.repeat(np.arange(1, len(lengths) + 1), lengths)
    seg = jnp.asarray(seg)
    return AttentionMask(slots, slots, valid, seg, seg)


def _seen(mask, window):
    """[B, T] queries that see a key (and are real tokens: splash's outputs at padding are arbitrary)."""
    return block_mask(mask, window).any(-1) & mask.kv_valid


def _loss(fn, ct):
    return lambda q, k, v: jnp.sum(fn(q, k, v) * ct)


CASES = {
    # name: (B, H, K, left pads, packed segment lengths, sliding window, softcap, block sizes)
    "causal_left_padding": (2, 2, 1, [5, 130], None, None, None, BLOCKS_128),  # row 1: a whole pad block
    "gqa": (2, 4, 2, [0, 37], None, None, None, None),  # K=2 catches a wrong q-head -> kv-head map; default blocks
    "sliding_window": (1, 2, 1, [20], None, 100, None, BLOCKS_128),  # w=100: off-by-one shows; skips a block
    "softcap": (1, 2, 1, [3], None, None, 1.0, BLOCKS_128),  # cap 1 on scores of std ~3: tanh saturates
    "packed_segments": (2, 2, 1, [10, 0], [[100, 146], [128, 72, 56]], None, None, BLOCKS_128),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_dense(name):
    b, h, kv_heads, pads, segments, window, cap, blocks = CASES[name]
    q, k, v, ct = _inputs(b, h, kv_heads, q_mult=3.0 if cap else 1.0)
    mask = _mask(pads, segments)
    scale = DH ** -0.5
    w = window_of(window, None)
    seen = _seen(mask, w)
    assert not bool(seen.all()) and bool(seen.any())  # padding present, and real queries to compare
    ct = ct * seen[:, :, None, None]

    splash = jax.jit(lambda q, k, v: splash_attention(q, k, v, mask, scale=scale, logit_softcap=cap,
                                                      sliding_window=window, block_sizes=blocks))
    dense = lambda q, k, v: dense_attention(q, k, v, mask, scale=scale, logit_softcap=cap, window=w)

    out, ref = splash(q, k, v), dense(q, k, v)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert np.isfinite(np.asarray(out)).all()  # padding queries too
    sel = np.asarray(seen)
    np.testing.assert_allclose(np.asarray(out)[sel], np.asarray(ref)[sel], **TOL)

    grads = jax.grad(_loss(splash, ct), argnums=(0, 1, 2))(q, k, v)
    ref_grads = jax.grad(_loss(dense, ct), argnums=(0, 1, 2))(q, k, v)
    for got, want, what in zip(grads, ref_grads, "qkv"):
        assert np.isfinite(np.asarray(got)).all(), what
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), err_msg=f"d{what}", **TOL)


def test_mixed_layers_traced_is_sliding():
    """A lax.scan over [sliding, global] layers inside jit: the traced flag picks the kernel per layer."""
    q, k, v, ct = _inputs(1, 2, 1, seed=1)
    mask = _mask([9])
    scale, window = DH ** -0.5, 64
    flags = jnp.array([True, False])
    seen = _seen(mask, None)  # every real query sees itself under either layer kind
    ct = ct * seen[:, :, None, None]

    def layers(attn):
        def f(q, k, v):
            def body(carry, is_sliding):
                return carry, attn(q, k, v, is_sliding)
            return jax.lax.scan(body, None, flags)[1]  # [L, B, T, H, Dh]
        return f

    splash = jax.jit(layers(lambda q, k, v, s: splash_attention(q, k, v, mask, scale=scale, sliding_window=window,
                                                                is_sliding=s, block_sizes=BLOCKS_128)))
    dense = layers(lambda q, k, v, s: dense_attention(q, k, v, mask, scale=scale, window=window_of(window, s)))

    out, ref = splash(q, k, v), dense(q, k, v)
    sel = np.asarray(seen)
    for layer in range(2):
        np.testing.assert_allclose(np.asarray(out[layer])[sel], np.asarray(ref[layer])[sel], **TOL,
                                   err_msg=f"layer {layer}")
    # the two layers must differ, or the test could not tell a sliding layer from a global one
    assert np.abs(np.asarray(ref[0] - ref[1]))[sel].max() > 1e-2

    loss = lambda fn: (lambda q, k, v: jnp.sum(fn(q, k, v) * jnp.stack([ct, 2.0 * ct])))
    grads = jax.grad(loss(splash), argnums=(0, 1, 2))(q, k, v)
    ref_grads = jax.grad(loss(dense), argnums=(0, 1, 2))(q, k, v)
    for got, want, what in zip(grads, ref_grads, "qkv"):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), err_msg=f"d{what}", **TOL)


def test_supports_reasons_and_errors():
    b, h, kv_heads = 1, 4, 2
    q = jnp.zeros((b, T, h, DH))
    k = jnp.zeros((b, T, kv_heads, DH))
    mask = _mask([0])
    assert supports(q, k, mask) is None
    # traced slots are taken on trust (only shapes can be checked)
    traced = []
    jax.jit(lambda qs: traced.append(supports(q, k, mask._replace(q_slots=qs, kv_slots=qs))) or qs)(mask.q_slots)
    assert traced == [None]

    prefill = supports(q[:, :128], k, mask._replace(q_slots=mask.q_slots[:128]))
    assert prefill is not None and "differ in length" in prefill
    short = jnp.zeros((b, 200, h, DH))
    short_mask = AttentionMask(jnp.arange(200), jnp.arange(200), jnp.ones((b, 200), bool))
    assert "not a multiple of 128" in supports(short, short[:, :, :kv_heads], short_mask)
    assert "head_dim" in supports(q, k[..., :64], mask)
    assert "not a multiple of 3 kv heads" in supports(q, jnp.zeros((b, T, 3, DH)), mask)
    cache = mask._replace(q_slots=mask.q_slots + 7, kv_slots=mask.kv_slots + 7)
    assert "q_slots are not 0..T-1" in supports(q, k, cache)

    with pytest.raises(ValueError, match="differ in length"):
        splash_attention(q[:, :128], k, k, mask._replace(q_slots=mask.q_slots[:128]), scale=1.0)
    with pytest.raises(ValueError, match="block_kv=192 must divide"):
        splash_attention(q, k, k, mask, scale=1.0, block_sizes=dict(block_kv=192))
    with pytest.raises(ValueError, match="block_q_dkv=64 .*multiple of 128"):
        splash_attention(q, k, k, mask, scale=1.0, block_sizes=dict(block_q_dkv=64))
    with pytest.raises(ValueError, match="unknown splash block size"):
        splash_attention(q, k, k, mask, scale=1.0, block_sizes=dict(block_z=128))
