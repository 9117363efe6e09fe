"""blockwise_attention against dense_attention (the definition): outputs, gradients, memory."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grpo_jax.models.attention import AttentionMask, block_mask, blockwise_attention, dense_attention, window_of

BLOCK = 16


def _inputs(seed, b, t, s, h, kv, dh, q_mag=1.0, dtype=jnp.float32):
    kq, kk, kv_, kc = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = (q_mag * jax.random.normal(kq, (b, t, h, dh))).astype(dtype)
    k = (q_mag * jax.random.normal(kk, (b, s, kv, dh))).astype(dtype)
    v = jax.random.normal(kv_, (b, s, kv, dh)).astype(dtype)
    ct = jax.random.normal(kc, (b, t, h, dh), jnp.float32)
    return q, k, v, ct


def _left_pad_valid(s, pads):
    return jnp.arange(s)[None, :] >= jnp.asarray(pads)[:, None]


def _segments(lengths_per_row, n):
    return jnp.asarray([np.repeat(np.arange(len(ls)), ls)[:n] for ls in lengths_per_row], jnp.int32)


def _out_and_grads(attn, q, k, v, ct, **kw):
    """attn's output and the gradient of sum(out * ct) w.r.t. q, k, v, all under one jit."""

    @jax.jit
    def run(q, k, v, ct):
        out, vjp = jax.vjp(lambda q, k, v: attn(q, k, v, **kw), q, k, v)
        return out, vjp(ct.astype(out.dtype))

    return run(q, k, v, ct)


def _blockwise(q, k, v, mask, **kw):
    return blockwise_attention(q, k, v, mask, block_q=BLOCK, block_k=BLOCK, **kw)


def _seen(mask, window):
    """[B, T] bool: the query has at least one visible key."""
    return block_mask(mask, window).any(-1)


def _check(q, k, v, ct, mask, *, rtol=1e-5, atol=1e-5, **kw):
    seen = _seen(mask, kw.get("window"))
    ct = ct * seen[:, :, None, None]  # only queries with a visible key are compared
    ref_out, ref_grads = _out_and_grads(dense_attention, q, k, v, ct, mask=mask, **kw)
    out, grads = _out_and_grads(_blockwise, q, k, v, ct, mask=mask, **kw)
    assert out.dtype == q.dtype and [g.dtype for g in grads] == [q.dtype, k.dtype, v.dtype]
    assert np.isfinite(np.asarray(out, np.float32)).all()
    for g in grads:
        assert np.isfinite(np.asarray(g, np.float32)).all()
    sel = np.asarray(seen)
    np.testing.assert_allclose(np.asarray(out, np.float32)[sel], np.asarray(ref_out, np.float32)[sel],
                               rtol=rtol, atol=atol)
    for name, g, r in zip("qkv", grads, ref_grads):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32), rtol=rtol, atol=atol,
                                   err_msg=f"d{name}")
    return seen


def _case(name):
    """(inputs, mask, kwargs) of one named case; B=2, H=4, Dh=8, blocks of 16 with ragged tails."""
    b, h, dh = 2, 4, 8
    if name == "causal_pad_gqa":  # rows with different left-pad lengths, G=2
        t = s = 45
        q, k, v, ct = _inputs(0, b, t, s, h, 2, dh)
        mask = AttentionMask(jnp.arange(t), jnp.arange(s), _left_pad_valid(s, [0, 19]))
        return (q, k, v, ct), mask, dict(scale=dh ** -0.5)
    if name == "mha_short":  # shorter than a block: min(block, length), G=1
        t = s = 11
        q, k, v, ct = _inputs(1, b, t, s, h, h, dh)
        mask = AttentionMask(jnp.arange(t), jnp.arange(s), _left_pad_valid(s, [2, 0]))
        return (q, k, v, ct), mask, dict(scale=0.7)
    if name == "window":  # window 13 < T, crosses the 16-blocks; left padding
        t = s = 53
        q, k, v, ct = _inputs(2, b, t, s, h, 2, dh)
        mask = AttentionMask(jnp.arange(t), jnp.arange(s), _left_pad_valid(s, [3, 0]))
        return (q, k, v, ct), mask, dict(scale=dh ** -0.5, window=jnp.int32(13))
    if name == "softcap_window":
        # scores of the order of the cap (tanh and its derivative matter); window 18 = 16 + 2 makes a
        # key block's last slot the oldest one a query block sees (catches off-by-one block skipping)
        t = s = 61
        q, k, v, ct = _inputs(3, b, t, s, h, 2, dh, q_mag=2.5)
        mask = AttentionMask(jnp.arange(t), jnp.arange(s), _left_pad_valid(s, [0, 6]))
        return (q, k, v, ct), mask, dict(scale=1.0, logit_softcap=50.0, window=jnp.int32(18))
    if name == "segments":  # 3 packed sequences per row, boundaries not on block edges
        t = s = 57
        q, k, v, ct = _inputs(4, b, t, s, h, 2, dh)
        seg = _segments([[20, 17, 20], [9, 30, 18]], t)
        mask = AttentionMask(jnp.arange(t), jnp.arange(s), jnp.ones((b, s), bool), seg, seg)
        return (q, k, v, ct), mask, dict(scale=dh ** -0.5)
    if name == "prefill_offset":  # T < S: queries at cache slots 33.., keys at 0..S-1; MQA (G=4); window
        t, s = 37, 70
        q, k, v, ct = _inputs(5, b, t, s, h, 1, dh)
        mask = AttentionMask(33 + jnp.arange(t), jnp.arange(s), _left_pad_valid(s, [0, 40]))
        return (q, k, v, ct), mask, dict(scale=dh ** -0.5, window=jnp.int32(25))
    raise KeyError(name)


