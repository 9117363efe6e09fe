"""LoRA: low-rank adapters on a frozen base, W x + (alpha / r) B A x (Hu et al. 2021, PEFT's semantics).

The trainable params are a small dict beside the base, one pair per adapted weight, stacked
over layers as the base is::

    {"layers": {"wq": {"a": [L, D, r], "b": [L, r, H, Dh]}, "wo": {"a": [L, H, Dh, r], "b": [L, r, D]}, ...}}

`a` carries the weight's input axes then the rank, `b` the rank then its output axes, so
`a` shards as its weight's input axes and `b` as its output axes (`adapter_shardings`).
`combine` puts a `LoraWeight` (base, a, b) where the decoder reads each adapted weight; the
decoder's matmuls (`einsum`, and the MLP's own backward pass in layers.py) then compute
x W + scale (x a) b without ever forming W + scale a b. The gradient reaches only a and b, and
the base alone (adapters off) is the reference policy. `merge` forms the sum, for export.
Init as PEFT: a Kaiming-uniform, b zero, so step 0 is the base model exactly.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp

from grpo_jax.config import LORA_ALL_LINEAR as ALL_LINEAR
from grpo_jax.config import LORA_TARGETS

TARGETS = dict(zip(LORA_TARGETS, ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")))  # -> the decoder's weight
HF_MODULES = {f"{t}_proj": t for t in LORA_TARGETS}  # Hugging Face / PEFT module names
IN_AXES = {"wo": 2}  # the weight's input axes after the layer axis (wo [L, H, Dh, D]); every other one has 1


def target_weights(names) -> tuple[str, ...]:
    """model.lora_targets -> the decoder weights they adapt, in the decoder's order ("all-linear": all seven)."""
    picked = set()
    for name in names:
        if name == ALL_LINEAR:
            picked.update(TARGETS.values())
            continue
        short = HF_MODULES.get(name, name)
        if short not in TARGETS:
            raise ValueError(f"unknown LoRA target {name!r}; supported: {ALL_LINEAR}, {', '.join(TARGETS)} "
                             f"(or their Hugging Face names {', '.join(HF_MODULES)})")
        picked.add(TARGETS[short])
    if not picked:
        raise ValueError("model.lora_targets is empty; name at least one weight (or all-linear)")
    return tuple(w for w in TARGETS.values() if w in picked)


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """The adapters' shape and scale (model.lora_*); hashable, so jitted steps can close over it."""

    rank: int
    alpha: float
    dropout: float
    weights: tuple[str, ...]  # decoder weight names ("wq", ...), `target_weights`

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_config(cls, model_cfg) -> Optional["LoraSpec"]:
        """The spec of a config's model section, or None when model.lora_rank = 0 (full fine-tuning)."""
        rank = model_cfg.lora_rank
        if not rank:
            return None
        alpha = model_cfg.lora_alpha if model_cfg.lora_alpha is not None else 2.0 * rank
        return cls(rank, float(alpha), float(model_cfg.lora_dropout), target_weights(model_cfg.lora_targets))


@flax.struct.dataclass
class LoraWeight:
    """A frozen weight with its adapter, where the decoder reads the weight (`combine`).

    key: per-layer dropout keys [L, 2] (training passes with model.lora_dropout > 0), else None.
    """

    base: jax.Array
    a: jax.Array
    b: jax.Array
    key: Optional[jax.Array] = None
    scale: float = flax.struct.field(pytree_node=False, default=1.0)
    dropout: float = flax.struct.field(pytree_node=False, default=0.0)

    def astype(self, dtype) -> "LoraWeight":
        return self.replace(base=self.base.astype(dtype), a=self.a.astype(dtype), b=self.b.astype(dtype))

    @property
    def drops(self) -> bool:
        return self.key is not None and self.dropout > 0

    def drop(self, x: jax.Array) -> jax.Array:
        """Dropout of the adapter's input (PEFT's lora_dropout); the identity without a key."""
        if not self.drops:
            return x
        keep = jax.random.bernoulli(self.key, 1.0 - self.dropout, x.shape)
        return jnp.where(keep, x / (1.0 - self.dropout), jnp.zeros((), x.dtype)).astype(x.dtype)


def _adapter_specs(spec: str) -> tuple[str, str]:
    """The einsums of x a and (x a) b for a weight einsum "x,w->out" whose weight lists its input axes first."""
    inputs, out = spec.split("->")
    x, w = inputs.split(",")
    w_in = "".join(c for c in w if c in x)
    w_out = "".join(c for c in w if c not in x)
    if w != w_in + w_out:
        raise ValueError(f"{spec}: the weight's input axes must come before its output axes")
    rows = "".join(c for c in x if c not in w_in)
    r = next(c for c in "zyxwvutsrqponmlkjihgfedcba" if c not in spec)
    return f"{x},{w_in}{r}->{rows}{r}", f"{rows}{r},{r}{w_out}->{out}"


