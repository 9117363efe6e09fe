"""One Flax NNX decoder for Llama 2/3.x, Mistral, Qwen2/2.5, Qwen3, Gemma 2 and Gemma 3 (text).

Families differ only by flags of :class:`TransformerConfig`; there is one module,
:class:`Transformer`. Layer params are stacked on a leading ``layers`` axis and the
decoder runs ``jax.lax.scan`` over them (one compiled layer body, fast compiles for
deep models); per-layer differences (sliding vs global attention, Gemma 3's local
rope base) are scanned flags.

Call convention (see :meth:`Transformer.__call__`)::

    logits, cache = model(tokens[B,T] int32, positions[B,T] int32, attention_mask[B,T], cache=None)

* no cache: causal + padding mask over the T tokens; returns ``(logits, None)``.
* with a :class:`KVCache` (from :func:`init_cache`): the T tokens are written at
  cache slots ``[cache.index, cache.index + T)``, ``slot_mask`` is set from
  ``attention_mask`` for those slots, ``index`` advances by T, and each query at
  slot ``q`` attends to every slot ``s`` with ``slot_mask[b, s] & (s <= q)``
  (``& (s > q - sliding_window)`` on sliding layers). Prefill = call with the
  left-padded prompt; decode = call with T = 1 (attention_mask ones).

Logits are float32. ``model.hidden_states(...)`` returns the final normed hidden
states instead (compute dtype) and ``model.logits(hidden)`` / ``logits_from_hidden``
projects any slice of them, so a loss can work chunk-wise over the sequence.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import json
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from grpo_jax.config import ATTENTION_IMPLS, REMAT_POLICIES
from grpo_jax.models import attention as A
from grpo_jax.models import layers as L
from grpo_jax.models import lora
from grpo_jax.sharding import pin_rows, spec_for

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}



def _dtype_name(dtype: Any) -> str:
    if dtype is None:
        return "float32"
    if isinstance(dtype, str):
        name = {"fp32": "float32", "f32": "float32", "bf16": "bfloat16", "fp16": "float16", "f16": "float16"}.get(
            dtype, dtype
        )
    else:
        name = jnp.dtype(dtype).name
    if name not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; supported: {', '.join(DTYPES)}")
    return name


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Everything the decoder needs. Frozen and hashable (usable as a jit static arg)."""

    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    # rotary embeddings (global / full-attention layers)
    rope_theta: float = 10000.0
    rope_type: str = "default"  # default | linear | llama3
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0  # llama3
    rope_high_freq_factor: float = 4.0  # llama3
    rope_original_max_position: int = 8192  # llama3
    # Gemma 3: sliding layers use their own (unscaled, default-type) rope base. None: same rope as global.
    rope_local_theta: float | None = None
    max_position_embeddings: int = 4096
    # norms
    rms_norm_eps: float = 1e-6
    norm_style: str = "llama"  # llama: w * norm(x);  gemma: norm(x) * (1 + w), zero-centred weights
    post_norms: bool = False  # Gemma 2/3: extra norms after attention and after the MLP
    qk_norm: bool = False  # Qwen3 / Gemma 3: RMSNorm over head_dim of q and k before rope
    # projections
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 (and Llama attention_bias)
    o_bias: bool = False  # Llama attention_bias
    activation: str = "silu"  # silu | gelu_pytorch_tanh | gelu
    embed_scale: float = 1.0  # Gemma: sqrt(hidden_size)
    # attention
    query_pre_attn_scalar: float | None = None  # scale = this ** -0.5 (Gemma); None: head_dim ** -0.5
    attn_logit_softcap: float | None = None  # Gemma 2
    final_logit_softcap: float | None = None  # Gemma 2
    sliding_window: int | None = None
    # per-layer "sliding_attention" / "full_attention"; None: all sliding if sliding_window else all full
    layer_types: tuple[str, ...] | None = None
    # numerics / memory
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    remat_policy: str = "none"
    attention_impl: str = "auto"  # auto | dense | blockwise | splash | cudnn (models/attention.py)
    attention_block_q: int = 512  # query / key block sizes of the blockwise and splash backends
    attention_block_kv: int = 512
    mlp_chunk: int = 0  # > 0: the MLP runs this many positions at a time (long sequences; layers.gated_mlp_in_chunks)
    # provenance and HF fields that must survive a round trip (JSON object as a string)
    model_type: str = "llama"
    hf_extra: str = "{}"

    def __post_init__(self):
        object.__setattr__(self, "param_dtype", _dtype_name(self.param_dtype))
        object.__setattr__(self, "compute_dtype", _dtype_name(self.compute_dtype))
        if self.layer_types is not None:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
            if len(self.layer_types) != self.num_layers:
                raise ValueError(f"layer_types has {len(self.layer_types)} entries, "
                                 f"expected num_layers={self.num_layers}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"unknown remat_policy {self.remat_policy!r}; supported: {', '.join(REMAT_POLICIES)}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"unknown attention_impl {self.attention_impl!r}; supported: {', '.join(ATTENTION_IMPLS)}")
        if self.norm_style not in ("llama", "gemma"):
            raise ValueError(f"unknown norm_style {self.norm_style!r}; supported: llama, gemma")
        L.activation_fn(self.activation)  # validates

    # -- derived
    @property
    def param_jnp_dtype(self):
        return DTYPES[self.param_dtype]

    @property
    def compute_jnp_dtype(self):
        return DTYPES[self.compute_dtype]

    @property
    def attn_scale(self) -> float:
        if self.query_pre_attn_scalar:
            return float(self.query_pre_attn_scalar) ** -0.5
        return float(self.head_dim) ** -0.5

    @property
    def sliding_layers(self) -> tuple[bool, ...]:
        """Per layer: True when the layer uses the sliding window (and the local rope)."""
        if not self.sliding_window:
            return (False,) * self.num_layers
        if self.layer_types is None:
            return (True,) * self.num_layers
        return tuple(t == "sliding_attention" for t in self.layer_types)

    @property
    def extra(self) -> dict:
        return json.loads(self.hf_extra or "{}")

    def replace(self, **kwargs) -> "TransformerConfig":
        return dataclasses.replace(self, **kwargs)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if d["layer_types"] is not None:
            d["layer_types"] = list(d["layer_types"])
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "TransformerConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown TransformerConfig fields: {', '.join(unknown)}")
        d = dict(d)
        if d.get("layer_types") is not None:
            d["layer_types"] = tuple(d["layer_types"])
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> "TransformerConfig":
        return cls.from_dict(json.loads(text))

    def num_params(self) -> int:
        D, F, H, K, Dh, V = (self.hidden_size, self.intermediate_size, self.num_heads, self.num_kv_heads,
                             self.head_dim, self.vocab_size)
        per_layer = D * H * Dh * 2 + 2 * D * K * Dh + 3 * D * F + D * (4 if self.post_norms else 2)
        per_layer += (H + 2 * K) * Dh * self.qkv_bias + D * self.o_bias + 2 * Dh * self.qk_norm
        return V * D * (1 if self.tie_word_embeddings else 2) + self.num_layers * per_layer + D

    def forward_flops_per_token(self, seq_len: int) -> float:
        """Matmul FLOPs of a forward pass per token (2 * MACs), attention over seq_len keys (causal: / 2)."""
        D, F, H, K, Dh, V = (self.hidden_size, self.intermediate_size, self.num_heads, self.num_kv_heads,
                             self.head_dim, self.vocab_size)
        proj = D * H * Dh * 2 + 2 * D * K * Dh + 3 * D * F
        attn = 2 * H * Dh * seq_len / 2
        return 2.0 * (self.num_layers * (proj + attn) + D * V)


