"""Checkpoints on Orbax: the whole train state plus JSON metadata, saved atomically and checked on restore.

A checkpoint is `run_dir/checkpoints/<step>/` holding `state` (params, optimizer
state, step, RNG key, reference params), `meta` (data iterator position, the
resolved config, metrics so far) and `sha256sums.txt` (each file's SHA-256,
recorded when the checkpoint commits; `sha256sum -c` reads it). Orbax writes each
one into a temporary folder and renames it when complete, so a run killed
mid-save leaves the previous checkpoints untouched and the half-written one is
ignored (and cleaned up). Saving a step that already exists moves the old one to
`replaced-<step>` first and deletes it once the new one commits (a kill in
between puts it back). Restoring verifies the sums and the state's structure;
a checkpoint that fails is set aside as `corrupt-<step>` and the previous one is
used. Arrays are read straight into the sharding of the abstract state given, so
a run can resume on a different mesh or device count.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any, NamedTuple, Optional

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from grpo_jax import distributed
from grpo_jax.config import CheckpointConfig, load_config

SUMS_FILE = "sha256sums.txt"


class CheckpointError(OSError):
    """A checkpoint could not be written or read; the message is one line for the user."""


class Restored(NamedTuple):
    step: int
    state: Any
    meta: dict


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


class Checkpointer:
    def __init__(self, run_dir: str | os.PathLike, cfg: CheckpointConfig, read_only: bool = False):
        self.directory = Path(run_dir).absolute() / "checkpoints"
        self.async_save = cfg.async_save
        self._pending: list[int] = []  # steps saved whose sums are not yet written, oldest first
        policies = [checkpoint_managers.LatestN(cfg.keep)]
        if cfg.keep_best_metric:
            metric = cfg.keep_best_metric
            policies.append(checkpoint_managers.BestN(
                get_metric_fn=lambda metrics: metrics[metric], reverse=cfg.keep_best_mode == "min", n=1,
                keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=cfg.async_save,
            async_options=ocp.AsyncOptions(timeout_secs=cfg.save_timeout_s),
            preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
            cleanup_tmp_directories=not read_only,
            create=not read_only,
            read_only=read_only,
        )
        try:
            if not read_only:
                self._recover_replaced()
            self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))
        except OSError as e:
            raise CheckpointError(f"cannot use checkpoint directory {self.directory}: {e.strerror or e}") from None

    # ------------------------------------------------------------ saving

    def save(self, step: int, state: Any, meta: dict, metrics: Optional[dict] = None) -> None:
        """Start saving (asynchronously when configured); `wait()` blocks until it is on disk.

        A failure of this save or of an earlier asynchronous one raises CheckpointError."""
        self.wait()  # Orbax saves one at a time; a failure of the previous one surfaces here
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        try:
            if step in self.manager.all_steps():  # the manager's own list: the same answer on every process
                self._set_aside(step, "replaced")
            self._pending.append(step)
            self.manager.save(step, args=args, metrics=metrics, force=True)
        except Exception as e:  # noqa: BLE001 - Orbax and tensorstore raise many types; one line each
            raise self._save_failed(step, e) from None
        if not self.async_save:
            self._committed()

    def check(self) -> None:
        """Raise CheckpointError if a background save has failed; record the sums of one that committed."""
        try:
            self.manager.check_for_errors()
        except Exception as e:  # noqa: BLE001
            raise self._save_failed(self._pending[0] if self._pending else None, e) from None
        if self._pending and not self.manager.is_saving_in_progress():
            self.wait()  # finished: its error surfaces here, else its sums are recorded

    def wait(self) -> None:
        """Block until the save in progress is on disk (at most checkpoint.save_timeout_s), then record its sums."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise self._save_failed(self._pending[0] if self._pending else None, e) from None
        self._committed()

    def _save_failed(self, step: Optional[int], e: BaseException) -> CheckpointError:
        self._pending.clear()
        intact = ", ".join(map(str, self.steps(quiet=True))) or "none"
        what = f"saving checkpoint {step}" if step is not None else "writing a checkpoint"
        return CheckpointError(f"{what} to {self.directory} failed: {_first_line(e)}; the run stops here. "
                               f"Checkpoints intact: {intact} (earlier checkpoints are untouched)")

    def _committed(self) -> None:
        """The saves started have committed: record their sums, drop the copies they replaced."""
        steps, self._pending = self._pending, []
        if not distributed.is_main():
            return
        for step in steps:
            folder = self.directory / str(step)
            if folder.is_dir():  # else already deleted by keep-last
                write_sums(folder)
            shutil.rmtree(self.directory / f"replaced-{step}", ignore_errors=True)

    def _set_aside(self, step: int, kind: str) -> Path:
        """Move checkpoint `step` to `<kind>-<step>` (a rename: atomic, nothing copied)."""
        target, n = self.directory / f"{kind}-{step}", 2
        if distributed.is_main():
            if kind == "replaced":  # a stale copy from an earlier replacement
                shutil.rmtree(target, ignore_errors=True)
            while target.exists():
                target, n = self.directory / f"{kind}-{step}-{n}", n + 1
            os.replace(self.directory / str(step), target)
        distributed.sync(f"grpo_jax_set_aside_{kind}_{step}")
        self.manager.reload()
        return target

    def _recover_replaced(self) -> None:
        """A kill between setting a checkpoint aside for replacement and the new one's commit: put it back."""
        if not self.directory.is_dir() or not distributed.is_main():
            return
        for old in self.directory.glob("replaced-*"):
            step = old.name.split("-", 1)[1]
            if (self.directory / step).is_dir():
                shutil.rmtree(old)
            else:
                os.replace(old, self.directory / step)
                print(f"note: checkpoint {step} was being replaced when the run stopped; the previous copy is back")

    # ------------------------------------------------------------ reading

    def steps(self, quiet: bool = False) -> list[int]:
        try:
            self.manager.reload()
            return sorted(self.manager.all_steps())
        except Exception:  # noqa: BLE001
            if quiet:
                return []
            raise

    def restore_latest(self, abstract_state: Any) -> Optional[Restored]:
        """The newest valid checkpoint, or None when there is none.

        abstract_state: the state's pytree of `jax.ShapeDtypeStruct` with the target shardings
        (`abstract_like(state)`). A checkpoint whose files fail their sums or do not read is set
        aside as corrupt-<step> and the previous one is used; one whose state does not match
        `abstract_state` raises CheckpointError (a changed config, not a damaged file). With
        checkpoints present and none valid it raises too: starting over is the user's call.
        """
        bad = []
        for step in reversed(self.steps()):
            self.check_structure(step, abstract_state)
            try:
                verify_sums(self.directory / str(step))
                state, meta = self.restore(step, abstract_state)
            except Exception as e:  # noqa: BLE001 - any damage means: try the previous one
                bad.append((step, _first_line(e)))
                continue
            for bad_step, reason in bad:
                moved = self._set_aside(bad_step, "corrupt")
                print(f"warning: checkpoint {bad_step} is damaged ({reason}); moved it to {moved.name}/ "
                      f"and resumed from checkpoint {step}", flush=True)
            return Restored(step, state, meta)
        if bad:
            listed = "; ".join(f"{s}: {r}" for s, r in bad)
            raise CheckpointError(f"no checkpoint in {self.directory} is readable ({listed}); they are left as they "
                                  "are. Start afresh with run.resume=new_dir (or move the run dir away)")
        return None

    def check_structure(self, step: int, abstract_state: Any) -> None:
        """Raise CheckpointError when checkpoint `step` holds another state than `abstract_state`'s."""
        try:
            saved = ocp.StandardCheckpointHandler().metadata(self.directory / str(step) / "state")
        except Exception:  # noqa: BLE001 - unreadable metadata is damage, found by the restore
            return
        have, want = _leaf_shapes(saved), _leaf_shapes(abstract_state)
        if have == want:
            return
        missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
        changed = sorted(k for k in set(have) & set(want) if have[k] != want[k])
        detail = (f"this run needs {missing[0]}" if missing else f"it has {extra[0]}, which this run does not"
                  if extra else f"{changed[0]} is {have[changed[0]]} there, {want[changed[0]]} here")
        raise CheckpointError(f"checkpoint {step} in {self.directory} holds another kind of train state ({detail}): "
                              "a setting that shapes the state (grpo.beta on/off, optim.optimizer, the model) "
                              "differs from the run that saved it; set run.resume=new_dir to start afresh")

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
        restored = self.manager.restore(step, args=args)
        return restored["state"], restored["meta"]

    def read(self, step: int) -> tuple[Any, dict]:
        """(state as saved, as nested dicts of arrays on the default device; meta), with no target state.

        The target is built from the checkpoint's shapes, so a checkpoint written by several
        processes (a device topology this process does not have) reads here too.
        """
        verify_sums(self.directory / str(step))
        saved = ocp.StandardCheckpointHandler().metadata(self.directory / str(step) / "state")
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
        restored = self.manager.restore(step, args=args)
        return restored["state"], restored["meta"]

    def read_meta(self, step: int) -> dict:
        """Checkpoint `step`'s JSON metadata alone (no arrays are read)."""
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def read_newest_valid(self, steps: list[int]) -> tuple[int, Any, dict]:
        """`read` of the newest of `steps` that reads, warning in one line about each one passed over."""
        for step in reversed(steps):
            try:
                return (step, *self.read(step))
            except Exception as e:  # noqa: BLE001
                print(f"warning: checkpoint {step} in {self.directory} is damaged ({_first_line(e)}); "
                      "trying the previous one", flush=True)
        raise CheckpointError(f"no checkpoint in {self.directory} is readable")

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()


