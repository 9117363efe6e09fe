"""Every shipped config fits every target it names (run.sized_for), by the planner's compiled programs.

Each (config, target) pair runs `python -m launch.plan --target NAME --json` in its own process on
that target's number of fake CPU devices: the rollout, and the log-prob and update programs at the
micro-batch `grpo.micro_batch_size=auto` resolves to (found by compiling candidates), must peak at
most 85% of the target's memory. Compile only: nothing is allocated or run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from grpo_jax.config import load_config
from grpo_jax.planner import FIT_FRACTION, parse_target

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
# configs whose model files are not here: plan the same shape from its preset
PRESET = {"smollm2-gsm8k.yaml": "smollm2-135m", "r1-smollm2-arithmetic.yaml": "smollm2-135m"}


def pairs():
    return [(path.name, target) for path in CONFIGS for target in load_config(path).run.sized_for]


def test_every_config_names_its_targets_in_its_header():
    for path in CONFIGS:
        targets = load_config(path).run.sized_for
        assert targets, f"{path.name}: run.sized_for names no target"
        for name in targets:
            parse_target(name)  # a known kind and a device count
        header = next((line for line in path.read_text().splitlines() if line.startswith("# Sized for")), None)
        assert header is not None, f"{path.name}: no '# Sized for (run.sized_for): ...' header line"
        listed = re.match(r"# Sized for \(run\.sized_for\): ([^;(]+)", header).group(1)
        assert [t.strip() for t in listed.split(",")] == list(targets), (path.name, header, targets)


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory):
    """The demo builds its model at start: the same shape, built here."""
    from grpo_jax.models.tiny import make_char_model
    from launch.demo import CHAR_MODEL

    folder = tmp_path_factory.mktemp("demo_model")
    make_char_model(folder, **CHAR_MODEL)
    return folder


@pytest.mark.parametrize("config,target", pairs())
def test_shipped_config_fits_its_target(config, target, request):
    args = ["--config", f"configs/{config}", "--target", target, "--json", "--programs", "rollout,logps,update"]
    if config in PRESET:
        args += ["--model-preset", PRESET[config]]
    if config == "demo.yaml":
        args += [f"--model.path={request.getfixturevalue('demo_model')}"]
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "GRPO_JAX_PLAN_CHILD")}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-m", "launch.plan", *args], env=env, capture_output=True, text=True,
                       timeout=900, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads(p.stdout)
    spec = parse_target(target)
    assert report["devices"] == spec.devices and report["device_kind"] == spec.kind
    assert set(report["programs"]) >= {"rollout", "update"}
    fraction = report["peak_bytes"] / report["device_memory_bytes"]
    assert report["verdict"] == "fits" and fraction <= FIT_FRACTION, (config, target, report["verdict_line"],
                                                                       report.get("micro_batch"))
