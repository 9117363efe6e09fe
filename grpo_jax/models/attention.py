"""Attention over a mask described by per-position vectors, with interchangeable backends.

Every backend computes the same thing (``dense`` is the definition):

    out[b, t, h] = softmax_s(softcap(scale * q[b, t, h] . k[b, s, h // G]))  over the keys s that
    query t may attend to, then the weighted sum of v[b, s, h // G]

where query ``t`` may attend to key ``s`` when (:class:`AttentionMask`, defined with ``MASK_VALUE``
in ``attention_mask.py`` so that backends such as ``splash.py`` need not import this module)

    kv_valid[b, s]                                   (a real token, not padding)
    and kv_slots[s] <= q_slots[t]                    (causal, by slot in the sequence / cache)
    and kv_slots[s] > q_slots[t] - window            (sliding layers only)
    and q_segments[b, t] == kv_segments[b, s]        (packed sequences only)

The mask is never an argument of shape [T, S]: at 16k tokens a dense boolean mask
alone is 256 MB per row, and the memory-efficient backends build each block's mask
from these vectors. A query with no key to attend to (a left-padding position) gets
a finite output (any value: nothing reads it) and finite gradients.

Shapes: q [B, T, H, Dh]; k, v [B, S, K, Dh] with H a multiple of K (grouped-query);
returns [B, T, H, Dh] in q's dtype. Scores and softmax are float32.
"""

from __future__ import annotations

import functools
import logging
from functools import partial
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from grpo_jax.config import ATTENTION_IMPLS
from grpo_jax.models import splash  # its Pallas import is deferred to the first splash call
from grpo_jax.models.attention_mask import MASK_VALUE, AttentionMask


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    if cap is None or cap <= 0:
        return x
    return jnp.tanh(x / cap) * cap


def window_of(sliding_window: Optional[int], is_sliding) -> Optional[jax.Array]:
    """The window a layer uses as an int32 scalar (a huge one on global layers), or None without windows.

    is_sliding: None (every layer slides when sliding_window is set) or a traced bool (the
    decoder's scanned per-layer flag).
    """
    if not sliding_window:
        return None
    if is_sliding is None:
        return jnp.int32(sliding_window)
    return jnp.where(is_sliding, jnp.int32(sliding_window), jnp.int32(2**30))


def block_mask(mask: AttentionMask, window: Optional[jax.Array], q_index=slice(None), kv_index=slice(None)):
    """[B, Tq, Sk] bool for the queries `q_index` and keys `kv_index` (slices or index arrays) of `mask`."""
    q = mask.q_slots[q_index][None, :, None]
    kv = mask.kv_slots[kv_index][None, None, :]
    keep = (kv <= q) & mask.kv_valid[:, kv_index][:, None, :]
    if window is not None:
        keep = keep & (kv > q - window)
    if mask.q_segments is not None:
        keep = keep & (mask.q_segments[:, q_index][:, :, None] == mask.kv_segments[:, kv_index][:, None, :])
    return keep


def dense_attention(q, k, v, mask: AttentionMask, *, scale: float, logit_softcap: Optional[float] = None,
                    window: Optional[jax.Array] = None) -> jax.Array:
    """The definition: all [B, K, G, T, S] scores at once (fastest for short sequences on CPU)."""
    b, t, h, dh = q.shape
    kv_heads = k.shape[2]
    g = h // kv_heads
    qg = q.reshape(b, t, kv_heads, g, dh)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = softcap(scores * jnp.float32(scale), logit_softcap)
    scores = jnp.where(block_mask(mask, window)[:, None, None], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, h, dh).astype(q.dtype)


def _pad_to(x: jax.Array, axis: int, size: int, value=None) -> jax.Array:
    """Pads `axis` of x up to `size`: with `value`, or by repeating the last entry when value is None."""
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    if value is None:
        tail = jnp.repeat(jax.lax.slice_in_dim(x, x.shape[axis] - 1, x.shape[axis], axis=axis), extra, axis=axis)
    else:
        shape = list(x.shape)
        shape[axis] = extra
        tail = jnp.full(shape, value, x.dtype)
    return jnp.concatenate([x, tail], axis=axis)


def _to_blocks(x: jax.Array, axis: int, n: int, size: int, value=None) -> jax.Array:
    """Pads `axis` to n * size and splits it into a leading [n] block axis and a [size] axis in place."""
    x = _pad_to(x, axis, n * size, value)
    x = x.reshape(x.shape[:axis] + (n, size) + x.shape[axis + 1:])
    return jnp.moveaxis(x, axis, 0)