def _leaf_shapes(tree: Any) -> dict[str, tuple]:
    """{"params/layers/wq": ((shape), "dtype")} of a state or of a checkpoint's metadata, comparable."""
    leaves = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
        leaves[name] = (tuple(leaf.shape), str(leaf.dtype))
    return leaves


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def write_sums(folder: Path) -> None:
    """`sha256sums.txt` of every file under a committed checkpoint (written atomically)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != SUMS_FILE)
    text = "".join(f"{_sha256(p)}  {p.relative_to(folder)}\n" for p in files)
    tmp = folder / f".{SUMS_FILE}.tmp"
    tmp.write_text(text)
    os.replace(tmp, folder / SUMS_FILE)


def verify_sums(folder: Path) -> None:
    """Raise CheckpointError naming the first file whose SHA-256 differs from the one recorded at commit.

    A checkpoint without sums (written before they were recorded, or killed between its commit and
    the sums) is read unverified."""
    sums = folder / SUMS_FILE
    if not sums.exists():
        return
    for line in sums.read_text().splitlines():
        expected, _, name = line.partition("  ")
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{name} is missing")
        if _sha256(path) != expected:
            raise CheckpointError(f"{name} does not match its SHA-256")


def abstract_like(state: Any) -> Any:
    """The shape/dtype/sharding skeleton of a state, for `restore_latest`."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


