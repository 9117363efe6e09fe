"""`python -m launch train` end to end on CPU with a tiny random model: it learns."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from tiny import target_config

from grpo_jax.config import load_config
from grpo_jax.loop import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tiny_model_learns_to_emit_a_target_token(tiny_model, tmp_path):
    cfg = load_config(None, target_config(tiny_model, tmp_path / "run"))
    summary = train(cfg)
    rewards = [h["reward/mean"] for h in summary["history"]]
    assert np.mean(rewards[:2]) < 0.2, rewards
    assert np.mean(rewards[-3:]) > 0.8, rewards
    assert summary["after"]["eval/target_token"] > summary["before"]["eval/target_token"]
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 21))
    assert (tmp_path / "run" / "config.yaml").exists() and (tmp_path / "run" / "plots" / "reward.png").exists()


def test_same_seed_same_numbers_and_kl_starts_at_zero(tiny_model, tmp_path):
    args = ["--run.steps=3", "--grpo.beta=0.04", "--data.eval_split=null"]
    a = train(load_config(None, target_config(tiny_model, tmp_path / "a", *args)))["history"]
    b = train(load_config(None, target_config(tiny_model, tmp_path / "b", *args)))["history"]
    untimed = lambda h: [{k: v for k, v in row.items() if not k.startswith("time/")} for row in h]  # noqa: E731
    assert untimed(a) == untimed(b)
    assert a[0]["kl"] == pytest.approx(0.0, abs=1e-6) and a[-1]["kl"] > 0


def test_entropy_every_step_and_shuffled_minibatches_resume_exactly(tiny_model, tmp_path):
    """Token entropy is logged on every step; with two minibatches per pass (shuffled by seed and step)
    a run stopped after step 1 and resumed ends where an uninterrupted one does."""
    args = ["--run.steps=2", "--data.eval_split=null", "--grpo.num_minibatches=2", "--grpo.num_iterations=2",
            "--checkpoint.every_steps=1", "--checkpoint.async_save=false"]
    straight = train(load_config(None, target_config(tiny_model, tmp_path / "a", *args)))
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "entropy" in r] == [1, 2]
    assert all(0 < r["entropy"] < np.log(96) for r in rows if "entropy" in r)  # nats, below uniform over the vocab
    train(load_config(None, target_config(tiny_model, tmp_path / "b", *args)))
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "2")  # as if killed before step 2 was saved
    resumed = train(load_config(None, target_config(tiny_model, tmp_path / "b", *args)))
    untimed = lambda h: [{k: v for k, v in row.items() if not k.startswith("time/")} for row in h]  # noqa: E731
    assert untimed(resumed["history"]) == untimed(straight["history"])


def test_cli_train_prints_evaluation_table(tiny_model, tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    args = target_config(tiny_model, tmp_path / "r", "--run.steps=2")
    out = subprocess.run([sys.executable, "-m", "launch", "train", *args],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resolved config:" in out.stdout and "step 2/2" in out.stdout
    assert "held-out evaluation (greedy):" in out.stdout and "target_token" in out.stdout


def test_reference_sync_filtering_and_throughput_metrics(tiny_model, tmp_path):
    args = ["--run.steps=3", "--grpo.beta=0.04", "--grpo.ref_sync_steps=1", "--grpo.ref_mixup_alpha=1.0",
            "--grpo.filter_zero_std_groups=true", "--logging.peak_tflops_per_device=1.0", "--data.eval_split=null",
            "--data.assistant_prefix=1"]
    history = train(load_config(None, target_config(tiny_model, tmp_path / "r", *args)))["history"]
    # the reference is reset to the policy after every step, so the KL at the next update is exactly 0
    assert all(h["kl"] == 0.0 for h in history)
    rows = [json.loads(l) for l in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["throughput/train_tflops"] > 0 and 0 < r["throughput/train_mfu"] for r in rows)
    # the prompt ends with the assistant prefix and the scored completion starts with it
    samples = [json.loads(l) for l in (tmp_path / "r" / "samples.jsonl").read_text().splitlines()]
    assert samples and all(s["prompt"].endswith("1") and s["completion"].startswith("1") for s in samples), samples


def test_eval_and_export_of_a_run(tiny_model, tmp_path):
    """A short run, then `launch eval --run` (pass@k, maj@k) and `launch export --run --best` -> transformers."""
    import torch
    import transformers

    run_dir = tmp_path / "run"
    args = target_config(tiny_model, run_dir, "--run.steps=2", "--checkpoint.keep_best_metric=eval/target_token",
                         "--checkpoint.every_steps=1", "--run.eval_every=1")
    train(load_config(None, args))
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-m", "launch", "eval", *args, "--run", str(run_dir), "--k", "4",
                          "--max-examples", "4", "--correct-by", "target_token", "--json", str(tmp_path / "e.json")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((tmp_path / "e.json").read_text())
    assert metrics["eval/examples"] == 4 and 0 <= metrics["eval/maj@4"] <= metrics["eval/pass@4"] <= 1
    out = subprocess.run([sys.executable, "-m", "launch", "export", "--run", str(run_dir), "--best", "--out",
                          str(tmp_path / "hf")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "step" in out.stdout
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = tok(["What is 1 + 2?"], return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(model(**ids).logits).all()
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_model)
    changed = any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), base.state_dict().values()))
    assert changed, "the exported weights should be the trained ones, not the starting model"


def test_packed_accumulated_run_matches_the_padded_one(tiny_model, tmp_path, capsys):
    """grpo.pack_sequences + grpo.micro_batch_size through the whole loop: the same losses as padded, one pass."""
    args = ["--run.steps=3", "--grpo.beta=0.04", "--data.eval_split=null", "--grpo.loss_type=dr_grpo"]
    padded = train(load_config(None, target_config(tiny_model, tmp_path / "a", *args)))["history"]
    packed = train(load_config(None, target_config(tiny_model, tmp_path / "b", *args, "--grpo.pack_sequences=true",
                                                   "--grpo.micro_batch_size=auto")))["history"]
    out = capsys.readouterr().out
    assert "grpo.micro_batch_size=auto: no device memory limit on cpu" in out
    assert "packing 32 sequences per process into" in out
    assert [h["reward/mean"] for h in packed] == [h["reward/mean"] for h in padded]
    for a, b in zip(padded, packed):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6)
        assert b["kl"] == pytest.approx(a["kl"], rel=1e-3, abs=1e-7)
