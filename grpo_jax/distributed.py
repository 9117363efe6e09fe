"""Multi-process (multi-host) runs: start `jax.distributed`, and move batches between host and mesh.

One process runs per host (per TPU VM worker, per GPU node, or per GPU under
SLURM); all processes execute the same program on one global mesh. Call
:func:`initialize` first, before anything touches a JAX device:

    from grpo_jax import distributed
    process_index, process_count = distributed.initialize(cfg.mesh)

Where the coordinates come from, first match wins:

1. the config: ``mesh.coordinator_address``, ``mesh.num_processes``, ``mesh.process_id``;
2. environment variables ``GRPO_JAX_COORDINATOR`` (``host:port`` of process 0),
   ``GRPO_JAX_NUM_PROCESSES`` and ``GRPO_JAX_PROCESS_ID`` (and JAX's own
   ``JAX_COORDINATOR_ADDRESS`` for the address);
3. JAX's cluster auto-detection, used only when a cluster is detected: Cloud TPU
   VMs and GKE TPU pods (the metadata server / ``TPU_WORKER_HOSTNAMES``), SLURM
   (``SLURM_JOB_ID``, ``SLURM_STEP_NODELIST``, ``SLURM_NTASKS``, ``SLURM_PROCID``,
   ``SLURM_LOCALID``; one process per GPU), Open MPI (``OMPI_MCA_orte_hnp_uri``)
   and Kubernetes (``KUBERNETES_SERVICE_HOST`` with the ``kubernetes`` package).
   ``JAX_COORDINATOR_PORT``, ``JAX_LOCAL_DEVICE_IDS`` and
   ``JAX_COORDINATOR_BIND_ADDRESS`` are read by JAX itself.

With none of these, or with one process, the run is single-process and
:func:`initialize` does nothing. Calling it again is harmless.

Failure detection: a process that dies stops sending heartbeats; after
``GRPO_JAX_HEARTBEAT_TIMEOUT`` seconds (default 100) the coordination service
marks it dead and the other processes abort with an error naming the distributed
service, instead of blocking forever in the next collective. Processes that are
never reached fail after ``GRPO_JAX_INIT_TIMEOUT`` seconds (default 300).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import traceback
from typing import Any, Optional

import jax
import numpy as np

from grpo_jax import sharding as shd

log = logging.getLogger("grpo_jax.distributed")

ENV_COORDINATOR = "GRPO_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "GRPO_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "GRPO_JAX_PROCESS_ID"
ENV_INIT_TIMEOUT = "GRPO_JAX_INIT_TIMEOUT"
ENV_HEARTBEAT_TIMEOUT = "GRPO_JAX_HEARTBEAT_TIMEOUT"
ENV_SHUTDOWN_TIMEOUT = "GRPO_JAX_SHUTDOWN_TIMEOUT"

DEFAULT_INIT_TIMEOUT = 300
DEFAULT_HEARTBEAT_TIMEOUT = 100
DEFAULT_SHUTDOWN_TIMEOUT = 300


@dataclasses.dataclass(frozen=True)
class Coordinates:
    """Where this process sits in a multi-process run (fields None: not given, left to auto-detection)."""

    coordinator_address: Optional[str] = None
    num_processes: Optional[int] = None
    process_id: Optional[int] = None
    source: str = "none"  # "config", "env", "cluster:<name>", "none"

    @property
    def explicit(self) -> bool:
        return None not in (self.coordinator_address, self.num_processes, self.process_id)


def _int_env(name: str, env) -> Optional[int]:
    value = env.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} must be an integer") from None


def detect_cluster() -> Optional[str]:
    """Name of the cluster environment JAX would auto-detect (e.g. 'GceTpuCluster', 'SlurmCluster'), or None.

    Uses JAX's own cluster registry, so it agrees with `jax.distributed.initialize()`
    without arguments. On a machine without TPUs the TPU probes cost nothing (JAX
    sets TPU_SKIP_MDS_QUERY at import when no TPU chip is on the PCI bus).
    """
    try:
        from jax._src.clusters import ClusterEnv
    except ImportError:  # pragma: no cover - private module moved
        return None
    for env in ClusterEnv._cluster_types:
        if getattr(env, "opt_in_only_method", False):
            continue
        try:
            if env.is_env_present():
                return env.__name__
        except Exception as e:  # a probe that fails means "not this cluster"
            log.debug("cluster probe %s failed: %s", env.__name__, e)
    return None


def resolve(mesh_cfg: Any = None, env=None) -> Coordinates:
    """Coordinates from the config, else the environment, else cluster detection (see the module doc).

    Raises ValueError when the values given are incomplete or inconsistent.
    """
    env = os.environ if env is None else env
    fields = ("coordinator_address", "num_processes", "process_id")
    from_cfg = {f: getattr(mesh_cfg, f, None) for f in fields}
    from_env = {
        "coordinator_address": env.get(ENV_COORDINATOR) or env.get("JAX_COORDINATOR_ADDRESS") or None,
        "num_processes": _int_env(ENV_NUM_PROCESSES, env),
        "process_id": _int_env(ENV_PROCESS_ID, env),
    }
    merged = {f: from_cfg[f] if from_cfg[f] is not None else from_env[f] for f in fields}
    if any(v is not None for v in from_cfg.values()):
        source = "config"
    elif any(v is not None for v in from_env.values()):
        source = "env"
    else:
        source = "none"
    n, pid = merged["num_processes"], merged["process_id"]
    if n is not None and n < 1:
        raise ValueError(f"num_processes={n} must be >= 1")
    if pid is not None and n is not None and not 0 <= pid < n:
        raise ValueError(f"process_id={pid} must be in [0, num_processes={n})")
    coords = Coordinates(**merged, source=source)
    if coords.explicit or n == 1:
        return coords
    cluster = detect_cluster()
    if cluster is not None:
        return dataclasses.replace(coords, source=f"cluster:{cluster}")
    if source != "none":
        missing = [f for f in fields if merged[f] is None]
        names = {"coordinator_address": f"mesh.coordinator_address / {ENV_COORDINATOR}",
                 "num_processes": f"mesh.num_processes / {ENV_NUM_PROCESSES}",
                 "process_id": f"mesh.process_id / {ENV_PROCESS_ID}"}
        raise ValueError("multi-process run is missing " + ", ".join(names[m] for m in missing)
                         + " (no TPU / SLURM / MPI cluster detected to fill them in)")
    return coords


def timeouts(env=None) -> dict[str, int]:
    """Keyword arguments of `jax.distributed.initialize` for the failure timeouts (seconds)."""
    env = os.environ if env is None else env
    pick = lambda name, default: _int_env(name, env) or default  # noqa: E731
    return {
        "initialization_timeout": pick(ENV_INIT_TIMEOUT, DEFAULT_INIT_TIMEOUT),
        "heartbeat_timeout_seconds": pick(ENV_HEARTBEAT_TIMEOUT, DEFAULT_HEARTBEAT_TIMEOUT),
        "shutdown_timeout_seconds": pick(ENV_SHUTDOWN_TIMEOUT, DEFAULT_SHUTDOWN_TIMEOUT),
    }


def is_initialized() -> bool:
    return jax.distributed.is_initialized()


def initialize(mesh_cfg: Any = None, *, initialization_timeout: Optional[int] = None,
               heartbeat_timeout_seconds: Optional[int] = None,
               shutdown_timeout_seconds: Optional[int] = None) -> tuple[int, int]:
    """Join the multi-process run, if this is one. Returns (process_index, process_count).

    mesh_cfg: a `grpo_jax.config.MeshConfig` (or anything with coordinator_address,
    num_processes, process_id), or None to use the environment only. Must run
    before the first JAX computation; a no-op for single-process runs and when
    `jax.distributed` is already initialized. Timeouts default to the
    GRPO_JAX_*_TIMEOUT environment variables, else JAX's defaults.
    """
    if is_initialized():
        return jax.process_index(), jax.process_count()
    coords = resolve(mesh_cfg)
    if coords.source == "none" or coords.num_processes == 1:
        # single process: nothing to join. Don't touch the backend here (that is the caller's first jax call).
        return 0, 1
    kwargs = timeouts()
    for key, value in (("initialization_timeout", initialization_timeout),
                       ("heartbeat_timeout_seconds", heartbeat_timeout_seconds),
                       ("shutdown_timeout_seconds", shutdown_timeout_seconds)):
        if value is not None:
            kwargs[key] = int(value)
    log.info("joining a %s-process run as process %s via %s (coordinator %s, source %s)",
             coords.num_processes or "auto", coords.process_id if coords.process_id is not None else "auto",
             "jax.distributed", coords.coordinator_address or "auto", coords.source)
    _cpu_collectives_over_gloo()
    try:
        jax.distributed.initialize(coordinator_address=coords.coordinator_address,
                                   num_processes=coords.num_processes, process_id=coords.process_id, **kwargs)
    except RuntimeError as e:
        if "already initialized" in str(e) or "should only be called once" in str(e):
            raise RuntimeError("jax.distributed.initialize must run before any JAX computation: call "
                               "grpo_jax.distributed.initialize() first thing in the program") from e
        raise
    return jax.process_index(), jax.process_count()


def _cpu_collectives_over_gloo() -> None:
    """CPU devices of different processes talk over Gloo (JAX's default since 0.5; set in case it is 'none')."""
    try:
        if jax.config.jax_cpu_collectives_implementation in (None, "none"):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except AttributeError:  # pragma: no cover - option renamed
        pass


def shutdown() -> None:
    """Leave the run cleanly (all processes should call it; exiting the program does it too)."""
    if is_initialized():
        jax.distributed.shutdown()


def is_main() -> bool:
    """True on process 0: the one that prints, writes plots and owns the run dir."""
    return jax.process_index() == 0


def setup_mesh(mesh_cfg: Any) -> jax.sharding.Mesh:
    """Join the multi-process run (if this is one), then the config's mesh over every process's devices.

    Each process feeds its own rows of every batch, so the data-parallel axes must split over them."""
    initialize(mesh_cfg)
    mesh = shd.make_mesh(mesh_cfg)
    processes, dp = jax.process_count(), shd.data_parallel_size(mesh)
    if dp % processes:
        raise ValueError(f"mesh data x fsdp = {dp} must be a multiple of the {processes} processes: each "
                         "process feeds its own rows of the batch")
    return mesh


def exit_now(error: BaseException) -> None:
    """Multi-process: a process that fails leaves at once, without the shutdown barrier at exit.

    Its peers then see it gone (a failed collective, or missed heartbeats) and stop
    too, instead of waiting for it in the next collective.
    """
    traceback.print_exception(error)
    print(f"process {jax.process_index()} of {jax.process_count()} failed ({type(error).__name__}: "
          f"{str(error).splitlines()[0] if str(error) else ''}); exiting so that the other processes stop too",
          file=sys.stderr, flush=True)
    os._exit(1)


# ---------------------------------------------------------------- host <-> global arrays


def _leaf_sharding(mesh, x):
    """Rows over data x fsdp; replicated for scalars, and (single-process only) for rows that do not divide."""
    if not np.ndim(x):
        return shd.replicated(mesh)
    rows, dp = np.shape(x)[0] * jax.process_count(), shd.data_parallel_size(mesh)
    if rows % dp == 0:
        return shd.batch_sharding(mesh, np.ndim(x))
    if jax.process_count() == 1:
        return shd.replicated(mesh)
    raise ValueError(f"a batch of {rows} rows does not split over the mesh's data x fsdp = {dp} devices; in a "
                     "multi-process run data.batch_size x rollout.group_size must divide by mesh.data x mesh.fsdp")


def global_batch(local, sharding, global_shape=None):
    """Assemble a global array (or a pytree of them) from each process's local rows.

    local: this process's rows, numpy or array (or a pytree of them); every process
    passes the same number of rows, in process order (process i holds rows
    i*n .. i*n+n-1 of the global batch, the layout `grpo_jax.data.batches` yields).
    sharding: a `jax.sharding.Sharding` (or a pytree of them matching `local`), or a
    Mesh: rows split over the batch axes (data x fsdp), scalars replicated (and,
    single-process, rows that do not divide over those axes).
    global_shape: only needed for non-even layouts; default: inferred.
    Single-process, this is a device_put.
    """
    if isinstance(sharding, jax.sharding.Mesh):
        shardings = jax.tree.map(lambda x: _leaf_sharding(sharding, x), local)
    elif isinstance(sharding, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda x: sharding, local)
    else:
        shardings = sharding

    def put(x, sh):
        x = np.asarray(x)
        if sh.is_fully_addressable:
            return jax.device_put(x, sh)
        if x.ndim == 0 or (global_shape is None and sh.is_fully_replicated):
            return jax.make_array_from_process_local_data(sh, x, x.shape)
        return jax.make_array_from_process_local_data(sh, x, global_shape)

    return jax.tree.map(put, local, shardings)


def local_rows(x) -> np.ndarray:
    """This process's rows of a global array, as numpy (the rows it fed in with `global_batch`).

    The rows are those of the addressable shards, in order, duplicates from
    replication removed. A fully addressable (single-process) array is returned whole;
    a replicated array returns all rows on every process.
    """
    if not isinstance(x, jax.Array):
        return np.asarray(x)
    if x.is_fully_addressable or x.sharding.is_fully_replicated:
        return np.asarray(x)
    pieces: dict[tuple[int, int], np.ndarray] = {}
    for shard in x.addressable_shards:
        index = shard.index
        rows = index[0] if index else slice(None)
        start, stop, _ = rows.indices(x.shape[0]) if x.ndim else (0, 0, 1)
        for dim, s in enumerate(index[1:], start=1):
            lo, hi, _ = s.indices(x.shape[dim])
            if (lo, hi) != (0, x.shape[dim]):
                raise ValueError(f"local_rows: array of shape {x.shape} is split over dim {dim} across processes; "
                                 "only the row axis may be (reshard it first)")
        if (start, stop) not in pieces:
            pieces[(start, stop)] = np.asarray(shard.data)
    ordered = sorted(pieces.items())
    out = [ordered[0][1]]
    end = ordered[0][0][1]
    for (start, stop), data in ordered[1:]:
        if start < end:  # overlapping pieces (uneven replication): keep the new part only
            data = data[end - start:]
        out.append(data)
        end = max(end, stop)
    return np.concatenate(out, axis=0)


def local_row_range(x) -> tuple[int, int]:
    """[start, stop) of this process's rows in the global array (contiguous under `global_batch`)."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.sharding.is_fully_replicated:
        return 0, int(np.shape(x)[0])
    spans = [s.index[0].indices(x.shape[0])[:2] for s in x.addressable_shards]
    return min(a for a, _ in spans), max(b for _, b in spans)


def sync(name: str = "grpo_jax") -> None:
    """Barrier across all processes (no-op single-process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def allgather_rows(x) -> np.ndarray:
    """Every process's rows of a host array, concatenated in process order (for metrics; same shape everywhere)."""
    x = np.asarray(x)
    if jax.process_count() == 1:
        return x
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def allgather_scalars(values: dict) -> dict[str, np.ndarray]:
    """{name: every process's value of it, in process order} (every process passes the same names)."""
    names = sorted(values)
    table = allgather_rows(np.asarray([[values[n] for n in names]], np.float64))
    return {n: table[:, i] for i, n in enumerate(names)}


def global_max(value: int) -> int:
    """The largest of every process's value (e.g. a prompt length all processes must pad to)."""
    if jax.process_count() == 1:
        return int(value)
    return int(allgather_rows(np.asarray([value], np.int64)).max())


def any_process(flag: bool) -> bool:
    """True on every process when it is True on any (e.g. a stop signal that reached one host)."""
    if jax.process_count() == 1:
        return bool(flag)
    return bool(allgather_rows(np.asarray([flag], np.int32)).any())