def _first_last(need: jax.Array):
    """[.., n] bool -> (first true, last true + 1) along the last axis, (0, 0) where none is true."""
    n = need.shape[-1]
    any_ = need.any(-1)
    lo = jnp.argmax(need, axis=-1).astype(jnp.int32)
    hi = (n - jnp.argmax(need[..., ::-1], axis=-1)).astype(jnp.int32)
    return jnp.where(any_, lo, 0), jnp.where(any_, hi, 0)


class _Blocked(NamedTuple):
    """The mask vectors split into blocks: queries [nq, ...bq], keys [nk, ...bk]."""

    q_slots: jax.Array  # [nq, bq]
    q_segments: Optional[jax.Array]  # [nq, B, bq]
    kv_slots: jax.Array  # [nk, bk]
    kv_valid: jax.Array  # [nk, B, bk]
    kv_segments: Optional[jax.Array]  # [nk, B, bk]
    need: jax.Array  # [nq, nk] bool: the block pair may hold a visible (query, key)


def _block_mask_vectors(mask: AttentionMask, window, nq, bq, nk, bk) -> _Blocked:
    qs = _to_blocks(mask.q_slots.astype(jnp.int32), 0, nq, bq)  # padded queries repeat the last slot
    ks = _to_blocks(mask.kv_slots.astype(jnp.int32), 0, nk, bk)
    kvv = _to_blocks(mask.kv_valid.astype(bool), 1, nk, bk, False)  # padded keys are invalid
    qseg = kseg = None
    if mask.q_segments is not None:
        qseg = _to_blocks(mask.q_segments.astype(jnp.int32), 1, nq, bq)
        kseg = _to_blocks(mask.kv_segments.astype(jnp.int32), 1, nk, bk, -1)
    q_min, q_max = qs.min(-1), qs.max(-1)
    k_min, k_max = ks.min(-1), ks.max(-1)
    need = (k_min[None, :] <= q_max[:, None]) & kvv.any((1, 2))[None, :]
    if window is not None:
        need = need & (k_max[None, :] > q_min[:, None] - window)
    return _Blocked(qs, qseg, ks, kvv, kseg, need)


def _pair_mask(bm: _Blocked, window, i, j) -> jax.Array:
    """[B, 1, 1, bq, bk] bool: which keys of block j the queries of block i see."""
    qs, ks = bm.q_slots[i][:, None], bm.kv_slots[j][None, :]
    keep = (ks <= qs)[None] & bm.kv_valid[j][:, None, :]
    if window is not None:
        keep = keep & (ks > qs - window)[None]
    if bm.q_segments is not None:
        keep = keep & (bm.q_segments[i][:, :, None] == bm.kv_segments[j][:, None, :])
    return keep[:, None, None]


def _scores(qi, kj, scale, cap):
    """f32 [B, K, G, bq, bk] scores (after the soft-cap) and tanh(x / cap) (None without a cap)."""
    x = jnp.einsum("bqkgd,bskd->bkgqs", qi, kj, preferred_element_type=jnp.float32) * jnp.float32(scale)
    if cap is None:
        return x, None
    th = jnp.tanh(x / jnp.float32(cap))
    return th * jnp.float32(cap), th


