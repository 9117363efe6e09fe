"""Scale-out invariance: the same GRPO step on any mesh, and on two processes, as on one device.

Mesh: one real `Run.step` (rollout, rewards, reference / update) on 8 fake CPU devices
laid out as (data, fsdp, tensor) = (8,1,1), (2,4,1), (2,2,2), (1,4,2) samples the same
tokens and ends with the same loss, grad norm and params as on 1 device.

Processes: `train(cfg)` on 2 processes x 4 CPU devices (jax.distributed over loopback,
Gloo collectives) ends with the params of one process on 8 devices; a SIGKILLed
process makes the other exit non-zero. The processes are this file run as a script.
"""

from __future__ import annotations

import functools
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 4, 2)]


def small_config(model_dir, run_dir, *extra):
    """A tiny, fast GRPO run: 4 prompts x G=8 = 32 rows, short prompts and completions.

    SGD: Adam's first update is about lr * sign(grad), which turns float32 noise in a
    near-zero gradient into a visible parameter difference; SGD's update shows the
    gradient itself."""
    from tiny import target_config

    return target_config(model_dir, run_dir, "--data.eval_split=null", "--rollout.max_prompt_length=48",
                         "--rollout.prompt_length_buckets=[48]", "--rollout.max_completion_length=6",
                         "--optim.optimizer=sgd", "--optim.learning_rate=1.0", "--grpo.beta=0.0",
                         "--checkpoint.async_save=false", "--logging.log_completions=0", *extra)


def mesh_args(data, fsdp, tensor):
    return [f"--mesh.data={data}", f"--mesh.fsdp={fsdp}", f"--mesh.tensor={tensor}"]


# ---------------------------------------------------------------- one step on each mesh (in this process)


def one_step(model_dir, run_dir, mesh, monkeypatch, *extra):
    """Run.step(0) on `mesh` (None: 1 device); returns sampled tokens, metrics and updated params (numpy; with
    PPO's critic's)."""
    import jax

    from grpo_jax import sharding
    from grpo_jax.config import load_config
    from grpo_jax.loop import Run

    if mesh is None:
        monkeypatch.setattr(sharding, "make_mesh", functools.partial(sharding.make_mesh, devices=jax.devices()[:1]))
        mesh = (1, 1, 1)
    run = Run(load_config(None, small_config(model_dir, run_dir, *mesh_args(*mesh), *extra)))
    try:
        assert run.mesh.devices.size == int(np.prod(mesh))
        sample, enc_out = run.policy.sample, {}

        def recording_sample(*args, **kwargs):
            samples = sample(*args, **kwargs)
            enc_out["tokens"] = samples.local.tokens
            return samples

        run.policy.sample = recording_sample
        metrics = run.step(0)
        params = jax.tree.map(np.asarray, jax.device_get((run.state.params, run.state.critic_params)))
    finally:
        run.close()
        monkeypatch.undo()
    return enc_out["tokens"], metrics, params


def test_one_grpo_step_is_the_same_on_every_mesh(tiny_model, tmp_path, monkeypatch):
    import jax

    tokens, metrics, params = one_step(tiny_model, tmp_path / "one", None, monkeypatch)
    assert metrics["grad_norm"] > 0 and 0 < metrics["reward/zero_std_groups"] < 1  # a real, informative update
    for mesh in MESHES:
        t, m, p = one_step(tiny_model, tmp_path / "x".join(map(str, mesh)), mesh, monkeypatch)
        np.testing.assert_array_equal(t, tokens, err_msg=f"sampled tokens differ on mesh {mesh}")
        for key in ("loss", "grad_norm", "reward/mean", "advantage/abs_mean"):
            np.testing.assert_allclose(m[key], metrics[key], rtol=1e-5, atol=1e-7, err_msg=f"{key} on mesh {mesh}")
        for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(params)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=f"params on mesh {mesh}")


def test_one_ppo_step_is_the_same_on_one_and_eight_devices(tiny_model, tmp_path, monkeypatch):
    """PPO's step (critic values, GAE whitened over the global batch, policy + value losses) on 1 device and
    on data x fsdp x tensor = 2 x 2 x 2."""
    import jax

    ppo = ("--run.algorithm=ppo", "--rollout.group_size=1", "--data.batch_size=32", "--grpo.beta=0.05")
    tokens, metrics, params = one_step(tiny_model, tmp_path / "one", None, monkeypatch, *ppo)
    assert metrics["grad_norm"] > 0 and metrics["value/grad_norm"] > 0
    t, m, p = one_step(tiny_model, tmp_path / "eight", (2, 2, 2), monkeypatch, *ppo)
    np.testing.assert_array_equal(t, tokens)
    for key in ("loss", "grad_norm", "value/loss", "value/grad_norm", "advantage/abs_mean", "ppo/non_score_reward"):
        np.testing.assert_allclose(m[key], metrics[key], rtol=1e-5, atol=1e-7, err_msg=key)
    assert len(jax.tree.leaves(p)) == len(jax.tree.leaves(params)) > len(jax.tree.leaves(params[0]))  # + the critic
    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- two processes (jax.distributed over loopback)

PROCESS_MESH = (2, 2, 2)  # over 2 processes x 4 devices: each process holds a (data, fsdp) half of the rows


