"""Orbax checkpoints: exact round trip, retention, corruption fallback, resharding."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grpo_jax.checkpoint import Checkpointer, CheckpointError, abstract_like
from grpo_jax.config import CheckpointConfig, OptimConfig
from grpo_jax.optim import make_optimizer
from grpo_jax.trainer import init_train_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_state(seed=0, reference=True):
    params = {"w": jax.random.normal(jax.random.PRNGKey(seed), (8, 4)), "b": jnp.arange(4.0)}
    opt = make_optimizer(OptimConfig(learning_rate=0.1), 10)
    state = init_train_state(params, opt, jax.random.PRNGKey(seed + 1), keep_reference=reference)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, opt_state = opt.update(grads, state.opt_state, params)
    return state.replace(params=jax.tree.map(lambda p, u: p + u, params, updates), opt_state=opt_state,
                         step=jnp.int32(3))


def assert_same(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("async_save", [True, False])
@pytest.mark.parametrize("reference", [True, False])
def test_round_trip_is_bitwise(tmp_path, async_save, reference):
    state = make_state(reference=reference)
    ckpt = Checkpointer(tmp_path, CheckpointConfig(async_save=async_save))
    ckpt.save(3, state, {"data": {"epoch": 1, "position": 17}, "note": "x"})
    ckpt.wait()
    step, restored, meta = Checkpointer(tmp_path, CheckpointConfig()).restore_latest(abstract_like(state))
    assert step == 3 and meta["data"] == {"epoch": 1, "position": 17}
    assert_same(state, restored)
    ckpt.close()


def test_keeps_last_n_plus_best(tmp_path):
    cfg = CheckpointConfig(keep=2, keep_best_metric="eval/accuracy", async_save=False)
    ckpt = Checkpointer(tmp_path, cfg)
    state = make_state()
    for step, acc in [(1, 0.2), (2, 0.9), (3, 0.3), (4, 0.4), (5, 0.1)]:
        ckpt.save(step, state, {}, metrics={"eval/accuracy": acc})
    ckpt.wait()
    assert ckpt.steps() == [2, 4, 5]
    ckpt.close()


def test_corrupt_newest_falls_back_to_previous(tmp_path, capsys):
    ckpt = Checkpointer(tmp_path, CheckpointConfig(async_save=False))
    good, bad = make_state(0), make_state(1)
    ckpt.save(1, good, {"step": 1})
    ckpt.save(2, bad, {"step": 2})
    ckpt.wait()
    # truncate every data file of the newest checkpoint's state
    for dirpath, _, files in os.walk(tmp_path / "checkpoints" / "2" / "state"):
        for f in files:
            path = os.path.join(dirpath, f)
            with open(path, "r+b") as fh:
                fh.truncate(max(os.path.getsize(path) // 3, 1) if os.path.getsize(path) > 1 else 0)
    step, restored, meta = Checkpointer(tmp_path, CheckpointConfig()).restore_latest(abstract_like(good))
    assert step == 1 and meta == {"step": 1}
    assert_same(good, restored)
    out = capsys.readouterr().out
    assert "checkpoint 2 is damaged" in out and "moved it to corrupt-2/" in out
    assert (tmp_path / "checkpoints" / "corrupt-2").is_dir() and not (tmp_path / "checkpoints" / "2").exists()


def test_half_written_checkpoint_is_ignored(tmp_path):
    ckpt = Checkpointer(tmp_path, CheckpointConfig(async_save=False))
    ckpt.save(1, make_state(), {})
    ckpt.wait()
    # what a kill during a save leaves behind: a temporary folder that was never renamed
    tmp = tmp_path / "checkpoints" / "2.orbax-checkpoint-tmp-1234"
    (tmp / "state").mkdir(parents=True)
    (tmp / "state" / "junk").write_bytes(b"\0" * 10)
    reopened = Checkpointer(tmp_path, CheckpointConfig())
    assert reopened.steps() == [1]
    assert reopened.restore_latest(abstract_like(make_state()))[0] == 1


def test_unwritable_directory_is_a_one_line_error(tmp_path):
    if os.geteuid() == 0:
        target = "/proc/grpo_jax_cannot_write_here"
    else:
        target = str(tmp_path / "ro")
        os.mkdir(target, 0o500)
    with pytest.raises(CheckpointError) as e:
        ckpt = Checkpointer(target, CheckpointConfig(async_save=False))
        ckpt.save(1, make_state(), {})
        ckpt.wait()
    assert "\n" not in str(e.value)


def test_restore_onto_a_different_mesh():
    """Save sharded over 8 devices on one mesh, restore onto another layout and device count."""
    code = textwrap.dedent(
        """
        import os, sys, tempfile
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
        sys.path.insert(0, %r)
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import NamedSharding, PartitionSpec as P, AxisType
        from grpo_jax.checkpoint import Checkpointer, abstract_like
        from grpo_jax.config import CheckpointConfig
        d = tempfile.mkdtemp()
        mesh8 = jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Explicit,))
        x = jax.device_put(jnp.arange(64.0).reshape(16, 4), NamedSharding(mesh8, P("fsdp", None)))
        state = {"w": x, "step": jnp.int32(5)}
        c = Checkpointer(d, CheckpointConfig(async_save=False)); c.save(5, state, {}); c.wait()
        mesh2 = jax.make_mesh((2, 2), ("data", "tensor"), axis_types=(AxisType.Explicit,) * 2,
                              devices=jax.devices()[:4])
        target = {"w": jax.ShapeDtypeStruct((16, 4), jnp.float32, sharding=NamedSharding(mesh2, P(None, "tensor"))),
                  "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh2, P()))}
        step, restored, _ = Checkpointer(d, CheckpointConfig()).restore_latest(target)
        assert step == 5
        assert restored["w"].sharding.spec == P(None, "tensor"), restored["w"].sharding
        assert len(restored["w"].sharding.device_set) == 4
        np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(64.0).reshape(16, 4))
        print("ok")
        """ % ROOT
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]