def _blockwise_fwd_impl(scale, cap, bq, bk, q, k, v, mask, window):
    b, t, h, dh = q.shape
    s_len, kv_heads = k.shape[1], k.shape[2]
    g = h // kv_heads
    nq, nk = -(-t // bq), -(-s_len // bk)
    bm = _block_mask_vectors(mask, window, nq, bq, nk, bk)
    qb = _to_blocks(q.reshape(b, t, kv_heads, g, dh), 1, nq, bq, 0)  # [nq, B, bq, K, G, Dh]
    kb = _to_blocks(k, 1, nk, bk, 0)  # [nk, B, bk, K, Dh]
    vb = _to_blocks(v, 1, nk, bk, 0)
    lo, hi = _first_last(bm.need)

    def q_block(_, i):
        qi = qb[i]

        def k_block(j, carry):
            m, total, acc = carry
            s, _ = _scores(qi, kb[j], scale, cap)
            keep = _pair_mask(bm, window, i, j)
            m_new = jnp.maximum(m, jnp.where(keep, s, MASK_VALUE).max(-1))
            p = jnp.exp(jnp.where(keep, s - m_new[..., None], -jnp.inf))
            corr = jnp.exp(m - m_new)
            total = total * corr + p.sum(-1)
            pv = jnp.einsum("bkgqs,bskd->bkgqd", p.astype(v.dtype), vb[j], preferred_element_type=jnp.float32)
            return m_new, total, acc * corr[..., None] + pv

        init = (jnp.full((b, kv_heads, g, bq), MASK_VALUE, jnp.float32), jnp.zeros((b, kv_heads, g, bq), jnp.float32),
                jnp.zeros((b, kv_heads, g, bq, dh), jnp.float32))
        m, total, acc = jax.lax.fori_loop(lo[i], hi[i], k_block, init)
        seen = total > 0  # rows with no visible key: output 0, lse 0 (never used: their probabilities are all 0)
        out = acc / jnp.where(seen, total, 1.0)[..., None]
        lse = jnp.where(seen, m + jnp.log(jnp.where(seen, total, 1.0)), 0.0)
        return None, (out.astype(q.dtype), lse)

    _, (out, lse) = jax.lax.scan(q_block, None, jnp.arange(nq))  # [nq, B, K, G, bq, Dh], [nq, B, K, G, bq]
    out = jnp.moveaxis(out, 0, 3).reshape(b, kv_heads, g, nq * bq, dh)[:, :, :, :t]
    out = jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, t, h, dh)
    return out, lse


def _blockwise_bwd_impl(scale, cap, bq, bk, q, k, v, mask, window, out, lse, dout):
    b, t, h, dh = q.shape
    s_len, kv_heads = k.shape[1], k.shape[2]
    g = h // kv_heads
    nq, nk = -(-t // bq), -(-s_len // bk)
    bm = _block_mask_vectors(mask, window, nq, bq, nk, bk)
    qb = _to_blocks(q.reshape(b, t, kv_heads, g, dh), 1, nq, bq, 0)
    dob = _to_blocks(dout.reshape(b, t, kv_heads, g, dh), 1, nq, bq, 0)  # padded queries: zero cotangent
    kb = _to_blocks(k, 1, nk, bk, 0)
    vb = _to_blocks(v, 1, nk, bk, 0)
    delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), -1)  # [B, T, H]
    delta = jnp.moveaxis(_to_blocks(delta.reshape(b, t, kv_heads, g), 1, nq, bq, 0), 2, -1)  # [nq, B, K, G, bq]
    lo, hi = _first_last(bm.need.T)

    def k_block(dq, j):
        kj, vj = kb[j], vb[j]

        def q_block(i, carry):
            dk, dv, dq = carry
            qi, doi = qb[i], dob[i]
            s, th = _scores(qi, kj, scale, cap)
            keep = _pair_mask(bm, window, i, j)
            p = jnp.exp(jnp.where(keep, s - lse[i][..., None], -jnp.inf))  # [B, K, G, bq, bk]
            dv = dv + jnp.einsum("bkgqs,bqkgd->bskd", p.astype(dout.dtype), doi, preferred_element_type=jnp.float32)
            dp = jnp.einsum("bqkgd,bskd->bkgqs", doi, vj, preferred_element_type=jnp.float32)
            ds = p * (dp - delta[i][..., None])
            if th is not None:
                ds = ds * (1.0 - th * th)  # d(cap * tanh(x / cap)) / dx
            ds = (ds * jnp.float32(scale)).astype(q.dtype)
            dk = dk + jnp.einsum("bkgqs,bqkgd->bskd", ds, qi, preferred_element_type=jnp.float32)
            dqi = jnp.einsum("bkgqs,bskd->bqkgd", ds, kj, preferred_element_type=jnp.float32)
            dq = jax.lax.dynamic_update_index_in_dim(dq, dq[i] + dqi, i, 0)
            return dk, dv, dq

        zeros = jnp.zeros((b, bk, kv_heads, dh), jnp.float32)
        dk, dv, dq = jax.lax.fori_loop(lo[j], hi[j], q_block, (zeros, zeros, dq))
        return dq, (dk.astype(k.dtype), dv.astype(v.dtype))

    dq0 = jnp.zeros((nq, b, bq, kv_heads, g, dh), jnp.float32)
    dq, (dk, dv) = jax.lax.scan(k_block, dq0, jnp.arange(nk))
    dq = jnp.moveaxis(dq, 0, 1).reshape(b, nq * bq, h, dh)[:, :t].astype(q.dtype)
    dk = jnp.moveaxis(dk, 0, 1).reshape(b, nk * bk, kv_heads, dh)[:, :s_len]
    dv = jnp.moveaxis(dv, 0, 1).reshape(b, nk * bk, kv_heads, dh)[:, :s_len]
    return dq, dk, dv


@partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _blockwise_core(scale, cap, bq, bk, q, k, v, mask, window):
    return _blockwise_fwd_impl(scale, cap, bq, bk, q, k, v, mask, window)[0]


def _blockwise_core_fwd(scale, cap, bq, bk, q, k, v, mask, window):
    out, lse = _blockwise_fwd_impl(scale, cap, bq, bk, q, k, v, mask, window)
    return out, (q, k, v, mask, window, out, lse)


def _blockwise_core_bwd(scale, cap, bq, bk, res, dout):
    q, k, v, mask, window, out, lse = res
    dq, dk, dv = _blockwise_bwd_impl(scale, cap, bq, bk, q, k, v, mask, window, out, lse, dout)
    return dq, dk, dv, None, None  # the mask and the window are integer / boolean: no cotangent


_blockwise_core.defvjp(_blockwise_core_fwd, _blockwise_core_bwd)


def blockwise_attention(q, k, v, mask: AttentionMask, *, scale, logit_softcap=None, window=None,
                        block_q: int = 512, block_k: int = 512) -> jax.Array:
    """Flash-style attention: the same result as :func:`dense_attention`, in O(T + S) memory.

    Dense attention materialises [B, H, T, S] float32 scores and probabilities (and keeps them for
    the backward pass), which at long sequences dominates memory. Here the keys are visited in
    blocks with an online softmax (running max and sum in float32), and a custom VJP recomputes
    each block's probabilities from the saved per-row log-sum-exp, so neither pass holds more than
    one [B, K, G, block_q, block_k] tile of scores. K/V are not repeated for grouped-query heads.
    Key blocks that no query of a query block can see (above the causal diagonal, outside the
    window, or all padding) are skipped by looping over the first..last needed block only.
    T and S need not be multiples of the block sizes. Queries with no visible key output 0 and
    get zero gradients.
    """
    t, s_len = q.shape[1], k.shape[1]
    bq = max(1, min(int(block_q), t))
    bk = max(1, min(int(block_k), s_len))
    cap = float(logit_softcap) if logit_softcap is not None and logit_softcap > 0 else None
    if window is not None:
        window = jnp.asarray(window, jnp.int32)
    return _blockwise_core(float(scale), cap, bq, bk, q, k, v, mask, window)


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


# ----------------------------------------------------------------------------- choosing a backend

# On CPU, `auto` keeps the dense path up to this many keys per query: there it is faster (XLA:CPU
# runs one fused softmax) and its [T, S] scores still fit; beyond it, blockwise (BENCHMARKS.md).
DENSE_MAX_KEYS_ON_CPU = 2048
# cuDNN takes the padding mask as a dense [B, 1, T, S] operand: above this many elements, blockwise.
CUDNN_MAX_MASK_ELEMENTS = 1 << 28

log = logging.getLogger("grpo_jax.attention")


@functools.lru_cache(maxsize=None)
def _say_once(message: str) -> None:
    log.info(message)


def cudnn_supports(q, k, mask: AttentionMask, logit_softcap) -> Optional[str]:
    """None when cuDNN's fused attention (`jax.nn.dot_product_attention`) computes this call exactly, else why not."""
    if jax.default_backend() != "gpu":
        return f"the backend is {jax.default_backend()}, not gpu"
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        return f"cuDNN attention needs bfloat16 or float16 inputs, not {q.dtype}"
    if logit_softcap:
        return "cuDNN attention has no logit soft-cap"
    if mask.q_segments is not None:
        return "packed segments"
    if q.shape[1] != k.shape[1]:
        return "queries and keys differ in length (a prefill over a KV cache)"
    if q.shape[-1] % 8 or q.shape[-1] > 256:
        return f"head_dim {q.shape[-1]} (cuDNN needs a multiple of 8, at most 256)"
    elements = q.shape[0] * q.shape[1] * k.shape[1]
    if elements > CUDNN_MAX_MASK_ELEMENTS:
        return f"its padding mask would be {elements / 1e9:.1f}G elements (B x T x S)"
    return None


def cudnn_attention(q, k, v, mask: AttentionMask, *, scale: float, window=None) -> jax.Array:
    """cuDNN's fused flash attention; the causal / padding / window rule goes in as a boolean mask."""
    keep = block_mask(mask, window)[:, None]  # [B, 1, T, S]
    return jax.nn.dot_product_attention(q, k, v, mask=keep, scale=scale, implementation="cudnn").astype(q.dtype)


