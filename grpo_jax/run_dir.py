"""A run dir belongs to one run: its lock, its identity (the saved config), and where a new run goes.

    run_dir/
      config.yaml        the resolved config: the run's identity (config.RESUMABLE_KEYS may change on resume)
      config.<step>.yaml the config a run had before `run.resume=override` resumed it at <step>
      run.lock           host, pid and start time of the process using the dir
      metrics.jsonl      one row per logged step; samples.jsonl: a few completions per step
      checkpoints/<step> Orbax checkpoints with their sha256sums.txt (checkpoint.py);
                         corrupt-<step>: a checkpoint that failed its checks, set aside

The lock is an `flock` on run.lock: the kernel frees it when its process dies (kill -9 included),
so a lock whose holder is gone is taken over with a note. A second process on the same dir gets
one line naming the first.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import NamedTuple, Optional

from grpo_jax import distributed
from grpo_jax.config import Config, ConfigError, identity_changes, load_config, save_config

LOCK_FILE = "run.lock"
CONFIG_FILE = "config.yaml"


class RunDirInUse(OSError):
    """Another live process holds the run dir's lock; the message names it."""


class RunLock:
    """The run dir's lock file, held (flock) from `acquire` to `release` or the process's end."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: Optional[int] = None

    def acquire(self) -> Optional[str]:
        """Take the lock; returns a note when it takes over a stale one. Raises RunDirInUse when held."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ConfigError(f"cannot write to run.output_dir {self.path.parent}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunDirInUse(f"{self.path.parent} is in use by {_describe(holder)} (lock {self.path}); wait for it "
                              "to end, stop it, or give this run another run.output_dir") from None
        except OSError:  # a file system without flock (some network mounts): the holder's pid decides
            holder = _read_holder(fd)
            if holder and holder.get("host") == socket.gethostname() and _alive(holder.get("pid")):
                os.close(fd)
                raise RunDirInUse(f"{self.path.parent} is in use by {_describe(holder)} (lock {self.path})") from None
        previous = _read_holder(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                  "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        if previous:  # a clean release empties the file: what is left is a holder that died
            return f"note: took over the lock of {_describe(previous)}, which ended without releasing it"
        return None

    def release(self) -> None:
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (ValueError, OSError):
        return {}


def _describe(holder: dict) -> str:
    if not holder:
        return "another process"
    return f"pid {holder.get('pid')} on {holder.get('host')} (since {holder.get('started')})"


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def checkpoint_steps(run_dir: str | os.PathLike) -> list[int]:
    """The steps of the complete checkpoints in a run dir (names only; nothing is opened)."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())


class Claim(NamedTuple):
    """What `claim` decided: the config to train with, lines to print, and (override) where the old config goes."""

    cfg: Config
    lines: list[str]
    keep_previous_as: Optional[Path] = None


def claim(cfg: Config) -> Claim:
    """The config this run trains with, after checking it against the run dir's saved one.

    A dir without checkpoints takes any config. Otherwise a changed identity setting refuses with
    the differences (run.resume=auto), resumes anyway keeping the old config beside it (override:
    `record_config` does it once the checkpoint has restored), or moves the run to the first free
    `<output_dir>-N` (new_dir). Nothing is written here. Every process of a multi-process run calls
    it and reaches the same answer.
    """
    run_dir = Path(cfg.run.output_dir)
    saved_path = run_dir / CONFIG_FILE
    steps = checkpoint_steps(run_dir)
    if not saved_path.exists() or not steps:
        return Claim(cfg, [])
    if cfg.run.resume == "new_dir":
        fresh = _free_sibling(run_dir)
        return Claim(dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, output_dir=str(fresh))), [
            f"run.resume=new_dir: {run_dir} holds a run (checkpoints up to step {steps[-1]}); "
            f"this one starts afresh in {fresh}"])
    try:
        saved = load_config(saved_path)
    except ConfigError as e:
        raise ConfigError(f"{saved_path} (the run dir's saved config) does not load: {e}; "
                          "run.resume=new_dir starts afresh beside it") from None
    changes = identity_changes(saved, cfg)
    if not changes:
        return Claim(cfg, [])
    if cfg.run.resume == "override":
        kept = run_dir / f"config.{steps[-1]}.yaml"
        return Claim(cfg, [f"run.resume=override: resuming {run_dir} under changed settings "
                           f"({'; '.join(changes)}); the previous config is kept as {kept.name}"], kept)
    raise ConfigError(
        f"{run_dir} holds a run (checkpoints up to step {steps[-1]}) with other settings: {'; '.join(changes)}. "
        "Nothing was touched: re-run with its settings to resume it, or set run.resume=override (resume it "
        "under the new ones) or run.resume=new_dir (start afresh in a new dir)")


def record_config(claimed: Claim) -> str:
    """Write the run's config.yaml (process 0), once its checkpoint has restored; under override the
    old one is first renamed to config.<step>.yaml. Returns the path written."""
    run_dir = Path(claimed.cfg.run.output_dir)
    if claimed.keep_previous_as is not None:
        os.replace(run_dir / CONFIG_FILE, claimed.keep_previous_as)
    try:
        return save_config(claimed.cfg, run_dir)
    except OSError as e:
        raise ConfigError(f"cannot write to run.output_dir {run_dir}: {e.strerror or e}") from None


def _free_sibling(run_dir: Path) -> Path:
    """The first `<run_dir>-N` (N = 2, 3, ...) with no run in it; process 0's choice, for every process."""
    n = 2
    if distributed.is_main():
        while (run_dir.parent / f"{run_dir.name}-{n}" / CONFIG_FILE).exists():
            n += 1
    return run_dir.parent / f"{run_dir.name}-{distributed.global_max(n)}"


def write_json(path: str | os.PathLike, value: dict) -> None:
    """Write a JSON file whole or not at all (a temporary file, then a rename): progress and stage records."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=2))
    os.replace(tmp, path)