CASES = ["causal_pad_gqa", "mha_short", "window", "softcap_window", "segments", "prefill_offset"]


@pytest.mark.parametrize("name", CASES)
def test_matches_dense(name):
    (q, k, v, ct), mask, kw = _case(name)
    seen = _check(q, k, v, ct, mask, **kw)
    if name in ("causal_pad_gqa", "window", "softcap_window", "prefill_offset"):
        assert not bool(seen.all())  # the case does exercise queries that see nothing


def test_traced_window_scan_checkpoint_vmap():
    """A per-layer window traced inside jit / scan / checkpoint, and vmap over an extra axis."""
    b, t, h, kv, dh = 2, 40, 4, 2, 8
    q, k, v, ct = _inputs(6, b, t, t, h, kv, dh)
    mask = AttentionMask(jnp.arange(t), jnp.arange(t), _left_pad_valid(t, [0, 5]))
    ct = ct * _seen(mask, None)[:, :, None, None]
    flags = jnp.array([True, False, True])  # sliding, global, sliding

    def layers(attn):
        def loss(q, k, v):
            @jax.checkpoint
            def body(x, sliding):
                w = window_of(9, sliding)
                return attn(x, k, v, mask, scale=0.4, window=w) * 0.5 + 0.5 * x, None

            x, _ = jax.lax.scan(body, q, flags)
            return jnp.sum(x * ct)

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)

    (ref, ref_g), (got, got_g) = layers(dense_attention), layers(_blockwise)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(got_g, ref_g):
        assert np.isfinite(np.asarray(g)).all()
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)

    # vmap over a stack of 2 query sets, window a traced argument of the jitted function
    qs = jnp.stack([q, -q])
    f = jax.jit(lambda qs, w: jax.vmap(lambda x: _blockwise(x, k, v, mask, scale=0.4, window=w))(qs))
    seen = np.asarray(_seen(mask, jnp.int32(7)))
    for i in range(2):
        want = dense_attention(qs[i], k, v, mask, scale=0.4, window=jnp.int32(7))
        np.testing.assert_allclose(np.asarray(f(qs, 7)[i])[seen], np.asarray(want)[seen], rtol=1e-5, atol=1e-5)


def test_bfloat16():
    """bf16 inputs: bf16 output / grads, finite, and as close to the float32 truth as dense in bf16 is."""
    (q, k, v, ct), mask, kw = _case("softcap_window")
    seen = np.asarray(_seen(mask, kw["window"]))
    ct = ct * seen[:, :, None, None]
    truth = _out_and_grads(dense_attention, q, k, v, ct, mask=mask, **kw)
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    dense16 = _out_and_grads(dense_attention, q, k, v, ct, mask=mask, **kw)
    out, grads = _out_and_grads(_blockwise, q, k, v, ct, mask=mask, **kw)
    assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)

    def rel_errors(got):
        (o, gs), (to, tgs) = got, truth
        pairs = [(np.asarray(o, np.float32)[seen], np.asarray(to)[seen])]
        pairs += [(np.asarray(g, np.float32), np.asarray(t)) for g, t in zip(gs, tgs)]
        for a, _ in pairs:
            assert np.isfinite(a).all()
        return np.array([np.abs(a - t).max() / np.abs(t).max() for a, t in pairs])

    ours, theirs = rel_errors((out, grads)), rel_errors(dense16)
    assert (ours < 4e-2).all(), ours
    assert (ours <= 1.5 * theirs + 2e-3).all(), (ours, theirs)


def test_memory_far_below_dense():
    """Compiled forward + backward at T = S = 2048: no [T, S] buffer in the blockwise temporaries."""
    b, t, h, kv, dh = 1, 2048, 4, 2, 16
    spec_q = jax.ShapeDtypeStruct((b, t, h, dh), jnp.float32)
    spec_kv = jax.ShapeDtypeStruct((b, t, kv, dh), jnp.float32)
    spec_valid = jax.ShapeDtypeStruct((b, t), jnp.bool_)

    def temp_bytes(attn, **kw):
        def loss(q, k, v, valid):
            mask = AttentionMask(jnp.arange(t), jnp.arange(t), valid)
            return jnp.sum(attn(q, k, v, mask, scale=0.25, logit_softcap=30.0, **kw) ** 2)

        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        return grad.lower(spec_q, spec_kv, spec_kv, spec_valid).compile().memory_analysis().temp_size_in_bytes

    dense = temp_bytes(dense_attention)
    blockwise = temp_bytes(blockwise_attention, block_q=256, block_k=256)
    assert dense >= b * h * t * t * 4  # at least one [B, H, T, S] float32 buffer
    assert blockwise < dense / 4, (blockwise, dense)
