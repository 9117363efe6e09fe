"""The bad-input battery: each mistake gives one clear line, exit status 2, no traceback,
and never damages a good checkpoint. (README's troubleshooting section lists the same cases.)"""

import json
import os
import subprocess
import sys

import pytest
from tiny import target_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


def train(model, run_dir, *extra):
    env = {k: v for k, v in os.environ.items() if k != "GRPO_JAX_DEBUG"}
    env["PYTHONPATH"] = ROOT
    cmd = [sys.executable, "-m", "launch", "train",
           *target_config(model, run_dir, "--run.steps=2", "--data.eval_split=null", *extra)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def one_line_error(out, *needles):
    assert out.returncode == 2, (out.returncode, out.stdout[-2000:], out.stderr[-2000:])
    err = out.stderr.strip()
    assert "Traceback" not in out.stderr, out.stderr
    last = err.splitlines()[-1]
    assert last.startswith("error: "), err
    for needle in needles:
        assert needle in last, (needle, last)
    return last


def test_missing_model_path(tiny_model, tmp_path):
    one_line_error(train(f"{tmp_path}/no/such/model", tmp_path / "r"), "does not exist")


def test_unsupported_model_type(tiny_model, tmp_path):
    bad = tmp_path / "bad_model"
    bad.mkdir()
    cfg = json.loads((tiny_model / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(dict(cfg, model_type="gpt_neox")))
    one_line_error(train(bad, tmp_path / "r"), "gpt_neox", "llama")


def test_tokenizer_larger_than_embedding(tiny_model, tmp_path):
    from tiny import make_tiny_model as make

    small = make(tmp_path / "small_vocab", vocab=40, allow_small_vocab=True)
    one_line_error(train(small, tmp_path / "r"), "tokenizer has", "only 40 rows")


def test_malformed_jsonl_line_names_file_and_line(tiny_model, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"question": "1+1?", "answer": "2"}\n{"question": "2+2?", "answer": \n')
    last = one_line_error(train(tiny_model, tmp_path / "r", "--data.source=jsonl", f"--data.path={data}"))
    assert f"{data}:2" in last


def test_empty_dataset_and_missing_column(tiny_model, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    one_line_error(train(tiny_model, tmp_path / "r", "--data.source=jsonl", f"--data.path={empty}"), "no rows")
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"q": "1+1?", "answer": "2"}\n')
    one_line_error(train(tiny_model, tmp_path / "r2", "--data.source=jsonl", f"--data.path={rows}"),
                   "'question'", "q")


def test_reward_that_does_not_import(tiny_model, tmp_path):
    one_line_error(train(tiny_model, tmp_path / "r", "--rewards.functions=[no_such_pkg.rewards:fn]"),
                   "no_such_pkg.rewards:fn")


def test_reward_that_raises_names_function_and_completion(tiny_model, tmp_path):
    one_line_error(train(tiny_model, tmp_path / "r", "--rewards.functions=[tests.fixtures.bad_rewards:raises]"),
                   "raises", "ZeroDivisionError")


def test_reward_with_wrong_length(tiny_model, tmp_path):
    one_line_error(train(tiny_model, tmp_path / "r", "--rewards.functions=[tests.fixtures.bad_rewards:wrong_length]"),
                   "wrong_length")


def test_nan_loss_stops_with_the_step_and_numbers(tiny_model, tmp_path):
    # a learning rate so large that the first update overflows the weights: every later loss is NaN
    out = train(tiny_model, tmp_path / "r", "--run.steps=6", "--run.max_skipped_updates=2",
                "--optim.learning_rate=1e30", "--optim.max_grad_norm=null", "--checkpoint.every_steps=1")
    last = one_line_error(out, "non-finite loss", "ending at step")
    assert "loss=nan" in last


def test_nan_rewards_count_as_missing_not_as_a_crash(tiny_model, tmp_path):
    out = train(tiny_model, tmp_path / "r", "--rewards.functions=[tests.fixtures.bad_rewards:nan_reward]")
    assert out.returncode == 0, out.stderr[-2000:]


def test_output_dir_not_writable(tiny_model, tmp_path):
    target = "/proc/grpo_jax_run" if os.geteuid() == 0 else str(tmp_path / "ro" / "run")
    if os.geteuid() != 0:
        os.mkdir(tmp_path / "ro", 0o500)
    one_line_error(train(tiny_model, target), "cannot write to run.output_dir", target)


def test_disk_full_during_save_keeps_the_previous_checkpoint(tiny_model, tmp_path):
    """A writer that fails with ENOSPC on the second save: one-line error, checkpoint 1 intact and resumable."""
    run_dir = tmp_path / "run"
    code = f"""
import errno, sys
sys.path[:0] = [{ROOT!r}, {os.path.join(ROOT, 'tests')!r}]
import orbax.checkpoint as ocp
real_save = ocp.CheckpointManager.save
calls = []
def failing_save(self, step, *a, **k):
    calls.append(step)
    if len(calls) > 1:
        raise OSError(errno.ENOSPC, "No space left on device")
    return real_save(self, step, *a, **k)
ocp.CheckpointManager.save = failing_save
from launch.__main__ import main
from tiny import target_config
sys.exit(main(["train", *target_config({str(tiny_model)!r}, {str(run_dir)!r}, "--run.steps=3",
                "--data.eval_split=null", "--checkpoint.every_steps=1", "--checkpoint.async_save=false")]))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                         capture_output=True, text=True, timeout=600)
    one_line_error(out, "No space left on device", "earlier checkpoints are untouched")
    resumed = train(tiny_model, run_dir, "--run.steps=3", "--checkpoint.every_steps=1")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from checkpoint 1" in resumed.stdout
