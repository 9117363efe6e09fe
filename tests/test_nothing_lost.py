"""Nothing lost, ever: fault injection around a run dir, one test per case of issue 21.

Each case asserts the exit code, the one line the user sees, and that the run's checkpoints
still restore bit for bit (or, where the case is about resuming, that the resumed run ends
where an uninterrupted one does). Subprocesses run the CLI on a tiny model, a few steps each.
"""

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from runs import ROOT, env, final_state, jsonl_rows, launch, one_line_error, wait_for
from tiny import target_config

from grpo_jax.config import ConfigError, identity_changes, is_resumable, load_config

pytestmark = pytest.mark.slow


def flags(model, run_dir, *extra):
    return target_config(model, run_dir, "--run.steps=4", "--checkpoint.every_steps=2", "--checkpoint.keep=2",
                         "--run.eval_max_examples=4", "--logging.progress_bar=false", *extra)


def train(model, run_dir, *extra, **env_extra):
    return launch("train", *flags(model, run_dir, *extra), **env_extra)


def tree_digest(run_dir) -> dict:
    """SHA-256 of every file under a run dir (the lock file aside): "touched nothing" means equal digests."""
    root = Path(run_dir)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "run.lock"}


def assert_same_state(a_dir, b_dir, step=None):
    step_a, a = final_state(a_dir, step)
    step_b, b = final_state(b_dir, step)
    assert step_a == step_b
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


