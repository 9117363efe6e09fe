"""TPU backend of :mod:`grpo_jax.models.attention`: the Pallas splash attention kernel shipped with JAX.

Computes what :func:`grpo_jax.models.attention.dense_attention` computes, for training-style calls
(queries and keys are one sequence: T == S and q_slots == kv_slots == 0..T-1), with

* causality and the sliding window as the kernel's static masks (``CausalMask``; ``LocalMask`` with
  ``window_size=(w - 1, 0)``: a window of ``w`` sees the current token and the ``w - 1`` before it,
  i.e. key slot > query slot - w), so the kernel skips blocks above the diagonal / outside the window;
* padding and packed sequences as the kernel's segment ids (dynamic, per row);
* Gemma-2 soft-capping via the kernel's ``attn_logits_soft_cap`` (applied to the scaled scores, as here);
* grouped-query attention natively (the MHA kernel takes K kv heads for H query heads, query head h
  using kv head h // (H / K), as ``dense_attention`` does);
* the batch by ``jax.vmap`` over B; the kernel's own custom VJP (Pallas backward kernels) for gradients.

On anything but a TPU the kernel runs in Pallas interpret mode (slow; that is how CI checks it).
:func:`supports` tells the caller when the kernel does not apply, with a reason to log.

Kernel constraints (jax 0.10-0.11 ``splash_attention_kernel``): every block size must divide the sequence
length; kv-side blocks (``block_kv``, ``block_kv_compute``, ``block_kv_dkv``, ``block_kv_dkv_compute``,
``block_kv_dq``) and, because segment ids are always passed, ``block_q_dkv`` must be multiples of 128
(the TPU lane width); ``block_q`` / ``block_q_dq`` multiples of 8; compute blocks must divide their memory
block. Hence the sequence length must be a multiple of 128. Any head_dim is accepted by this kernel
version (non-multiples of 128 are padded by the compiler: slower, not wrong); q and k must share it.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from grpo_jax.models.attention_mask import MASK_VALUE, AttentionMask

LANES = 128  # TPU lane width: the kernel's granularity along the kv axis
SUBLANES = 8
# Segment id of padding positions (queries and keys). Real segment ids must differ from it.
PAD_SEGMENT = int(np.iinfo(np.int32).min)

_BLOCK_FIELDS = ("block_q", "block_kv", "block_kv_compute", "block_q_dkv", "block_kv_dkv",
                 "block_kv_dkv_compute", "block_q_dq", "block_kv_dq")
_LANE_FIELDS = ("block_kv", "block_kv_compute", "block_q_dkv", "block_kv_dkv", "block_kv_dkv_compute", "block_kv_dq")


def _concrete(x) -> Optional[np.ndarray]:
    """x as numpy when it is a concrete value, None when it is traced."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def supports(q, k, mask: AttentionMask) -> Optional[str]:
    """None when :func:`splash_attention` applies to these inputs, else a short reason (for a log line).

    Only shapes are checked under tracing; the slots are checked too when they are concrete (traced
    slots are taken to be 0..T-1: the caller must not pass cache slots).
    """
    if q.ndim != 4 or k.ndim != 4:
        return f"expected q [B,T,H,Dh] and k [B,S,K,Dh], got shapes {q.shape} and {k.shape}"
    b, t, h, dh = q.shape
    s_len, kv_heads = k.shape[1], k.shape[2]
    if t != s_len:
        return f"queries and keys differ in length ({t} vs {s_len}: cached prefill or decode)"
    if k.shape[0] != b:
        return f"q and k differ in batch size ({b} vs {k.shape[0]})"
    if k.shape[3] != dh:
        return f"q and k differ in head_dim ({dh} vs {k.shape[3]})"
    if kv_heads == 0 or h % kv_heads:
        return f"{h} query heads are not a multiple of {kv_heads} kv heads"
    if t % LANES:
        return f"sequence length {t} is not a multiple of {LANES} (the kernel's block granularity)"
    if tuple(mask.q_slots.shape) != (t,) or tuple(mask.kv_slots.shape) != (s_len,):
        return f"slot vectors of shapes {mask.q_slots.shape}, {mask.kv_slots.shape} do not match T={t}"
    if tuple(mask.kv_valid.shape) != (b, s_len):
        return f"kv_valid of shape {mask.kv_valid.shape} is not [B, S] = {(b, s_len)}"
    if (mask.q_segments is None) != (mask.kv_segments is None):
        return "only one of q_segments / kv_segments is given"
    for name in ("q_slots", "kv_slots"):
        slots = _concrete(getattr(mask, name))
        if slots is not None and not np.array_equal(slots, np.arange(t)):
            return f"{name} are not 0..T-1 (cache slots, not a training-style sequence)"
    return None