# ----------------------------------------------------------------------------- cache


class KVCache(NamedTuple):
    """Static-shape KV cache, a plain pytree (jit with donate_argnums to update in place).

    k, v:      [num_layers, B, num_kv_heads, max_len, head_dim] in compute dtype (k after rope);
               heads-major, so decode reads each (row, kv head)'s keys as one contiguous block
    slot_mask: [B, max_len] bool, True where a slot holds a real (non-pad) token
    index:     int32 scalar, next slot to write (same for the whole batch)
    """

    k: jax.Array
    v: jax.Array
    slot_mask: jax.Array
    index: jax.Array


def init_cache(config: TransformerConfig, batch: int, max_len: int, dtype: Any = None) -> KVCache:
    """Empty cache for ``batch`` rows and ``max_len`` slots (prompt + generated tokens)."""
    dtype = config.compute_jnp_dtype if dtype is None else dtype
    shape = (config.num_layers, batch, config.num_kv_heads, max_len, config.head_dim)
    return KVCache(
        k=jnp.zeros(shape, dtype),
        v=jnp.zeros(shape, dtype),
        slot_mask=jnp.zeros((batch, max_len), jnp.bool_),
        index=jnp.zeros((), jnp.int32),
    )


def positions_from_mask(mask: jax.Array) -> jax.Array:
    """Positions of a (left-)padded batch: ``cumsum(mask) - 1`` clipped at 0, int32 [B, T]."""
    mask = jnp.asarray(mask).astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0).astype(jnp.int32)