def flip_bytes(checkpoint: Path, n=64):
    """Corrupt the largest array file of a checkpoint in place, as a bad disk would."""
    path = max((p for p in (checkpoint / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(path.read_bytes())
    for i in range(n):
        data[len(data) // 2 + i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def finished(tiny_model, tmp_path_factory):
    """A finished 4-step run (checkpoints 2 and 4), never modified: tests work on copies."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    out = train(tiny_model, run_dir)
    assert out.returncode == 0, out.stderr[-3000:]
    return run_dir


def copy_of(finished, tmp_path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(finished, target)
    return target


# 1 ------------------------------------------------------------------------------------------------


def test_1_changed_config_refuses_with_the_diff_and_touches_nothing(tiny_model, finished, tmp_path):
    run_dir = copy_of(finished, tmp_path)
    before = tree_digest(run_dir)
    last = one_line_error(train(tiny_model, run_dir, "--grpo.beta=0.1", "--optim.optimizer=sgd"),
                          "grpo.beta: 0.0 -> 0.1", "optim.optimizer: adamw -> sgd", "Nothing was touched",
                          "run.resume=override", "run.resume=new_dir")
    assert "checkpoints up to step 4" in last
    assert tree_digest(run_dir) == before
    assert_same_state(finished, run_dir)

    # override: resumed under the new learning rate, the old config kept beside; new_dir: a fresh run beside it
    out = train(tiny_model, run_dir, "--run.steps=5", "--optim.learning_rate=0.01", "--run.resume=override")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "optim.learning_rate: 0.03 -> 0.01" in out.stdout and "resumed from checkpoint 4" in out.stdout
    assert load_config(run_dir / "config.4.yaml").optim.learning_rate == 0.03
    assert load_config(run_dir / "config.yaml").optim.learning_rate == 0.01
    assert_same_state(finished, run_dir, step=4)
    out = train(tiny_model, run_dir, "--run.steps=1", "--run.resume=new_dir")
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"this one starts afresh in {run_dir}-2" in out.stdout
    assert final_state(f"{run_dir}-2")[0] == 1 and final_state(run_dir)[0] == 5


def test_1_which_settings_may_change_on_resume():
    base = load_config()
    changed = load_config(overrides=["--run.steps=9", "--logging.every_steps=5", "--run.eval_every=3",
                                     "--checkpoint.keep=7", "--mesh.fsdp=2", "--grpo.micro_batch_size=4",
                                     "--model.remat=full", "--run.output_dir=elsewhere"])
    assert identity_changes(base, changed) == []
    assert identity_changes(base, load_config(overrides=["--rollout.group_size=4", "--data.batch_size=2"])) == [
        "rollout.group_size: 8 -> 4", "data.batch_size: 8 -> 2"]
    assert is_resumable("logging.wandb") and not is_resumable("grpo.beta") and not is_resumable("model.path")
    with pytest.raises(ConfigError, match="checkpoint.resume was replaced by run.resume"):
        load_config(overrides=["--checkpoint.resume=false"])


# 2 ------------------------------------------------------------------------------------------------


def test_2_finished_run_reruns_with_exit_0_and_extends(tiny_model, finished, tmp_path):
    run_dir = copy_of(finished, tmp_path)
    before = tree_digest(run_dir)
    out = train(tiny_model, run_dir)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "run already complete at step 4" in out.stdout
    assert tree_digest(run_dir) == before
    out = train(tiny_model, run_dir, "--run.steps=6")
    assert out.returncode == 0 and "resumed from checkpoint 4" in out.stdout, out.stderr[-3000:]
    assert final_state(run_dir)[0] == 6
    assert_same_state(finished, run_dir, step=4)


def test_2_saving_a_step_that_exists_replaces_it_atomically(tmp_path):
    import jax.numpy as jnp

    from grpo_jax.checkpoint import Checkpointer
    from grpo_jax.config import CheckpointConfig

    ckpt = Checkpointer(tmp_path, CheckpointConfig(async_save=True))
    ckpt.save(3, {"w": jnp.zeros(4)}, {"v": 1})
    ckpt.save(3, {"w": jnp.ones(4)}, {"v": 2})
    ckpt.wait()
    restored = ckpt.restore_latest({"w": jnp.zeros(4)})
    assert restored.step == 3 and restored.meta == {"v": 2} and float(restored.state["w"].sum()) == 4
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["3"]
    ckpt.close()
    # killed after setting the old copy aside and before the new one committed: the old copy comes back
    folder = tmp_path / "checkpoints"
    os.replace(folder / "3", folder / "replaced-3")
    again = Checkpointer(tmp_path, CheckpointConfig())
    assert again.steps() == [3] and again.restore_latest({"w": jnp.zeros(4)}).meta == {"v": 2}
    again.close()


# 3 ------------------------------------------------------------------------------------------------


def test_3_signal_during_the_final_evaluation_saves_and_resume_finishes(tiny_model, tmp_path):
    run_dir = tmp_path / "run"
    # one prompt x 2 completions per eval batch, 2 eval batches: reward calls 1-2 at step 0, 3-4 the steps, 5-6 final
    extra = ("--data.batch_size=1", "--rollout.group_size=2", "--run.steps=2", "--checkpoint.every_steps=0",
             "--rewards.functions=[tests.fixtures.bad_rewards:signal_at]")
    out = train(tiny_model, run_dir, *extra, GRPO_TEST_SIGNAL_AT="5", GRPO_TEST_SIGNAL="SIGTERM")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "SIGTERM received" in out.stdout and "the final evaluation was interrupted" in out.stdout
    assert final_state(run_dir)[0] == 2
    out = train(tiny_model, run_dir, *extra)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from checkpoint 2" in out.stdout
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["2"]  # replaced, nothing left over
    assert "run already complete at step 2" in train(tiny_model, run_dir, *extra).stdout

    # Ctrl-C before the first step: nothing to save, one line, no traceback
    fresh = tmp_path / "fresh"
    out = train(tiny_model, fresh, *extra, GRPO_TEST_SIGNAL_AT="1", GRPO_TEST_SIGNAL="SIGINT")
    one_line_error(out, "interrupted (SIGINT) before there was anything to save", code=130)


# 4 ------------------------------------------------------------------------------------------------

FAILING_BACKGROUND_SAVE = """
import errno, sys
sys.path[:0] = [{root!r}, {tests!r}]
from orbax.checkpoint._src.checkpointers import async_checkpointer as ac
real, calls = ac._background_wait_for_commit_futures, []
def failing(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
        raise OSError(errno.EACCES, "Permission denied")
    return real(*args, **kwargs)
ac._background_wait_for_commit_futures = failing
from launch.__main__ import main
sys.exit(main(["train", *{flags!r}]))
"""


def test_4_a_failed_background_save_stops_the_run_at_once(tiny_model, tmp_path):
    run_dir = tmp_path / "run"
    code = FAILING_BACKGROUND_SAVE.format(root=ROOT, tests=os.path.join(ROOT, "tests"), flags=flags(
        tiny_model, run_dir, "--run.steps=6", "--checkpoint.every_steps=1", "--checkpoint.save_timeout_s=30",
        "--data.eval_split=null"))
    t0 = time.time()
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env(), capture_output=True, text=True,
                         timeout=300)
    one_line_error(out, "saving checkpoint 2", "Permission denied", "the run stops here", "Checkpoints intact: 1")
    assert time.time() - t0 < 120
    assert "step 3/6" in out.stdout and "step 4/6" not in out.stdout  # stopped at the first step after the failure
    assert final_state(run_dir)[0] == 1


# 5 ------------------------------------------------------------------------------------------------


def test_5_a_corrupt_checkpoint_is_set_aside_and_eval_export_fall_back(tiny_model, finished, tmp_path):
    run_dir = copy_of(finished, tmp_path)
    flip_bytes(run_dir / "checkpoints" / "4")
    out = launch("export", "--run", run_dir, "--out", tmp_path / "hf")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "checkpoint 4" in out.stdout and "does not match its SHA-256" in out.stdout and "step 2" in out.stdout
    assert len(out.stdout.strip().splitlines()) == 2
    out = train(tiny_model, run_dir)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "moved it to corrupt-4/ and resumed from checkpoint 2" in out.stdout
    assert (run_dir / "checkpoints" / "corrupt-4").is_dir()
    assert_same_state(finished, run_dir, step=4)  # redone from 2, bit for bit the original's

    for step in (2, 4):
        flip_bytes(run_dir / "checkpoints" / str(step))
    before = tree_digest(run_dir)
    one_line_error(train(tiny_model, run_dir), "no checkpoint", "is readable", "run.resume=new_dir")
    assert tree_digest(run_dir) == before


# 6 ------------------------------------------------------------------------------------------------


def test_6_a_second_process_on_a_run_dir_gets_one_line_naming_the_first(tiny_model, finished, tmp_path):
    from grpo_jax.run_dir import RunLock

    run_dir = copy_of(finished, tmp_path)
    before = tree_digest(run_dir)
    lock = RunLock(run_dir)
    assert lock.acquire() is None
    try:
        one_line_error(train(tiny_model, run_dir, "--run.seed=1"), f"is in use by pid {os.getpid()}", "run.lock")
    finally:
        lock.release()
    assert tree_digest(run_dir) == before
    # a holder killed without releasing: its lock is taken over with a note
    holder = subprocess.run([sys.executable, "-c", f"import os; from grpo_jax.run_dir import RunLock; "
                             f"RunLock({str(run_dir)!r}).acquire(); os._exit(9)"], env=env(), cwd=ROOT)
    assert holder.returncode == 9
    note = RunLock(run_dir)
    assert "ended without releasing it" in note.acquire()
    note.release()


# 7 ------------------------------------------------------------------------------------------------


def test_7_resume_after_a_kill_before_any_checkpoint_logs_each_step_once(tiny_model, finished, tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "launch", "train", *flags(tiny_model, run_dir,
                             "--checkpoint.every_steps=0")], env=env(), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    metrics = run_dir / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, proc, "step 2's metrics")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    out = train(tiny_model, run_dir, "--checkpoint.every_steps=0")
    assert out.returncode == 0, out.stderr[-3000:]
    for name in ("metrics.jsonl", "samples.jsonl"):
        assert jsonl_rows(run_dir, name) == jsonl_rows(finished, name)
    assert_same_state(finished, run_dir, step=4)


# 8 ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("yaml_text, overrides, message", [
    ("grpo:\n  beta: 0.1\n  beta: 0.2\n", [], "line 3: not valid YAML (duplicate key 'beta')"),
    ("", ["--run.eval_every=-1"], "run.eval_every=-1 must be >= 0"),
    ("", ["--optim.b1=1.5"], "optim.b1=1.5 and optim.b2=0.99 must be in [0, 1)"),
    ("", ["--rewards.weights=[nan,1]"], "rewards.weights=[nan, 1.0] must be finite"),
    ("", ["--checkpoint.keep_best_metric=accuracy"], "must be an evaluation metric, e.g. eval/accuracy"),
])
def test_8_config_mistakes_are_one_line_errors(tmp_path, yaml_text, overrides, message):
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_8_data_and_model_mistakes_name_the_file_line_or_key(tiny_model, tmp_path):
    from grpo_jax.data import DataError, read_jsonl
    from grpo_jax.models.hf import ModelLoadError, load_tokenizer

    data = tmp_path / "train.jsonl"
    data.write_bytes(b'{"question": "1+1?", "answer": "2"}\n{"question": "caf\xe9", "answer": "3"}\n')
    with pytest.raises(DataError, match=f"{data}:2: not UTF-8 \\(byte 0xe9 at column 18\\)"):
        list(read_jsonl(str(data)))
    bare = tmp_path / "no_tokenizer"
    bare.mkdir()
    shutil.copy(tiny_model / "config.json", bare / "config.json")
    with pytest.raises(ModelLoadError, match="no tokenizer in"):
        load_tokenizer(bare)


def test_8_run_time_mistakes_are_one_clear_line(tiny_model, tmp_path):
    one_line_error(train(tiny_model, tmp_path / "a", "--rollout.stop_token_ids=[5000]"),
                   "rollout.stop_token_ids: 5000 is beyond the model's vocabulary (96 tokens")
    one_line_error(train(tiny_model, tmp_path / "b", "--checkpoint.keep_best_metric=eval/acuracy"),
                   "checkpoint.keep_best_metric=eval/acuracy is not an evaluation metric", "eval/pass@1")
    one_line_error(train(tiny_model, tmp_path / "c", "--data.overlong_prompts=drop", "--rollout.max_prompt_length=8",
                         "--data.eval_split=null"),
                   "every row was dropped", "rollout.max_prompt_length")
    # some prompts too long: counted; a reward that scores nothing: said once
    out = train(tiny_model, tmp_path / "d", "--run.steps=2", "--data.overlong_prompts=drop",
                "--rollout.max_prompt_length=22", "--data.eval_split=null", "--rewards.functions="
                "[target_token(token_id=7),tests.fixtures.bad_rewards:nan_reward]")
    assert out.returncode == 0, out.stderr[-3000:]
    assert sum(r["data/prompts_dropped"] for r in jsonl_rows(tmp_path / "d")) > 0
    assert out.stdout.count("warning: reward function nan_reward scored none of the 32 completions") == 1


def test_8_every_eval_prompt_too_long_is_one_line(tiny_model, tmp_path):
    from grpo_jax.data import DataError, ListDataset
    from grpo_jax.evaluate import evaluate
    from grpo_jax.policy import Policy
    from grpo_jax.rewards import RewardSet

    cfg = load_config(overrides=[f"--model.path={tiny_model}", "--data.overlong_prompts=drop",
                                 "--rollout.max_prompt_length=8", "--data.chat_template=false",
                                 "--rewards.functions=[format]"])
    policy = Policy.load(cfg)
    with RewardSet.from_config(cfg) as rewards, pytest.raises(DataError, match="no prompt to evaluate"):
        evaluate(policy, rewards, ListDataset([{"prompt": "a long prompt here", "answer": "1"}] * 4, name="t"), 4)


# 9 ------------------------------------------------------------------------------------------------


def test_9_readme_says_a_config_is_code_and_where_the_guards_live():
    readme = Path(ROOT, "README.md").read_text()
    trust = readme[readme.index("## Trust"):]
    trust = trust[:trust.find("\n## ", 1)]
    for needle in ("package.module:function", "run.lock", "sha256sums.txt", "run.resume", "corrupt-"):
        assert needle in trust, needle
