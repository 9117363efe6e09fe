"""Multi-process runs: real `jax.distributed` over loopback with 2 processes x 2 CPU devices.

The processes are this file run as a script (`python tests/test_distributed.py worker ...`),
so the worker code sits next to the assertions about it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS, COLS, HIDDEN, LR = 8, 3, 4, 0.01


# ---------------------------------------------------------------- the worker (a separate process)


def _worker(process_id: int, port: int, mode: str) -> None:
    sys.path.insert(0, ROOT)
    from grpo_jax import distributed
    from grpo_jax.config import MeshConfig

    cfg = MeshConfig(data=-1, fsdp=2, coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                     process_id=process_id)
    got = distributed.initialize(cfg, initialization_timeout=20, heartbeat_timeout_seconds=3,
                                 shutdown_timeout_seconds=5)
    again = distributed.initialize(cfg)  # idempotent
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from grpo_jax import sharding

    mesh = sharding.make_mesh(cfg)
    full = np.arange(ROWS * COLS, dtype=np.float32).reshape(ROWS, COLS) / 10
    half = ROWS // 2
    local = full[process_id * half:(process_id + 1) * half]
    x = distributed.global_batch(local, mesh)
    rep = sharding.replicated(mesh)
    total, mean = jax.jit(lambda x: (x.sum(), x.mean(axis=0)), out_shardings=rep)(x)

    w_sharding = NamedSharding(mesh, P(None, "fsdp"))
    w = distributed.global_batch(np.ones((COLS, HIDDEN), np.float32), w_sharding, global_shape=(COLS, HIDDEN))

    @jax.jit
    def update(w, x):
        loss, grad = jax.value_and_grad(lambda w: jnp.mean((x @ w) ** 2))(w)
        return w - LR * grad, loss

    update = jax.jit(update, out_shardings=(w_sharding, rep), donate_argnums=0)
    w, loss = update(w, x)
    w_full = jax.jit(lambda w: w, out_shardings=rep)(w)
    result = {
        "initialize": list(got), "again": list(again), "process_index": jax.process_index(),
        "devices": jax.device_count(), "local_devices": jax.local_device_count(),
        "sum": float(total), "mean": np.asarray(mean).tolist(), "loss": float(loss),
        "w": np.asarray(w_full).tolist(), "w_sharded": not w.is_fully_addressable,
        "local_rows_ok": bool(np.array_equal(distributed.local_rows(x), local)),
        "row_range": list(distributed.local_row_range(x)), "is_main": distributed.is_main(),
        "gathered": distributed.allgather_rows(local[:, 0] + process_id).tolist(),
        "max": distributed.global_max(10 + process_id), "any": distributed.any_process(process_id == 1),
        "none": distributed.any_process(False),
    }
    print("RESULT " + json.dumps(result), flush=True)
    if mode == "die":
        victim = int(os.environ["VICTIM"])
        distributed.sync("before-death")
        if process_id == victim:
            os.kill(os.getpid(), 9)  # no clean shutdown: like a host that vanished
        start = time.time()
        i = 0
        while time.time() - start < 60:  # keep computing (collectives) until the runtime gives up
            float(jax.jit(lambda x: x.sum(), out_shardings=rep)(x + i))
            time.sleep(0.2)
            i += 1
        print("SURVIVED", flush=True)
    distributed.shutdown()


# ---------------------------------------------------------------- the tests


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(process_id: int, port: int, mode: str, **extra_env) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GRPO_JAX_", "JAX_", "SLURM_", "OMPI_"))}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2", PYTHONUNBUFFERED="1",
               PYTHONPATH=ROOT, **extra_env)
    for key in [k for k in env if "proxy" in k.lower()]:  # jax warns that proxies can hang initialize
        del env[key]
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), "worker", str(process_id), str(port), mode],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)


def _collect(procs, timeout=90):
    out = []
    deadline = time.time() + timeout
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=max(1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("a worker hung: " + "; ".join(q.communicate()[1][-2000:] for q in procs))
        result = next((json.loads(line[7:]) for line in stdout.splitlines() if line.startswith("RESULT ")), None)
        out.append(SimpleNamespace(rc=p.returncode, stdout=stdout, stderr=stderr, result=result,
                                   survived="SURVIVED" in stdout))
    return out


def _reference():
    full = np.arange(ROWS * COLS, dtype=np.float64).reshape(ROWS, COLS) / 10
    w = np.ones((COLS, HIDDEN))
    y = full @ w
    grad = 2 * full.T @ y / y.size
    return full.sum(), full.mean(axis=0), float(np.mean(y ** 2)), w - LR * grad


@pytest.mark.slow
def test_two_processes_agree_on_global_results():
    port = _free_port()
    results = _collect([_spawn(i, port, "ok") for i in range(2)])
    for i, r in enumerate(results):
        assert r.rc == 0 and r.result is not None, f"process {i} failed (rc {r.rc}):\n{r.stderr[-3000:]}"
    a, b = results[0].result, results[1].result
    full = np.arange(ROWS * COLS, dtype=np.float32).reshape(ROWS, COLS) / 10
    assert a["initialize"] == [0, 2] and b["initialize"] == [1, 2]
    assert a["again"] == a["initialize"] and b["again"] == b["initialize"]
    assert a["devices"] == b["devices"] == 4 and a["local_devices"] == b["local_devices"] == 2
    assert a["is_main"] and not b["is_main"]
    assert a["w_sharded"] and a["local_rows_ok"] and b["local_rows_ok"]
    assert a["row_range"] == [0, 4] and b["row_range"] == [4, 8]
    gathered = np.concatenate([full[:4, 0], full[4:, 0] + 1]).tolist()  # process order, each process's own rows
    assert a["gathered"] == b["gathered"] == gathered
    assert a["max"] == b["max"] == 11 and a["any"] and b["any"] and not (a["none"] or b["none"])
    for key in ("sum", "mean", "loss", "w"):
        assert a[key] == b[key], key  # bitwise the same global result on both processes
    total, mean, loss, w = _reference()
    np.testing.assert_allclose(a["sum"], total, rtol=1e-5)
    np.testing.assert_allclose(a["mean"], mean, rtol=1e-5)
    np.testing.assert_allclose(a["loss"], loss, rtol=1e-5)
    np.testing.assert_allclose(a["w"], w, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("victim", [1, 0], ids=["worker-dies", "coordinator-dies"])
def test_survivor_exits_when_a_process_dies(victim):
    """A killed process makes the other one abort within seconds (heartbeat 3 s), not hang.

    Worker dies: the coordination service (in process 0) misses its heartbeats and
    process 0 terminates with "the JAX distributed service detected fatal errors".
    Coordinator dies: process 1's next collective fails (Gloo: connection closed) or its
    heartbeats fail; either way it exits non-zero.
    """
    port = _free_port()
    start = time.time()
    results = _collect([_spawn(i, port, "die", VICTIM=str(victim)) for i in range(2)], timeout=75)
    elapsed = time.time() - start
    dead, survivor = results[victim], results[1 - victim]
    assert dead.rc == -9, f"victim should have been killed:\n{dead.stderr[-2000:]}"
    assert survivor.result is not None, survivor.stderr[-3000:]
    assert not survivor.survived, "the survivor kept running for 60 s after its peer died"
    assert survivor.rc != 0
    assert elapsed < 60
    assert any(s in survivor.stderr for s in ("distributed service", "unhealthy", "heartbeat", "Gloo",
                                              "Connection closed", "CoordinationService")), survivor.stderr[-3000:]


@pytest.mark.slow
def test_missing_peer_times_out():
    """A process whose peers never show up fails after the initialization timeout."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GRPO_JAX_", "JAX_"))}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, GRPO_JAX_COORDINATOR=f"127.0.0.1:{port}",
               GRPO_JAX_NUM_PROCESSES="2", GRPO_JAX_PROCESS_ID="0", GRPO_JAX_INIT_TIMEOUT="3")
    code = "from grpo_jax import distributed; distributed.initialize(); print('JOINED')"
    start = time.time()
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert p.returncode != 0 and "JOINED" not in p.stdout
    assert time.time() - start < 40