# ----------------------------------------------------------------------------- params


def _param(rngs: nnx.Rngs | None, shape, dtype, names, init: str = "normal", std: float = 0.02):
    if init == "normal":
        value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
    elif init == "ones":
        value = jnp.ones(shape, jnp.float32)
    else:
        value = jnp.zeros(shape, jnp.float32)
    return nnx.Param(value.astype(dtype), out_sharding=tuple(names), eager_sharding=False)


class DecoderLayers(nnx.Module):
    """All decoder layers, params stacked on a leading ``layers`` axis.

    Weights use [in, out] layout with heads split out:
    wq [L, D, H, Dh], wk/wv [L, D, K, Dh], wo [L, H, Dh, D], w_gate/w_up [L, D, F], w_down [L, F, D].
    """

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        c = config
        Ln, D, F, H, K, Dh = c.num_layers, c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim
        dt = c.param_jnp_dtype
        norm_init = "zeros" if c.norm_style == "gemma" else "ones"
        p = lambda shape, names, init="normal": _param(rngs, shape, dt, names, init)  # noqa: E731
        self.attn_norm = p((Ln, D), ("layers", "norm"), norm_init)
        self.wq = p((Ln, D, H, Dh), ("layers", "embed", "heads", "head_dim"))
        self.wk = p((Ln, D, K, Dh), ("layers", "embed", "kv_heads", "head_dim"))
        self.wv = p((Ln, D, K, Dh), ("layers", "embed", "kv_heads", "head_dim"))
        self.wo = p((Ln, H, Dh, D), ("layers", "heads", "head_dim", "embed"))
        if c.qkv_bias:
            self.bq = p((Ln, H, Dh), ("layers", "heads", "head_dim"), "zeros")
            self.bk = p((Ln, K, Dh), ("layers", "kv_heads", "head_dim"), "zeros")
            self.bv = p((Ln, K, Dh), ("layers", "kv_heads", "head_dim"), "zeros")
        if c.o_bias:
            self.bo = p((Ln, D), ("layers", "embed"), "zeros")
        if c.qk_norm:
            self.q_norm = p((Ln, Dh), ("layers", "norm"), norm_init)
            self.k_norm = p((Ln, Dh), ("layers", "norm"), norm_init)
        if c.post_norms:
            self.post_attn_norm = p((Ln, D), ("layers", "norm"), norm_init)
            self.post_mlp_norm = p((Ln, D), ("layers", "norm"), norm_init)
        self.mlp_norm = p((Ln, D), ("layers", "norm"), norm_init)
        self.w_gate = p((Ln, D, F), ("layers", "embed", "mlp"))
        self.w_up = p((Ln, D, F), ("layers", "embed", "mlp"))
        self.w_down = p((Ln, F, D), ("layers", "mlp", "embed"))


class Transformer(nnx.Module):
    """Decoder-only LM. Param tree (``nnx.to_pure_dict(nnx.state(model))``)::

        embed [V, D]            (vocab, embed)
        layers/<name> [L, ...]  see DecoderLayers
        final_norm [D]          (norm,)
        lm_head [D, V]          (embed, vocab); absent when tie_word_embeddings
    """

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        self.config = config
        c = config
        dt = c.param_jnp_dtype
        self.embed = _param(rngs, (c.vocab_size, c.hidden_size), dt, ("vocab", "embed"))
        self.layers = DecoderLayers(c, rngs=rngs)
        self.final_norm = _param(rngs, (c.hidden_size,), dt, ("norm",), "zeros" if c.norm_style == "gemma" else "ones")
        if not c.tie_word_embeddings:
            self.lm_head = _param(rngs, (c.hidden_size, c.vocab_size), dt, ("embed", "vocab"))

    def params(self) -> dict:
        """The param arrays as a plain nested dict."""
        return nnx.to_pure_dict(nnx.state(self, nnx.Param))

    def __call__(self, tokens, positions, attention_mask, cache: KVCache | None = None):
        """-> (logits [B, T, V] float32, updated cache or None). See the module docstring."""
        return apply(self.config, self.params(), tokens, positions, attention_mask, cache)

    def hidden_states(self, tokens, positions, attention_mask, cache: KVCache | None = None):
        """-> (final normed hidden states [B, T, D] in compute dtype, cache)."""
        return apply(self.config, self.params(), tokens, positions, attention_mask, cache, return_hidden=True)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """float32 logits (with final soft-capping) of hidden states [..., D]."""
        return logits_from_hidden(self.config, self.params(), hidden)

    def unembedding(self) -> jax.Array:
        """Unembedding matrix [D, V] (a transposed view of the embedding when tied)."""
        return unembedding(self.config, self.params())


