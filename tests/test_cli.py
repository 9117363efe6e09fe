"""`python -m launch` as a user runs it: in a subprocess, reading its output."""

import os
import subprocess
import sys

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch(*args, cwd=ROOT):
    env = {k: v for k, v in os.environ.items() if k != "GRPO_JAX_DEBUG"}
    env["PYTHONPATH"] = ROOT
    return subprocess.run([sys.executable, "-m", "launch", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_help_lists_commands_and_each_command_documents_its_flags():
    out = launch("--help")
    assert out.returncode == 0
    for command in ("config", "demo"):
        assert command in out.stdout
    out = launch("config", "--help")
    assert out.returncode == 0
    assert "--grpo.beta=0.04" in out.stdout and "KL penalty" in out.stdout


def test_config_command_prints_and_saves_resolved_config(tmp_path):
    out_dir = tmp_path / "run"
    out = launch("config", "--config", "configs/demo.yaml", "--grpo.beta=0.5", "--rollout.group_size", "16",
                 f"--run.output_dir={out_dir}", "--save")
    assert out.returncode == 0, out.stderr
    assert "beta: 0.5" in out.stdout
    saved = yaml.safe_load((out_dir / "config.yaml").read_text())
    assert saved["grpo"]["beta"] == 0.5 and saved["rollout"]["group_size"] == 16
    assert saved["run"]["name"] == "demo"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--grpo.bta=0.04"], "error: unknown config key grpo.bta; did you mean grpo.beta?"),
        (["--rollout.group_size=abc"], "error: rollout.group_size:"),
        (["--rollout.group_size=1"], "error: rollout.group_size=1: GRPO compares completions within a group"),
    ],
)
def test_bad_config_exits_nonzero_with_one_line_no_traceback(args, message):
    out = launch("config", "--config", "configs/demo.yaml", *args)
    assert out.returncode == 2
    assert out.stderr.strip().startswith(message), out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert "Traceback" not in out.stderr


def test_unknown_command_and_unknown_flag_of_a_plain_command():
    out = launch("trian")
    assert out.returncode != 0 and "invalid choice" in out.stderr


def test_the_package_is_installed_so_scripts_anywhere_import_it(tmp_path):
    """`make install` installs grpo_jax itself (editable) into the venv: a user's script in another
    folder imports it without PYTHONPATH, and gets this checkout's code."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    script = "import grpo_jax, launch; from grpo_jax import Policy, generate; print(grpo_jax.__file__)"
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert os.path.realpath(out.stdout.strip()).startswith(os.path.realpath(ROOT)), out.stdout
