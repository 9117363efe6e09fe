"""Pure building blocks of the decoder: norms, rotary embeddings, attention, gated MLP.

Everything here is a pure function of arrays (no module state), so the decoder in
``transformer.py`` can call them inside ``jax.lax.scan`` over stacked layer params.

Shapes: ``B`` batch, ``T`` query length, ``S`` key length (the cache length when a
KV cache is used), ``H`` query heads, ``K`` kv heads, ``G = H // K`` queries per kv
head, ``D`` hidden size, ``Dh`` head dim.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

# A large negative, finite number: fully masked rows (pad queries) give a uniform
# softmax instead of NaNs, so gradients stay finite.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


# ----------------------------------------------------------------------------- norms


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, style: str = "llama") -> jax.Array:
    """RMSNorm over the last axis, computed in float32.

    style "llama": ``w * (x / rms(x)).astype(x.dtype)`` (Llama / Mistral / Qwen).
    style "gemma": ``(x / rms(x) * (1 + w)).astype(x.dtype)`` (Gemma 2/3, weights
    stored zero-centred).
    """
    dtype = x.dtype
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    if style == "gemma":
        return (xf * (1.0 + weight.astype(jnp.float32))).astype(dtype)
    return weight.astype(dtype) * xf.astype(dtype)


# ----------------------------------------------------------------------------- rotary


def rope_inv_freq(
    head_dim: int,
    theta: float,
    rope_type: str = "default",
    factor: float = 1.0,
    low_freq_factor: float = 1.0,
    high_freq_factor: float = 4.0,
    original_max_position: int = 8192,
) -> jax.Array:
    """Inverse frequencies [head_dim // 2] (float32), as transformers computes them.

    rope_type: "default", "linear" (frequencies / factor) or "llama3" (Llama 3.1
    piecewise scaling of the low frequencies).
    """
    import numpy as np

    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = (1.0 / (np.float32(theta) ** exponent)).astype(np.float32)
    if rope_type in ("default", None):
        pass
    elif rope_type == "linear":
        inv_freq = (inv_freq / np.float32(factor)).astype(np.float32)
    elif rope_type == "llama3":
        low_freq_wavelen = original_max_position / low_freq_factor
        high_freq_wavelen = original_max_position / high_freq_factor
        wavelen = (2 * math.pi / inv_freq).astype(np.float32)
        scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq).astype(np.float32)
        smooth = (original_max_position / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
        inv_freq = np.where(is_medium, smoothed, scaled).astype(np.float32)
    else:
        raise ValueError(f"unsupported rope_type {rope_type!r}; supported: default, linear, llama3")
    return jnp.asarray(inv_freq, dtype=jnp.float32)


def rope_cos_sin(positions: jax.Array, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape [B, T, head_dim // 2] in float32 for integer positions [B, T]."""
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(freqs), jnp.sin(freqs)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE (HF layout) on x [B, T, N, Dh] with cos/sin [B, T, Dh/2]."""
    dtype = x.dtype
    half = x.shape[-1] // 2
    cos = cos[:, :, None, :].astype(dtype)
    sin = sin[:, :, None, :].astype(dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


# ----------------------------------------------------------------------------- attention


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    if cap is None or cap <= 0:
        return x
    return jnp.tanh(x / cap) * cap


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    *,
    scale: float,
    logit_softcap: float | None = None,
) -> jax.Array:
    """Grouped-query attention without materialising repeated K/V.

    q [B, T, H, Dh], k/v [B, S, K, Dh], mask [B, T, S] bool (True = attend).
    Scores, mask and softmax are float32; returns [B, T, H, Dh] in q's dtype.
    """
    b, t, h, dh = q.shape
    kv_heads = k.shape[2]
    g = h // kv_heads
    qg = q.reshape(b, t, kv_heads, g, dh)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = scores * jnp.float32(scale)
    scores = softcap(scores, logit_softcap)
    scores = jnp.where(mask[:, None, None, :, :], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, h, dh).astype(q.dtype)


# Query counts up to this take `cached_attention` when a KV cache is used (decode,
# speculative or short chunks); longer calls (prefill) write the cache first and use `attention`.
CACHED_ATTENTION_MAX_QUERIES = 16


def cached_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    k_new: jax.Array,
    v_new: jax.Array,
    mask: jax.Array,
    index: jax.Array,
    *,
    scale: float,
    logit_softcap: float | None = None,
) -> jax.Array:
    """`attention` of T new queries over a cache that does not hold their keys yet, plus those keys.

    q [B, T, H, Dh]; k_cache/v_cache [B, K, S, Dh] (this layer's cache, heads-major, slots
    [index, index + T) not written yet); k_new/v_new [B, T, K, Dh]; mask [B, T, S]
    as for `attention` over the written cache. Same result as writing the new
    keys at `index` and calling `attention`, without copying the cache to do so.

    Built for decode on XLA:CPU. The two products over the cache are broadcast
    multiplies reduced over Dh (scores) and over S (output), in float32, which XLA
    fuses into loops that read the heads-major cache as stored. As matmuls they are
    B * K tiny [T*G, Dh] x [Dh, S] products (or, in the [B, S, K, Dh] layout this
    replaced, a K-fold cross product masked back to each head's block); the loops
    made rollout 0.54x (tiny) and 0.90x (small) the time (BENCHMARKS.md, Rollout).
    Scores [B, K, T*G, S + T] keep slots minor, so the softmax reads contiguous rows.
    """
    b, t, h, dh = q.shape
    kv_heads, slots = k_cache.shape[1], k_cache.shape[2]
    g = h // kv_heads
    f32 = jnp.float32
    # the T * G queries of each kv head as one axis: [B, K, T*G, Dh]
    qr = q.reshape(b, t, kv_heads, g, dh).transpose(0, 2, 1, 3, 4).reshape(b, kv_heads, t * g, dh).astype(f32)
    k_new, v_new = k_new.transpose(0, 2, 1, 3).astype(f32), v_new.transpose(0, 2, 1, 3).astype(f32)  # [B, K, T, Dh]

    def scores_over(keys):  # [B, K, T*G, keys]
        return jnp.sum(qr[:, :, :, None, :] * keys[:, :, None, :, :].astype(f32), axis=-1)

    scores = jnp.concatenate([scores_over(k_cache), scores_over(k_new)], axis=-1) * f32(scale)
    scores = softcap(scores, logit_softcap)
    slot = jnp.arange(slots)
    unwritten = (slot >= index) & (slot < index + t)
    keep = jnp.concatenate([mask & ~unwritten, jax.lax.dynamic_slice_in_dim(mask, index, t, axis=2)], axis=2)
    keep = jnp.broadcast_to(keep[:, None, :, None, :], (b, 1, t, g, slots + t)).reshape(b, 1, t * g, slots + t)
    probs = jax.nn.softmax(jnp.where(keep, scores, MASK_VALUE), axis=-1)

    def mix(p, values):  # [B, K, T*G, Dh]
        return jnp.sum(p[..., None] * values[:, :, None, :, :].astype(f32), axis=-2)

    out = mix(probs[..., :slots], v_cache) + mix(probs[..., slots:], v_new)
    return out.reshape(b, kv_heads, t, g, dh).transpose(0, 2, 1, 3, 4).reshape(b, t, h, dh).astype(q.dtype)


def make_attention_masks(
    q_slots: jax.Array,
    kv_slots: jax.Array,
    kv_valid: jax.Array,
    sliding_window: int | None,
) -> tuple[jax.Array, jax.Array | None]:
    """Full (causal + padding) and sliding-window masks [B, T, S] bool.

    q_slots [T] or [B, T]: slot index of each query; kv_slots [S]: slot index of
    each key; kv_valid [B, S]: key slot holds a real (non-pad) token. The sliding
    window matches transformers: key slot > query slot - window.
    """
    q = q_slots[..., :, None] if q_slots.ndim == 1 else q_slots[:, :, None]
    kv = kv_slots[None, :] if q_slots.ndim == 1 else kv_slots[None, None, :]
    causal = kv <= q  # [T, S] or [B, T, S]
    full = causal & kv_valid[:, None, :]
    sliding = None
    if sliding_window:
        sliding = full & (kv > q - sliding_window)
    return full, sliding


# ----------------------------------------------------------------------------- mlp


def activation_fn(name: str):
    if name in ("silu", "swish"):
        return jax.nn.silu
    if name in ("gelu_pytorch_tanh", "gelu_tanh", "gelu_new", "gelu_fast"):
        return lambda x: jax.nn.gelu(x, approximate=True)
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    if name == "relu":
        return jax.nn.relu
    raise ValueError(f"unsupported activation {name!r}; supported: silu, gelu_pytorch_tanh, gelu, relu")


def gated_mlp(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array, activation: str) -> jax.Array:
    """down(act(x @ gate) * (x @ up)); x [B, T, D], w_gate/w_up [D, F], w_down [F, D].

    The backward pass is written by hand (`_gated_mlp_bwd`): same values as autodiff
    (to float rounding), but XLA:CPU compiled autodiff's version with the elementwise
    gradient of act(gate) * up fused into a transposing copy of two [tokens, F]
    arrays per layer, about 30% of the whole train step on the `small` benchmark.
    """
    return _gated_mlp(activation, x, w_gate, w_up, w_down)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gated_mlp(activation, x, w_gate, w_up, w_down):
    return _gated_mlp_fwd(activation, x, w_gate, w_up, w_down)[0]


def _gated_mlp_fwd(activation, x, w_gate, w_up, w_down):
    gate = jnp.einsum("btd,df->btf", x, w_gate)
    up = jnp.einsum("btd,df->btf", x, w_up)
    out = jnp.einsum("btf,fd->btd", activation_fn(activation)(gate) * up, w_down)
    return out, (x, gate, up, w_gate, w_up, w_down)


def _gated_mlp_bwd(activation, residuals, d_out):
    x, gate, up, w_gate, w_up, w_down = residuals
    activated, act_vjp = jax.vjp(activation_fn(activation), gate)
    d_hidden = jnp.einsum("btd,fd->btf", d_out, w_down)
    (d_gate,) = act_vjp(d_hidden * up)
    d_up = d_hidden * activated
    d_x = jnp.einsum("btf,df->btd", d_gate, w_gate) + jnp.einsum("btf,df->btd", d_up, w_up)
    d_w_gate = jnp.einsum("btd,btf->df", x, d_gate)  # x: [tokens, D], the narrow one, on the left
    d_w_up = jnp.einsum("btd,btf->df", x, d_up)
    # contracted over tokens as [D, F] then transposed: XLA:CPU lays out the left operand
    # of a token-contracting dot transposed, and [tokens, D] is the cheaper one to copy
    d_w_down = jnp.einsum("btd,btf->df", d_out, activated * up).T
    return (d_x.astype(x.dtype), d_w_gate.astype(w_gate.dtype), d_w_up.astype(w_up.dtype),
            d_w_down.astype(w_down.dtype))


_gated_mlp.defvjp(_gated_mlp_fwd, _gated_mlp_bwd)