def checkpoint_params(run_dir: str | os.PathLike, step: Optional[int] = None, best: bool = False,
                      part: str = "params") -> tuple[Any, int]:
    """The policy params saved in a training run's checkpoint: the newest, a given step, or the best;
    part="critic_params": a PPO run's critic instead.

    "Best" is by the run's checkpoint.keep_best_metric over the evaluations it recorded
    (checkpoint.keep_best_mode says whether higher or lower wins).
    """
    run_dir = Path(run_dir)
    if not (run_dir / "checkpoints").is_dir():
        raise ValueError(f"{run_dir} is not a training run directory (no checkpoints/ inside)")
    cfg = load_config(run_dir / "config.yaml") if (run_dir / "config.yaml").exists() else None
    ckpt = Checkpointer(run_dir, cfg.checkpoint if cfg else CheckpointConfig(), read_only=True)
    steps = ckpt.steps()
    if not steps:
        raise ValueError(f"{run_dir}: no complete checkpoint to read")
    if best:
        metric = cfg.checkpoint.keep_best_metric if cfg else None
        if not metric:
            raise ValueError(f"{run_dir}: --best needs checkpoint.keep_best_metric in the run's config")
        meta = ckpt.read_meta(steps[-1])
        scored = [(e["step"], e[metric]) for e in meta.get("eval_history", [])
                  if e.get("step") in steps and e.get(metric) is not None]
        if not scored:
            raise ValueError(f"{run_dir}: no checkpoint has a recorded {metric}")
        pick = max if cfg.checkpoint.keep_best_mode == "max" else min
        step = pick(scored, key=lambda item: item[1])[0]
    if step is None and not best:
        step, state, _ = ckpt.read_newest_valid(steps)
    elif step not in steps:
        raise ValueError(f"{run_dir}: no checkpoint for step {step}; have {steps}")
    else:
        try:
            state, _ = ckpt.read(step)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"checkpoint {step} in {run_dir} is damaged ({_first_line(e)})") from None
    ckpt.close()
    if state.get(part) is None:
        raise ValueError(f"{run_dir}: checkpoint {step} holds no {part} (a critic is trained by run.algorithm=ppo)")
    return state[part], step