def default_block_size(seq_len: int, cap: int = 512) -> int:
    """The largest multiple of 128 that is <= cap and divides seq_len (seq_len a multiple of 128)."""
    for size in range(min(cap, seq_len) // LANES * LANES, 0, -LANES):
        if seq_len % size == 0:
            return size
    raise ValueError(f"sequence length {seq_len} is not a multiple of {LANES}")


def _block_sizes(sa, seq_len: int, overrides: Optional[dict]):
    """The kernel's BlockSizes: min(512, T)-style defaults (a valid divisor of T), overridden by `overrides`."""
    overrides = dict(overrides or {})
    unknown = set(overrides) - set(_BLOCK_FIELDS) - {"use_fused_bwd_kernel"}
    if unknown:
        raise ValueError(f"unknown splash block size fields {sorted(unknown)}; known: {list(_BLOCK_FIELDS)}")
    d = default_block_size(seq_len)
    sizes = {f: overrides.get(f, d) for f in ("block_q", "block_kv", "block_q_dkv", "block_kv_dkv",
                                              "block_q_dq", "block_kv_dq")}
    # compute blocks default to their memory block (so overriding only block_kv stays valid)
    sizes["block_kv_compute"] = overrides.get("block_kv_compute", sizes["block_kv"])
    sizes["block_kv_dkv_compute"] = overrides.get("block_kv_dkv_compute", sizes["block_kv_dkv"])
    fused = bool(overrides.get("use_fused_bwd_kernel", False))
    for f in _BLOCK_FIELDS:
        if fused and f in ("block_q_dq", "block_kv_dq"):
            continue
        size, unit = int(sizes[f]), LANES if f in _LANE_FIELDS else SUBLANES
        if size <= 0 or size > seq_len or seq_len % size or size % unit:
            raise ValueError(f"splash {f}={size} must divide the sequence length {seq_len} and be a "
                             f"multiple of {unit}")
    for compute, memory in (("block_kv_compute", "block_kv"), ("block_kv_dkv_compute", "block_kv_dkv")):
        if sizes[memory] % sizes[compute]:
            raise ValueError(f"splash {compute}={sizes[compute]} must divide {memory}={sizes[memory]}")
    if fused:
        sizes.pop("block_q_dq")
        sizes.pop("block_kv_dq")
    return sa.BlockSizes(**{f: int(v) for f, v in sizes.items()}, use_fused_bwd_kernel=fused)


def _segment_ids(mask: AttentionMask):
    """[B, T] q and [B, S] kv segment ids: the row's segments (0 without packing), padding -> PAD_SEGMENT.

    Padding tokens share a segment no real token has, so real queries never see padding keys and a
    padding query sees (at least) itself: no row of the kernel's softmax is ever empty (which the
    kernel does not define). Queries and keys are one sequence, so kv_valid is also the query validity.
    """
    valid = mask.kv_valid.astype(bool)
    if mask.q_segments is None:
        q_seg = kv_seg = jnp.zeros(valid.shape, jnp.int32)
    else:
        q_seg, kv_seg = mask.q_segments.astype(jnp.int32), mask.kv_segments.astype(jnp.int32)
    pad = jnp.int32(PAD_SEGMENT)
    return jnp.where(valid, q_seg, pad), jnp.where(valid, kv_seg, pad)


def splash_attention(q, k, v, mask: AttentionMask, *, scale, logit_softcap=None, sliding_window: int | None = None,
                     is_sliding=None, block_sizes: dict | None = None, interpret: bool | None = None) -> jax.Array:
    """Attention as :func:`~grpo_jax.models.attention.dense_attention`, on the Pallas TPU splash kernel.

    q [B, T, H, Dh]; k, v [B, T, K, Dh]; returns [B, T, H, Dh] in q's dtype. Call :func:`supports` first
    (this raises ValueError with its reason otherwise).

    scale: applied by pre-scaling q (the kernel computes q @ k^T unscaled); in bfloat16 that rounds
        q * scale to bfloat16 (exact when scale is a power of two), in float32 it matches dense.
    logit_softcap: Gemma-2 soft-cap of the scaled scores (the kernel's ``attn_logits_soft_cap``).
    sliding_window: window w (key slot > query slot - w) on sliding layers; None/0: none.
    is_sliding: None (every layer slides when sliding_window is set), a Python bool, or a traced bool
        scalar (a lax.scan over mixed layers): then both kernels are built and ``lax.cond`` runs one
        (under vmap with a batched flag cond becomes a select, which runs both).
    block_sizes: fields of the kernel's ``BlockSizes`` (block_q, block_kv, block_kv_compute, block_q_dkv,
        block_kv_dkv, block_kv_dkv_compute, block_q_dq, block_kv_dq, use_fused_bwd_kernel); unset ones
        default to the largest multiple of 128 <= min(512, T) dividing T (compute blocks: their memory block).
    interpret: Pallas interpret mode; None: when the default backend is not a TPU.

    Outputs at padding positions (kv_valid false) are finite but arbitrary: a padding query attends to
    the padding keys before it (dense gives a left-padding query a uniform softmax, and a right-padding
    query attention over the real tokens before it; nothing reads either), and their cotangents reach
    only padding keys. Every real query matches dense.
    """
    reason = supports(q, k, mask)
    if reason is not None:
        raise ValueError(f"splash attention does not apply: {reason}")
    try:
        # Imported here, not at module level: jax.experimental.pallas is slow to import and may be
        # missing (or fail to import) on some jax builds; only the TPU backend needs it.
        from jax.experimental.pallas.ops.tpu import splash_attention as sa
    except Exception as e:  # ImportError, or an error raised while importing Pallas / Mosaic
        raise ImportError(f"splash attention needs jax.experimental.pallas.ops.tpu.splash_attention, "
                          f"which this jax ({jax.__version__}) cannot import: {e!r}") from e

    b, t, h, dh = q.shape
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    cap = float(logit_softcap) if logit_softcap is not None and logit_softcap > 0 else None
    bs = _block_sizes(sa, t, block_sizes)

    def make(base_mask):
        return sa.make_splash_mha(sa.MultiHeadMask(tuple(base_mask for _ in range(h))), block_sizes=bs,
                                  head_shards=1, q_seq_shards=1, attn_logits_soft_cap=cap,
                                  mask_value=MASK_VALUE, interpret=bool(interpret))

    q_seg, kv_seg = _segment_ids(mask)
    qt = jnp.swapaxes(q * jnp.asarray(scale, q.dtype), 1, 2)  # [B, H, T, Dh]
    kt, vt = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # [B, K, T, Dh]

    def run(kernel):
        one = lambda qi, ki, vi, qs, ks: kernel(qi, ki, vi, segment_ids=sa.SegmentIds(q=qs, kv=ks))
        return jax.vmap(one)(qt, kt, vt, q_seg, kv_seg)

    window = int(sliding_window) if sliding_window else None
    if window is not None and window < 1:
        raise ValueError(f"sliding_window must be positive, got {sliding_window}")
    if window is not None and window >= t:
        window = None  # the window covers the whole sequence: plain causal
    if window is not None and isinstance(is_sliding, (bool, np.bool_)):
        window = window if is_sliding else None
        is_sliding = None

    causal = sa.CausalMask((t, t))
    if window is None:
        out = run(make(causal))
    else:
        local = sa.LocalMask((t, t), window_size=(window - 1, 0), offset=0)  # kv >= q - (w - 1), kv <= q
        if is_sliding is None:
            out = run(make(local))
        else:
            # kernels (and their mask-info constants) are built here, outside the branches
            sliding_kernel, global_kernel = make(local), make(causal)
            out = jax.lax.cond(jnp.asarray(is_sliding, bool).reshape(()), lambda: run(sliding_kernel),
                               lambda: run(global_kernel))
    return jnp.swapaxes(out, 1, 2).astype(q.dtype)