# ----------------------------------------------------------------------------- pure functions


def forward(graphdef, state, tokens, positions, attention_mask, cache: KVCache | None = None,
            *, return_hidden: bool = False):
    """Pure forward on ``nnx.split(model)`` output; jit-friendly (graphdef static by pytree)."""
    model = nnx.merge(graphdef, state)
    return apply(model.config, model.params(), tokens, positions, attention_mask, cache, return_hidden=return_hidden)


def unembedding(config: TransformerConfig, params: dict) -> jax.Array:
    if config.tie_word_embeddings:
        return params["embed"].T
    return params["lm_head"]


def logits_from_hidden(config: TransformerConfig, params: dict, hidden: jax.Array) -> jax.Array:
    """float32 logits [..., V] from hidden states [..., D]; apply on chunks to bound memory."""
    cd = config.compute_jnp_dtype
    h = hidden.astype(cd)
    if config.tie_word_embeddings:
        logits = jnp.einsum("...d,vd->...v", h, params["embed"].astype(cd), preferred_element_type=jnp.float32)
    else:
        logits = jnp.einsum("...d,dv->...v", h, params["lm_head"].astype(cd), preferred_element_type=jnp.float32)
    return A.softcap(logits, config.final_logit_softcap)


@dataclasses.dataclass(frozen=True)
class Decoder:
    """The decoder of one TransformerConfig as pure functions of a param dict.

    What the sampler calls (`decoder(params, tokens, positions, mask, cache)`, `init_cache`)
    and what the trainer calls (`hidden_states`, then `project` one chunk at a time, so the
    [R, T, V] logits never exist whole). Frozen and hashable by its config: jitted programs
    take it as a static argument, and two equal configs share their compiled programs.
    """

    config: TransformerConfig

    def __call__(self, params, tokens, positions, attention_mask, cache: KVCache | None = None, *,
                 segment_ids=None):
        """(logits [B, T, V] float32, cache): `apply`."""
        return apply(self.config, params, tokens, positions, attention_mask, cache, segment_ids=segment_ids)

    def init_cache(self, batch: int, max_len: int) -> KVCache:
        return init_cache(self.config, batch, max_len)

    def hidden_states(self, params, tokens, positions, attention_mask, *, segment_ids=None) -> jax.Array:
        """The final normed hidden states [B, T, D] of a training pass (no cache)."""
        hidden, _ = apply(self.config, params, tokens, positions, attention_mask, None, return_hidden=True,
                          segment_ids=segment_ids)
        return hidden

    def project(self, params, hidden: jax.Array) -> jax.Array:
        """float32 logits [..., V] of hidden states [..., D] (`logits_from_hidden`)."""
        return logits_from_hidden(self.config, params, hidden)


def _remat_policy(name: str):
    cp = jax.checkpoint_policies
    return {
        "full": cp.nothing_saveable,
        "nothing_saveable": cp.nothing_saveable,
        "dots_saveable": cp.dots_saveable,
        "dots_with_no_batch_dims_saveable": cp.dots_with_no_batch_dims_saveable,
        "everything_saveable": cp.everything_saveable,
    }[name]


_ACTIVATION_MESH: contextvars.ContextVar = contextvars.ContextVar("activation_mesh", default=None)


@contextlib.contextmanager
def shard_activations(mesh: jax.sharding.Mesh | None):
    """While tracing inside this, `apply` without a cache pins the residual stream's rows to the
    mesh's batch axes (data x fsdp). Without it XLA may follow the fsdp-sharded weights and
    compute every row on every device; the trainer's steps trace under it, the rollout does not."""
    token = _ACTIVATION_MESH.set(mesh)
    try:
        yield
    finally:
        _ACTIVATION_MESH.reset(token)


def _rows_constraint(mesh):
    """x -> x with its leading (batch) axis split over data x fsdp, the rest replicated; identity without a mesh."""
    return lambda x: pin_rows(x, mesh)


