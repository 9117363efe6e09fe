"""Helpers of the tests that run `python -m launch train` in subprocesses and compare what runs leave behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING = ("time", "time/", "throughput/")  # wall-clock measurements differ between any two runs


def env(**extra) -> dict:
    out = {k: v for k, v in os.environ.items() if k != "GRPO_JAX_DEBUG"}
    return dict(out, PYTHONPATH=ROOT, **extra)


def launch(*args, timeout=600, **env_extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch", *map(str, args)], env=env(**env_extra), cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def final_state(run_dir, step=None):
    """(step, leaves as numpy) of the newest checkpoint (or `step`), read as saved."""
    import jax

    from grpo_jax.checkpoint import Checkpointer
    from grpo_jax.config import CheckpointConfig

    ckpt = Checkpointer(run_dir, CheckpointConfig(), read_only=True)
    step = ckpt.steps()[-1] if step is None else step
    state, _ = ckpt.read(step)
    ckpt.close()
    return step, [np.asarray(x) for x in jax.tree.leaves(state)]


def jsonl_rows(run_dir, name="metrics.jsonl"):
    """A run's metrics.jsonl (or samples.jsonl) rows without the wall-clock fields."""
    rows = [json.loads(line) for line in open(os.path.join(run_dir, name))]
    return [{k: v for k, v in r.items() if not k.startswith(TIMING) and not k.endswith("time_s")} for r in rows]


def wait_for(predicate, proc, what, timeout=300):
    t0 = time.time()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"training ended before {what}: {proc.stdout.read()[-3000:]}")
        if time.time() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def one_line_error(out, *needles, code=2):
    """The run failed with exit `code`, no traceback, and a last stderr line holding every needle."""
    assert out.returncode == code, (out.returncode, out.stdout[-2000:], out.stderr[-2000:])
    assert "Traceback" not in out.stderr + out.stdout, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    for needle in needles:
        assert needle in last, (needle, last)
    return last
