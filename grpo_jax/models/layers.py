"""Pure building blocks of the decoder: norms, rotary embeddings, gated MLP (attention: attention.py).

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

from grpo_jax.models import lora

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


def gated_mlp(x: jax.Array, w_gate, w_up, w_down, activation: str) -> jax.Array:
    """down(act(x @ gate) * (x @ up)); x [B, T, D], w_gate/w_up [D, F], w_down [F, D], each an array or a
    `lora.LoraWeight` (frozen base + adapter).

    The backward pass is written by hand (`_gated_mlp_bwd`): same values as autodiff
    (to float rounding), but XLA:CPU compiled autodiff's version with the elementwise
    gradient of act(gate) * up fused into a transposing copy of two [tokens, F]
    arrays per layer, about 30% of the whole train step on the `small` benchmark.
    Adapters with dropout take autodiff's (their masks come from keys the hand-written pass would redraw).
    """
    if any(isinstance(w, lora.LoraWeight) and w.drops for w in (w_gate, w_up, w_down)):
        return _gated_mlp_fwd(activation, x, w_gate, w_up, w_down)[0]
    return _gated_mlp(activation, x, w_gate, w_up, w_down)


def gated_mlp_in_chunks(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array, activation: str,
                        chunk: int) -> jax.Array:
    """`gated_mlp` over `chunk` positions of the sequence at a time, each chunk rematerialised.

    The MLP's [B, T, F] intermediates (F is 4-6x the hidden size) are the largest buffers of a
    layer's backward pass at long sequences; here only [B, chunk, F] exist at once, for the price
    of computing each chunk's forward once more in the backward pass. The batch axis stays whole,
    so rows split over devices stay split.
    """
    b, t, d = x.shape
    if chunk <= 0 or t <= chunk:
        return gated_mlp(x, w_gate, w_up, w_down, activation)
    n = -(-t // chunk)
    xp = jnp.pad(x, ((0, 0), (0, n * chunk - t), (0, 0)))
    pieces = jnp.moveaxis(xp.reshape(b, n, chunk, d), 1, 0)  # [n, B, chunk, D]
    one = jax.checkpoint(lambda piece: gated_mlp(piece, w_gate, w_up, w_down, activation))
    out = jax.lax.map(one, pieces)
    return jnp.moveaxis(out, 0, 1).reshape(b, n * chunk, -1)[:, :t]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gated_mlp(activation, x, w_gate, w_up, w_down):
    return _gated_mlp_fwd(activation, x, w_gate, w_up, w_down)[0]


def _gated_mlp_fwd(activation, x, w_gate, w_up, w_down):
    gate = lora.einsum("btd,df->btf", x, w_gate)
    up = lora.einsum("btd,df->btf", x, w_up)
    out = lora.einsum("btf,fd->btd", activation_fn(activation)(gate) * up, w_down)
    return out, (x, gate, up, w_gate, w_up, w_down)


def _input_grad(dy: jax.Array, w) -> jax.Array:
    """dx [B, T, I] of y = x w (w [I, O]) from dy [B, T, O]; a LoraWeight adds scale (dy b^T) a^T."""
    if not isinstance(w, lora.LoraWeight):
        return jnp.einsum("bto,io->bti", dy, w)
    low = jnp.einsum("bto,ro->btr", dy, w.b) * jnp.asarray(w.scale, dy.dtype)
    return jnp.einsum("bto,io->bti", dy, w.base) + jnp.einsum("btr,ir->bti", low, w.a)


def _weight_grad(w, d_w: jax.Array, x: jax.Array, dy: jax.Array):
    """The cotangent of w given its full gradient d_w = x^T dy; a LoraWeight's also holds a's and b's. (d_w is
    then the frozen base's: nothing reads it, so XLA never computes it.)"""
    if not isinstance(w, lora.LoraWeight):
        return d_w.astype(w.dtype)
    scale = jnp.asarray(w.scale, dy.dtype)
    # [tokens, rank] on the left of each token-contracting dot (then the small result transposed): XLA:CPU
    # copies the left operand transposed, and x may be [tokens, F], 2.7x wider than the hidden size
    d_a = jnp.einsum("btr,bti->ri", jnp.einsum("bto,ro->btr", dy, w.b) * scale, x).T
    d_b = jnp.einsum("btr,bto->ro", jnp.einsum("bti,ir->btr", x, w.a) * scale, dy)
    return w.replace(base=d_w.astype(w.base.dtype), a=d_a.astype(w.a.dtype), b=d_b.astype(w.b.dtype))


def _gated_mlp_bwd(activation, residuals, d_out):
    x, gate, up, w_gate, w_up, w_down = residuals
    activated, act_vjp = jax.vjp(activation_fn(activation), gate)
    hidden = activated * up
    d_hidden = _input_grad(d_out, w_down)
    (d_gate,) = act_vjp(d_hidden * up)
    d_up = d_hidden * activated
    d_x = _input_grad(d_gate, w_gate) + _input_grad(d_up, w_up)
    d_w_gate = jnp.einsum("btd,btf->df", x, d_gate)  # x: [tokens, D], the narrow one, on the left
    d_w_up = jnp.einsum("btd,btf->df", x, d_up)
    # contracted over tokens as [D, F] then transposed: XLA:CPU lays out the left operand
    # of a token-contracting dot transposed, and [tokens, D] is the cheaper one to copy
    d_w_down = jnp.einsum("btd,btf->df", d_out, hidden).T
    return (d_x.astype(x.dtype), _weight_grad(w_gate, d_w_gate, x, d_gate), _weight_grad(w_up, d_w_up, x, d_up),
            _weight_grad(w_down, d_w_down, hidden, d_out))


_gated_mlp.defvjp(_gated_mlp_fwd, _gated_mlp_bwd)
