"""Device meshes and where each array lives on them.

The mesh has three axes: `data` (batch split, params replicated), `fsdp` (batch
split, params and optimizer state split too) and `tensor` (heads and MLP split).
Params carry logical axis names (`embed`, `heads`, `mlp`, ...); a rule table maps
each name onto mesh axes, so a model never names a mesh axis itself.

Axes are `AxisType.Auto`, given explicitly: jit's in/out shardings and
`with_sharding_constraint` steer XLA's partitioner (recent `jax.make_mesh`
defaults to Explicit axes, where those constraints mean something else).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from grpo_jax.config import MeshConfig

log = logging.getLogger("grpo_jax.sharding")

AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")  # the batch dimension is split over both data-parallel axes

# logical name -> mesh axis (or axes, or None = replicated)
DEFAULT_RULES: dict[str, Any] = {
    "batch": BATCH,
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "layers": None,
    "norm": None,
    "cache_len": None,
}


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """Axis sizes with the one -1 resolved to the devices left over."""
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"{num_devices} devices do not split into mesh axes of sizes {sizes}")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = {math.prod(sizes)} devices, "
                         f"but {num_devices} are available; set one axis to -1 to take the rest")
    return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(cfg, len(devices))
    auto = (jax.sharding.AxisType.Auto,) * len(AXES)
    return jax.make_mesh(shape, AXES, axis_types=auto, devices=devices)


def spec_for(names: Sequence[Optional[str]], shape: Sequence[int], mesh: Mesh,
             rules: Mapping[str, Any] = DEFAULT_RULES) -> PartitionSpec:
    """PartitionSpec of an array whose dims have these logical names.

    A dim is left replicated when its size does not divide by the mesh axes it maps
    to, or when those axes are already used by an earlier dim.
    """
    used: set[str] = set()
    spec = []
    for name, size in zip(names, shape):
        target = rules.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a not in used and mesh.shape.get(a, 1) > 1)
        if axes and size % math.prod(mesh.shape[a] for a in axes):
            log.info("dim %s of size %d does not split over %s; replicating it", name, size, axes)
            axes = ()
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Rows split over data x fsdp, everything else replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def data_parallel_size(mesh: Mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in BATCH]))


def train_state_shardings(state, optimizer, param_shardings, mesh: Mesh, critic_optimizer=None,
                          critic_shardings=None):
    """Shardings of a TrainState: optimizer moments follow their params, counters replicated;
    PPO's critic and its optimizer state where `critic_shardings` say."""
    rep = replicated(mesh)

    def moments(opt, opt_state, shardings):
        return optax.tree_map_params(opt, lambda _, sh: sh, opt_state, shardings, transform_non_params=lambda _: rep)

    ref = None if state.ref_params is None else param_shardings
    critic = {}
    if state.critic_params is not None:
        critic = dict(critic_params=critic_shardings,
                      critic_opt_state=moments(critic_optimizer, state.critic_opt_state, critic_shardings))
    return state.replace(step=rep, params=param_shardings, opt_state=moments(optimizer, state.opt_state,
                                                                             param_shardings),
                         rng=rep, ref_params=ref, **critic)


def rows_sharding(x, mesh: Mesh) -> NamedSharding:
    """Split the leading (row) axis over data x fsdp when it divides, else replicate."""
    if getattr(x, "ndim", 0) and x.shape[0] % data_parallel_size(mesh) == 0:
        return batch_sharding(mesh, x.ndim)
    return replicated(mesh)


def pin_rows(tree, mesh: Optional[Mesh]):
    """Inside jit: every array of `tree` constrained to rows split over data x fsdp (`rows_sharding`);
    the tree unchanged without a mesh."""
    if mesh is None:
        return tree
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, rows_sharding(x, mesh)), tree)


def shard_rows(tree, mesh: Mesh):
    """device_put every array of a host batch with its rows split over the data axes."""
    return jax.tree.map(lambda x: jax.device_put(x, rows_sharding(x, mesh)), tree)


def cache_sharding(x, mesh: Mesh, batch_axis: int = 1) -> NamedSharding:
    """Where a leaf of a rollout's KV cache lives: its batch axis split over data x fsdp, and for the
    decoder's [layers, B, kv_heads, slots, head_dim] arrays the kv heads over tensor (each when it divides).

    Leaves with more than batch_axis + 1 dims carry the batch at batch_axis, smaller ones (a slot
    mask [B, S]) first, as `rollout.repeat_batch` reads them; scalars are replicated.
    """
    ndim = getattr(x, "ndim", 0)
    if ndim == 0:
        return replicated(mesh)
    axis = batch_axis if ndim > batch_axis + 1 else 0
    spec: list = [None] * ndim
    if x.shape[axis] % data_parallel_size(mesh) == 0:
        spec[axis] = BATCH
    tensor = mesh.shape["tensor"]
    if ndim == 5 and tensor > 1 and x.shape[axis + 1] % tensor == 0:
        spec[axis + 1] = "tensor"
    return NamedSharding(mesh, PartitionSpec(*spec))