def apply(config: TransformerConfig, params: dict, tokens, positions, attention_mask,
          cache: KVCache | None = None, *, return_hidden: bool = False, segment_ids=None):
    """The decoder as a pure function of a plain param dict. See the module docstring.

    segment_ids [B, T] int32 (packed sequences, no cache): a token attends only to earlier
    tokens of its own segment; positions then restart per segment (the caller's)."""
    c = config
    cd = c.compute_jnp_dtype
    mesh = _ACTIVATION_MESH.get() if cache is None else None
    rows = _rows_constraint(mesh)
    tokens = jnp.asarray(tokens, jnp.int32)
    positions = jnp.asarray(positions, jnp.int32)
    mask = jnp.asarray(attention_mask).astype(jnp.bool_)
    B, T = tokens.shape

    h = jnp.take(params["embed"], tokens, axis=0).astype(cd)
    if c.embed_scale != 1.0:
        h = h * jnp.asarray(c.embed_scale, dtype=cd)
    h = rows(h)

    # which keys each query sees, as vectors: each backend builds its own blocks of the mask
    if cache is None:
        slots = jnp.arange(T, dtype=jnp.int32)
        amask = A.AttentionMask(slots, slots, mask, segment_ids, segment_ids)
        index = None
    else:
        if segment_ids is not None:
            raise ValueError("segment_ids (packed sequences) are for training passes, not with a KV cache")
        index = cache.index.astype(jnp.int32)
        slot_mask = jax.lax.dynamic_update_slice(cache.slot_mask, mask, (0, index))
        amask = A.AttentionMask(index + jnp.arange(T, dtype=jnp.int32),
                                jnp.arange(cache.k.shape[3], dtype=jnp.int32), slot_mask)
    sliding_flags = c.sliding_layers
    any_sliding = any(sliding_flags)
    mixed_sliding = any_sliding and not all(sliding_flags)
    attend = functools.partial(A.attend, impl=c.attention_impl, scale=c.attn_scale, logit_softcap=c.attn_logit_softcap,
                               sliding_window=c.sliding_window if any_sliding else None,
                               block_q=c.attention_block_q, block_kv=c.attention_block_kv, mesh=mesh)

    # rotary tables
    inv_freq = L.rope_inv_freq(c.head_dim, c.rope_theta, c.rope_type, c.rope_factor, c.rope_low_freq_factor,
                               c.rope_high_freq_factor, c.rope_original_max_position)
    cos_g, sin_g = L.rope_cos_sin(positions, inv_freq)
    local_rope = c.rope_local_theta is not None and any_sliding
    if local_rope:
        cos_l, sin_l = L.rope_cos_sin(positions, L.rope_inv_freq(c.head_dim, c.rope_local_theta))

    layer_params = params["layers"]
    xs = {
        "p": layer_params,
        "sliding": jnp.asarray(sliding_flags, jnp.bool_),
    }

    def norm(x, w):
        return L.rms_norm(x, w, c.rms_norm_eps, c.norm_style)

    def body(h, x):
        p = {k: v.astype(cd) for k, v in x["p"].items()}
        is_sliding = x["sliding"]
        # attention
        a = rows(norm(h, p["attn_norm"]))
        q = lora.einsum("btd,dhk->bthk", a, p["wq"])
        k = lora.einsum("btd,dhk->bthk", a, p["wk"])
        v = lora.einsum("btd,dhk->bthk", a, p["wv"])
        if c.qkv_bias:
            q, k, v = q + p["bq"], k + p["bk"], v + p["bv"]
        if c.qk_norm:
            q, k = norm(q, p["q_norm"]), norm(k, p["k_norm"])
        if local_rope:
            cos = jnp.where(is_sliding, cos_l, cos_g)
            sin = jnp.where(is_sliding, sin_l, sin_g)
        else:
            cos, sin = cos_g, sin_g
        q, k = L.apply_rope(q, cos, sin), L.apply_rope(k, cos, sin)
        if cache is not None:
            # this layer's cache slice comes in as a scanned input and only the new
            # tokens' k / v go out; the full cache is written once, after the scan, in place
            zero = jnp.zeros((), jnp.int32)
            k_new, v_new = k.astype(cache.k.dtype), v.astype(cache.v.dtype)  # [B, T, K, Dh]
            kv_out = (k_new.transpose(0, 2, 1, 3), v_new.transpose(0, 2, 1, 3))  # the cache's [B, K, T, Dh]
        layer_sliding = is_sliding if mixed_sliding else None
        if cache is None:
            o = attend(q, k, v, amask, is_sliding=layer_sliding)
        elif T <= A.CACHED_ATTENTION_MAX_QUERIES:  # decode: reads the cache slice as is
            window = A.window_of(c.sliding_window if any_sliding else None, layer_sliding)
            o = A.cached_attention(q, x["k"].astype(cd), x["v"].astype(cd), k_new.astype(cd), v_new.astype(cd),
                                   A.block_mask(amask, window), index, scale=c.attn_scale,
                                   logit_softcap=c.attn_logit_softcap)
        else:  # a long chunk (prefill): written into this layer's cache slice, then attention over every slot
            k_all, v_all = (jax.lax.dynamic_update_slice(x[n], new, (zero, zero, index, zero)).transpose(0, 2, 1, 3)
                            .astype(cd) for n, new in zip("kv", kv_out))
            o = attend(q, k_all, v_all, amask, is_sliding=layer_sliding)
        o = lora.einsum("bthk,hkd->btd", o, p["wo"])
        if c.o_bias:
            o = o + p["bo"]
        if c.post_norms:
            o = norm(o, p["post_attn_norm"])
        h = h + o
        # mlp
        f = rows(norm(h, p["mlp_norm"]))
        f = L.gated_mlp_in_chunks(f, p["w_gate"], p["w_up"], p["w_down"], c.activation, c.mlp_chunk)
        if c.post_norms:
            f = norm(f, p["post_mlp_norm"])
        h = rows(h + f)
        return h, (kv_out if cache is not None else None)

    if c.remat_policy != "none":
        body = jax.checkpoint(body, policy=_remat_policy(c.remat_policy), prevent_cse=False)

    if cache is not None:
        xs = dict(xs, k=cache.k, v=cache.v)
    h, new_kv = jax.lax.scan(body, h, xs)
    h = rows(norm(h, params["final_norm"].astype(cd)))

    new_cache = None
    if cache is not None:
        zero = jnp.zeros((), jnp.int32)
        start = (zero, zero, zero, index, zero)
        new_cache = KVCache(k=jax.lax.dynamic_update_slice(cache.k, new_kv[0], start),
                            v=jax.lax.dynamic_update_slice(cache.v, new_kv[1], start),
                            slot_mask=slot_mask, index=index + T)
    if return_hidden:
        return h, new_cache
    return logits_from_hidden(c, params, h), new_cache