def einsum(spec: str, x: jax.Array, w: Any) -> jax.Array:
    """jnp.einsum(spec, x, w) for a plain weight; x W + scale (x a) b for a LoraWeight (W + scale a b never formed)."""
    if not isinstance(w, LoraWeight):
        return jnp.einsum(spec, x, w)
    spec_a, spec_b = _adapter_specs(spec)
    low = jnp.einsum(spec_a, w.drop(x), w.a)
    return jnp.einsum(spec, x, w.base) + jnp.einsum(spec_b, low, w.b) * jnp.asarray(w.scale, low.dtype)


# ---------------------------------------------------------------- the adapters as params


def _layers_shape(base_layers: dict, name: str) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    shape = tuple(base_layers[name].shape)
    n_in = IN_AXES.get(name, 1)
    return shape[1: 1 + n_in], shape[1 + n_in:], shape[0]


def init_adapters(base: dict, spec: LoraSpec, key: jax.Array, dtype=jnp.float32) -> dict:
    """Fresh adapters for `base` (arrays or ShapeDtypeStructs): a ~ U(+-1/sqrt(fan_in)) (PEFT's
    kaiming_uniform_(a=sqrt(5))), b = 0, so the adapted model starts as the base exactly."""
    out = {}
    for i, name in enumerate(spec.weights):
        in_shape, out_shape, layers = _layers_shape(base["layers"], name)
        bound = 1.0 / math.sqrt(math.prod(in_shape))
        a = jax.random.uniform(jax.random.fold_in(key, i), (layers, *in_shape, spec.rank), jnp.float32, -bound, bound)
        out[name] = {"a": a.astype(dtype), "b": jnp.zeros((layers, spec.rank, *out_shape), dtype)}
    return {"layers": out}


def adapter_shardings(adapters: dict, base_shardings: dict) -> dict:
    """Where each adapter lives: a split as its weight's layer + input axes, b as its layer + output axes,
    the rank replicated; so fsdp / tensor meshes split the adapters as they split the base."""
    out = {}
    for name, pair in adapters["layers"].items():
        base = base_shardings["layers"][name]
        base_ndim = len(pair["a"].shape) + len(pair["b"].shape) - 3
        axes = tuple(base.spec) + (None,) * (base_ndim - len(base.spec))
        n_in = IN_AXES.get(name, 1)
        out[name] = {"a": jax.sharding.NamedSharding(base.mesh, jax.sharding.PartitionSpec(*axes[: 1 + n_in], None)),
                     "b": jax.sharding.NamedSharding(base.mesh, jax.sharding.PartitionSpec(axes[0], None,
                                                                                           *axes[1 + n_in:]))}
    return {"layers": out}


def dropout_keys(key: Optional[jax.Array], spec: LoraSpec, layers: int) -> dict:
    """Per adapted weight, one dropout key per layer ({} without dropout or key)."""
    if key is None or spec.dropout == 0:
        return {}
    return {name: jax.random.split(jax.random.fold_in(key, i), layers) for i, name in enumerate(spec.weights)}


def combine(base: dict, adapters: dict, spec: LoraSpec, dropout_key: Optional[jax.Array] = None) -> dict:
    """The decoder's params: `base` with each adapted weight a LoraWeight (nothing is copied or summed).
    dropout_key: training passes under model.lora_dropout > 0."""
    layers = dict(base["layers"])
    keys = dropout_keys(dropout_key, spec, jax.tree.leaves(base["layers"])[0].shape[0])
    for name, pair in adapters["layers"].items():
        layers[name] = LoraWeight(base=layers[name], a=pair["a"], b=pair["b"], key=keys.get(name), scale=spec.scale,
                                  dropout=spec.dropout)
    return {**base, "layers": layers}


def delta(a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """scale * a b [L, *in, *out] in float32: what an adapter adds to its weight."""
    layers, rank = a.shape[0], a.shape[-1]
    flat = jnp.einsum("lir,lro->lio", a.reshape(layers, -1, rank).astype(jnp.float32),
                      b.reshape(layers, rank, -1).astype(jnp.float32))
    return (scale * flat).reshape(a.shape[:-1] + b.shape[2:])


def merge(base: dict, adapters: dict, spec: LoraSpec) -> dict:
    """base + scale * a b for every adapted weight, in the base's dtype (export, `--merge`)."""
    layers = dict(base["layers"])
    for name, pair in adapters["layers"].items():
        w = layers[name]
        layers[name] = (w.astype(jnp.float32) + delta(pair["a"], pair["b"], spec.scale)).astype(w.dtype)
    return {**base, "layers": layers}