# ---------------------------------------------------------------- in-process (no subprocess)


def test_resolve_sources(monkeypatch):
    from grpo_jax import distributed
    from grpo_jax.config import MeshConfig

    env = {"GRPO_JAX_COORDINATOR": "10.0.0.1:1234", "GRPO_JAX_NUM_PROCESSES": "4", "GRPO_JAX_PROCESS_ID": "3"}
    c = distributed.resolve(MeshConfig(), env)
    assert (c.coordinator_address, c.num_processes, c.process_id, c.source) == ("10.0.0.1:1234", 4, 3, "env")
    c = distributed.resolve(MeshConfig(coordinator_address="h:1", num_processes=2, process_id=1), env)
    assert (c.coordinator_address, c.num_processes, c.process_id, c.source) == ("h:1", 2, 1, "config")
    monkeypatch.setattr(distributed, "detect_cluster", lambda: None)
    assert distributed.resolve(MeshConfig(), {}).source == "none"
    assert distributed.resolve(MeshConfig(num_processes=1), {}).num_processes == 1
    with pytest.raises(ValueError, match="missing mesh.coordinator_address"):
        distributed.resolve(MeshConfig(num_processes=2, process_id=0), {})
    with pytest.raises(ValueError, match="process_id=2"):
        distributed.resolve(MeshConfig(coordinator_address="h:1", num_processes=2, process_id=2), {})
    with pytest.raises(ValueError, match="GRPO_JAX_NUM_PROCESSES"):
        distributed.resolve(None, {"GRPO_JAX_NUM_PROCESSES": "two"})
    monkeypatch.setattr(distributed, "detect_cluster", lambda: "SlurmCluster")
    assert distributed.resolve(MeshConfig(), {}).source == "cluster:SlurmCluster"
    t = distributed.timeouts({"GRPO_JAX_HEARTBEAT_TIMEOUT": "7"})
    assert t == {"initialization_timeout": 300, "heartbeat_timeout_seconds": 7, "shutdown_timeout_seconds": 300}