# ----------------------------------------------------------------------------- logical axes / sharding


def _flat_variables(tree) -> dict[tuple, Any]:
    if isinstance(tree, nnx.Module):
        tree = nnx.state(tree, nnx.Param)
    out = {}
    for path, var in nnx.to_flat_state(tree):
        out[tuple(str(getattr(k, "key", k)) for k in path)] = var
    return out


def logical_axes(model_or_state) -> dict[tuple[str, ...], tuple[str, ...]]:
    """{param path: logical axis names}, e.g. ('layers', 'wq') -> ('layers', 'embed', 'heads', 'head_dim')."""
    out = {}
    for path, var in _flat_variables(model_or_state).items():
        meta = var.get_metadata() if hasattr(var, "get_metadata") else {}
        names = meta.get("out_sharding") or meta.get("sharding_names") or meta.get("sharding")
        out[path] = tuple(names) if names is not None else (None,) * len(var.shape)
    return out


def abstract_model(config: TransformerConfig) -> Transformer:
    """The model with ShapeDtypeStruct leaves (no memory); nnx.split it for (graphdef, abstract state)."""
    return nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))


def unflatten_paths(flat: dict[tuple, Any]) -> dict:
    """{('a', 'b'): x} -> {'a': {'b': x}}."""
    out: dict = {}
    for path, value in flat.items():
        d = out
        for k in path[:-1]:
            d = d.setdefault(k, {})
        d[path[-1]] = value
    return out


def param_shardings(model_or_state, mesh: jax.sharding.Mesh, rules: dict[str, Any]) -> dict:
    """Nested dict (same structure as ``nnx.to_pure_dict(state)``) of NamedSharding.

    rules maps a logical name to a mesh axis name, a tuple of them, or None (replicated);
    see ``grpo_jax.sharding.spec_for`` for how dims that do not divide are handled.
    """

    flat_vars = _flat_variables(model_or_state)
    out = {path: jax.sharding.NamedSharding(mesh, spec_for(names, flat_vars[path].shape, mesh, rules))
           for path, names in logical_axes(model_or_state).items()}
    return unflatten_paths(out)