def resolve_impl(impl: str, q, k, mask: AttentionMask, logit_softcap) -> tuple[str, Optional[str]]:
    """(the backend that runs this call, why the asked-for one does not when it falls back)."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention_impl {impl!r}; supported: {', '.join(ATTENTION_IMPLS)}")
    backend = jax.default_backend()
    if impl == "auto":
        if backend == "tpu":
            impl = "splash"
        elif backend == "gpu":
            impl = "cudnn"
        else:
            return ("dense" if k.shape[1] <= DENSE_MAX_KEYS_ON_CPU else "blockwise"), None
        why = _why_not(impl, q, k, mask, logit_softcap)
        return ("blockwise", None) if why else (impl, None)  # auto falls back quietly
    why = _why_not(impl, q, k, mask, logit_softcap)
    return ("blockwise", why) if why else (impl, None)


def _why_not(impl, q, k, mask, logit_softcap) -> Optional[str]:
    if impl == "splash":
        return splash.supports(q, k, mask)
    if impl == "cudnn":
        return cudnn_supports(q, k, mask, logit_softcap)
    return None


def _per_device_rows(kernel, mesh, q, k, v, mask: AttentionMask, is_sliding):
    """kernel(q, k, v, mask, is_sliding) under shard_map, each device on its own rows (data x fsdp).

    A Pallas kernel has no partitioning rule: left to the partitioner, every device would gather
    and compute the whole batch. Falls back to the plain call when the rows do not divide."""
    from jax.sharding import PartitionSpec

    from grpo_jax.sharding import BATCH, data_parallel_size

    if mesh is None or q.shape[0] % data_parallel_size(mesh):
        return kernel(q, k, v, mask, is_sliding)
    rows, whole = PartitionSpec(BATCH), PartitionSpec()
    seg = None if mask.q_segments is None else rows
    mask_specs = AttentionMask(whole, whole, rows, seg, seg)
    flag = None if is_sliding is None else jnp.asarray(is_sliding)
    mapped = jax.shard_map(kernel, mesh=mesh, in_specs=(rows, rows, rows, mask_specs, None if flag is None else whole),
                           out_specs=rows, check_vma=False)
    return mapped(q, k, v, mask, flag)


def attend(q, k, v, mask: AttentionMask, *, impl: str = "auto", scale: float, logit_softcap: Optional[float] = None,
           sliding_window: Optional[int] = None, is_sliding=None, block_q: int = 512, block_kv: int = 512,
           mesh=None) -> jax.Array:
    """Attention by the backend `impl` names (model.attention_impl), each computing `dense_attention`'s result.

    auto: splash on TPU, cuDNN on GPU where it applies, else blockwise; on CPU dense up to
    DENSE_MAX_KEYS_ON_CPU keys, blockwise beyond. A backend asked for by name that cannot run
    this call falls back to blockwise and logs why, once per reason.
    sliding_window / is_sliding: the model's window and this layer's (possibly traced) flag.
    mesh: the mesh whose data x fsdp axes split the rows (the trainer's `shard_activations`); the
    splash kernel then runs per device on its rows (shard_map).
    """
    chosen, why = resolve_impl(impl, q, k, mask, logit_softcap)
    if why:
        _say_once(f"attention_impl={impl} does not apply ({why}); using blockwise for this call")
    if chosen == "splash":
        t = q.shape[1]  # the configured blocks where the kernel takes them (dividing T, lane-aligned), else its own
        sizes = {name: b for name, b in (("block_q", block_q), ("block_kv", block_kv)) if t % b == 0 and b % 128 == 0}
        kernel = lambda q, k, v, mask, flag: splash.splash_attention(  # noqa: E731
            q, k, v, mask, scale=scale, logit_softcap=logit_softcap, sliding_window=sliding_window,
            is_sliding=flag, block_sizes=sizes)
        return _per_device_rows(kernel, mesh, q, k, v, mask, is_sliding)
    window = window_of(sliding_window, is_sliding)
    if chosen == "cudnn":
        return cudnn_attention(q, k, v, mask, scale=scale, window=window)
    if chosen == "blockwise":
        return blockwise_attention(q, k, v, mask, scale=scale, logit_softcap=logit_softcap, window=window,
                                   block_q=block_q, block_k=block_kv)
    return dense_attention(q, k, v, mask, scale=scale, logit_softcap=logit_softcap, window=window)