def test_single_process_helpers(monkeypatch):
    import jax

    from grpo_jax import distributed, sharding
    from grpo_jax.config import MeshConfig

    monkeypatch.setattr(distributed, "detect_cluster", lambda: None)
    for key in ("GRPO_JAX_COORDINATOR", "GRPO_JAX_NUM_PROCESSES", "GRPO_JAX_PROCESS_ID", "JAX_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(key, raising=False)
    assert distributed.initialize(MeshConfig()) == (0, 1)
    assert not distributed.is_initialized() and distributed.is_main()
    mesh = sharding.make_mesh(MeshConfig(data=-1, fsdp=2), jax.devices()[:4])
    batch = {"ids": np.arange(16).reshape(8, 2), "scale": np.float32(2)}
    g = distributed.global_batch(batch, mesh)
    assert g["ids"].sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"), None)
    assert g["scale"].sharding.is_fully_replicated
    np.testing.assert_array_equal(distributed.local_rows(g["ids"]), batch["ids"])
    assert distributed.local_row_range(g["ids"]) == (0, 8)
    odd = distributed.global_batch(np.arange(6), mesh)  # 6 rows over 4 devices: replicated (single-process)
    assert odd.sharding.is_fully_replicated and distributed.local_rows(odd).tolist() == list(range(6))
    assert distributed.allgather_rows([1, 2]).tolist() == [1, 2]
    assert distributed.global_max(3) == 3 and distributed.any_process(True) and not distributed.any_process(False)
    distributed.sync()


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "worker":
        _worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    else:
        sys.exit(f"usage: {sys.argv[0]} worker PROCESS_ID PORT ok|die")