def _worker(process_id: int, port: int, model_dir: str, run_dir: str, steps: int, *extra: str) -> None:
    """One process of a 2-process `train(cfg)` run (this file run as a script); extra: more config flags."""
    sys.path.insert(0, ROOT)
    from grpo_jax.config import load_config
    from grpo_jax.loop import train

    cfg = load_config(None, small_config(model_dir, run_dir, *mesh_args(*PROCESS_MESH), f"--run.steps={steps}",
                                         "--grpo.beta=0.04", "--mesh.coordinator_address=127.0.0.1:%d" % port,
                                         "--mesh.num_processes=2", f"--mesh.process_id={process_id}",
                                         "--checkpoint.every_steps=3", "--checkpoint.keep=5", *extra))
    train(cfg)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(process_id, port, model_dir, run_dir, steps, log_path, *extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GRPO_JAX_", "JAX_", "SLURM_", "OMPI_"))}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4", PYTHONUNBUFFERED="1",
               PYTHONPATH=ROOT, GRPO_JAX_HEARTBEAT_TIMEOUT="10", GRPO_JAX_INIT_TIMEOUT="120")
    for key in [k for k in env if "proxy" in k.lower()]:  # jax warns that proxies can hang initialize
        del env[key]
    with open(log_path, "w") as log:  # the child keeps its own copy of the file descriptor
        return subprocess.Popen([sys.executable, os.path.abspath(__file__), "worker", str(process_id), str(port),
                                 str(model_dir), str(run_dir), str(steps), *extra],
                                env=env, stdout=log, stderr=subprocess.STDOUT, text=True, cwd=ROOT)


def _wait(procs, logs, timeout):
    deadline = time.time() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("a process hung:\n" + "\n".join(open(log).read()[-3000:] for log in logs))
    return [open(log).read() for log in logs]


def _untimed(history):
    return [{k: v for k, v in row.items() if not k.startswith(("time/", "throughput/"))} for row in history]


def assert_same_run(run_dir, one_dir, one: dict):
    """The 2-process run logged the 1-process run's numbers and saved its step-3 params; returns its params."""
    import jax

    from grpo_jax.checkpoint import checkpoint_params
    from grpo_jax.metrics import read_metrics

    rows = {r["step"]: r for r in read_metrics(run_dir)}
    for want in _untimed(one["history"]):
        got = _untimed([rows[want["step"]]])[0]
        for key in want:
            np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-7, err_msg=key)
    two_params, _ = checkpoint_params(run_dir, step=3)
    one_params, _ = checkpoint_params(one_dir, step=3)
    for a, b in zip(jax.tree.leaves(two_params), jax.tree.leaves(one_params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    return two_params


def test_two_processes_train_like_one_and_stop_when_one_dies(tiny_model, tmp_path):
    """2 processes x 4 devices run `train(cfg)`; their step-3 checkpoint holds the params of 3 steps
    on 1 process x 8 devices (same mesh, same config). Then process 1 is SIGKILLed mid-run: process 0
    must exit non-zero, saying why, within 2 minutes (heartbeat timeout here 10 s; default 100 s)."""
    from grpo_jax.config import load_config
    from grpo_jax.loop import train

    port, run_dir = _free_port(), tmp_path / "two"
    logs = [tmp_path / f"p{i}.log" for i in range(2)]
    procs = [_spawn(i, port, tiny_model, run_dir, 100000, logs[i]) for i in range(2)]
    try:
        # the reference, in this process while the two run: 3 steps on 8 devices
        one_dir = tmp_path / "one"
        one = train(load_config(None, small_config(tiny_model, one_dir, *mesh_args(*PROCESS_MESH), "--run.steps=3",
                                                   "--grpo.beta=0.04")))
        deadline = time.time() + 300
        while not (run_dir / "checkpoints" / "3").is_dir():  # step 3 saved; the run goes on
            assert all(p.poll() is None for p in procs), "\n".join(log.read_text()[-3000:] for log in logs)
            assert time.time() < deadline, "no checkpoint 3 within 300 s"
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGKILL)
        killed = time.time()
        output = _wait(procs[:1], logs[:1], timeout=150)[0]
        elapsed = time.time() - killed
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[0].returncode != 0, output[-3000:]
    assert elapsed < 120, f"process 0 took {elapsed:.0f} s to stop after process 1 died"
    assert any(s in output for s in ("distributed service", "heartbeat", "Gloo", "Connection closed",
                                     "exiting so that the other processes stop too")), output[-3000:]
    assert "step 3/" in output and "step 3/" not in logs[1].read_text()  # only process 0 logs

    assert_same_run(run_dir, one_dir, one)



def test_two_processes_with_lora_train_like_one(tiny_model, tmp_path):
    """LoRA over 2 processes x 4 devices, adapters split as their base weights over fsdp x tensor: the
    3-step adapters (and every logged number) of one process on 8 devices."""
    from grpo_jax.config import load_config
    from grpo_jax.loop import train

    lora = ("--model.lora_rank=4", "--optim.learning_rate=3.0")
    port, run_dir = _free_port(), tmp_path / "two"
    logs = [tmp_path / f"p{i}.log" for i in range(2)]
    procs = [_spawn(i, port, tiny_model, run_dir, 3, logs[i], *lora) for i in range(2)]
    try:
        one_dir = tmp_path / "one"
        one = train(load_config(None, small_config(tiny_model, one_dir, *mesh_args(*PROCESS_MESH), "--run.steps=3",
                                                   "--grpo.beta=0.04", *lora)))
        outputs = _wait(procs, logs, timeout=300)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), outputs[0][-3000:] + outputs[1][-3000:]
    assert one["history"][-1]["kl"] > 0
    two_params = assert_same_run(run_dir, one_dir, one)
    assert set(two_params["layers"]) == {"wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"}  # adapters only


if __name__ == "__main__":
    if len(sys.argv) >= 7 and sys.argv[1] == "worker":
        _worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], int(sys.argv[6]), *sys.argv[7:])
    else:
        sys.exit(f"usage: {sys.argv[0]} worker PROCESS_ID PORT MODEL_DIR RUN_DIR STEPS [--section.key=value ...]")
