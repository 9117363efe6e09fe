"""Checkpoints on Orbax: the whole train state plus JSON metadata, saved atomically.

A checkpoint is `run_dir/checkpoints/<step>/` holding `state` (params, optimizer
state, step, RNG key, reference params) and `meta` (data iterator position, the
resolved config, metrics so far). Orbax writes each one into a temporary folder
and renames it when complete, so a run killed mid-save leaves the previous
checkpoints untouched and the half-written one is ignored (and cleaned up).
Restoring reads each array straight into the sharding of the abstract state
given, so a run can resume on a different mesh or device count.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from grpo_jax.config import CheckpointConfig, load_config

log = logging.getLogger("grpo_jax.checkpoint")


class CheckpointError(OSError):
    """A checkpoint could not be written or read; the message is one line for the user."""


class Checkpointer:
    def __init__(self, run_dir: str | os.PathLike, cfg: CheckpointConfig):
        self.directory = Path(run_dir).absolute() / "checkpoints"
        policies = [checkpoint_managers.LatestN(cfg.keep)]
        if cfg.keep_best_metric:
            metric = cfg.keep_best_metric
            policies.append(checkpoint_managers.BestN(
                get_metric_fn=lambda metrics: metrics[metric], reverse=cfg.keep_best_mode == "min", n=1,
                keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=cfg.async_save,
            preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
            cleanup_tmp_directories=True,
            create=True,
        )
        try:
            self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))
        except OSError as e:
            raise CheckpointError(f"cannot use checkpoint directory {self.directory}: {e.strerror or e}") from None

    def save(self, step: int, state: Any, meta: dict, metrics: Optional[dict] = None) -> None:
        """Start saving (asynchronously when configured); `wait()` blocks until it is on disk."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        try:
            self.manager.save(step, args=args, metrics=metrics, force=True)
        except OSError as e:
            raise CheckpointError(f"saving checkpoint {step} to {self.directory} failed: {e.strerror or e}; "
                                  "earlier checkpoints are untouched") from None

    def wait(self) -> None:
        try:
            self.manager.wait_until_finished()
        except OSError as e:
            raise CheckpointError(f"writing a checkpoint to {self.directory} failed: {e.strerror or e}; "
                                  "earlier checkpoints are untouched") from None

    def steps(self) -> list[int]:
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def restore_latest(self, abstract_state: Any) -> Optional[tuple[int, Any, dict]]:
        """(step, state, meta) of the newest readable checkpoint, or None when there is none.

        abstract_state: the state's pytree of `jax.ShapeDtypeStruct` with the target
        shardings (e.g. `jax.tree.map(ocp.utils.to_shape_dtype_struct, state)`).
        An unreadable newest checkpoint is reported and the previous one is used.
        """
        for step in reversed(self.steps()):
            try:
                restored = self.restore(step, abstract_state)
            except Exception as e:  # noqa: BLE001 - any corruption means: try the previous one
                reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
                log.warning("checkpoint %d in %s is unreadable (%s); falling back to the previous one",
                            step, self.directory, reason)
                print(f"warning: checkpoint {step} is unreadable ({reason}); falling back to the previous one")
                continue
            return (step, *restored)
        return None

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
        restored = self.manager.restore(step, args=args)
        return restored["state"], restored["meta"]

    def read(self, step: int) -> tuple[Any, dict]:
        """(state as saved, as nested dicts of arrays on the default device; meta), with no target state.

        The target is built from the checkpoint's shapes, so a checkpoint written by several
        processes (a device topology this process does not have) reads here too.
        """
        saved = ocp.StandardCheckpointHandler().metadata(self.directory / str(step) / "state")
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
        restored = self.manager.restore(step, args=args)
        return restored["state"], restored["meta"]

    def close(self) -> None:
        self.wait()
        self.manager.close()


def abstract_like(state: Any) -> Any:
    """The shape/dtype/sharding skeleton of a state, for `restore_latest`."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


def checkpoint_params(run_dir: str | os.PathLike, step: Optional[int] = None, best: bool = False) -> tuple[Any, int]:
    """The policy params saved in a training run's checkpoint: the newest, a given step, or the best.

    "Best" is by the run's checkpoint.keep_best_metric over the evaluations it recorded
    (checkpoint.keep_best_mode says whether higher or lower wins).
    """
    run_dir = Path(run_dir)
    if not (run_dir / "checkpoints").is_dir():
        raise ValueError(f"{run_dir} is not a training run directory (no checkpoints/ inside)")
    cfg = load_config(run_dir / "config.yaml") if (run_dir / "config.yaml").exists() else None
    ckpt = Checkpointer(run_dir, cfg.checkpoint if cfg else CheckpointConfig())
    steps = ckpt.steps()
    if not steps:
        raise ValueError(f"{run_dir}: no complete checkpoint to read")
    if best:
        metric = cfg.checkpoint.keep_best_metric if cfg else None
        if not metric:
            raise ValueError(f"{run_dir}: --best needs checkpoint.keep_best_metric in the run's config")
        _, meta = ckpt.read(steps[-1])
        scored = [(e["step"], e[metric]) for e in meta.get("eval_history", [])
                  if e.get("step") in steps and e.get(metric) is not None]
        if not scored:
            raise ValueError(f"{run_dir}: no checkpoint has a recorded {metric}")
        pick = max if cfg.checkpoint.keep_best_mode == "max" else min
        step = pick(scored, key=lambda item: item[1])[0]
    elif step is None:
        step = steps[-1]
    elif step not in steps:
        raise ValueError(f"{run_dir}: no checkpoint for step {step}; have {steps}")
    state, _ = ckpt.read(step)
    ckpt.close()
    return state["params"], step
