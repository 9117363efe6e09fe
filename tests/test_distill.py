"""`distill`: the rows it keeps by reward (best / all / shortest, checked against the whole sampled set),
and a kill -9 mid-corpus followed by a re-run that ends with exactly the rows of an uninterrupted run."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from runs import ROOT, env, launch, one_line_error, wait_for
from tiny import make_tokenizer

from grpo_jax.config import load_config
from grpo_jax.distill import run_distill

pytestmark = pytest.mark.slow
SEVEN = make_tokenizer().convert_tokens_to_ids("7")


def flags(model, out, *extra):
    return [f"--model.path={model}", f"--run.output_dir={out}", "--run.seed=3", "--data.source=arithmetic",
            "--data.batch_size=4", "--data.chat_template=false", "--rollout.max_completion_length=6",
            "--rollout.max_prompt_length=64", "--rollout.prompt_length_buckets=[64]", "--rollout.temperature=1.0",
            f"--rewards.functions=[target_token(token_id={SEVEN})]", "--distill.samples_per_prompt=8",
            "--distill.keep_truncated=true", "--logging.progress_bar=false", *extra]


def distill(model, out, *extra):
    return run_distill(load_config(None, flags(model, out, *extra)))


def rows(out):
    return [json.loads(line) for line in (Path(out) / "distill.jsonl").read_text().splitlines()]


def expected(all_rows, keep, min_reward):
    """The rows `keep` should choose, from every sampled completion (an independent reading of the rule)."""
    by_prompt = {}
    for r in all_rows:
        by_prompt.setdefault(r["index"], []).append(r)
    chosen = []
    for group in by_prompt.values():
        ok = [r for r in group if r["reward"] >= min_reward]
        if keep == "all":
            chosen += ok
        elif ok:
            rank = (lambda r: (r["length"], r["sample"])) if keep == "shortest" else \
                (lambda r: (-r["reward"], r["length"], r["sample"]))
            chosen.append(sorted(ok, key=rank)[0])
    return chosen


def test_rows_are_kept_by_reward(tiny_model, tmp_path):
    everything = distill(tiny_model, tmp_path / "every", "--distill.num_prompts=12", "--distill.keep=all",
                         "--distill.min_reward=-1")
    assert everything.complete and everything.prompts == 12 and everything.completions == 96
    sampled = rows(tmp_path / "every")
    assert len(sampled) == 96 and {r["sample"] for r in sampled} == set(range(8))
    r = sampled[0]
    assert r["teacher"] == str(tiny_model) and r["reward"] == r["reward/target_token"]
    assert isinstance(r["prompt"], str) and r["answer"] is not None and isinstance(r["truncated"], bool)
    rewards = sorted({r["reward"] for r in sampled})
    threshold = rewards[len(rewards) // 2]  # about half the completions pass: some prompts keep none
    assert 0 < threshold
    for keep in ("best", "shortest", "all"):
        out = tmp_path / keep
        summary = distill(tiny_model, out, "--distill.num_prompts=12", f"--distill.keep={keep}",
                          f"--distill.min_reward={threshold}")
        want = expected(sampled, keep, threshold)
        assert rows(out) == want, keep
        assert summary.kept == len(want) and summary.prompts_kept == len({r["index"] for r in want})
        assert 0 < summary.prompts_kept < 12
    # the default drops completions that never stopped
    out = tmp_path / "finished-only"
    distill(tiny_model, out, "--distill.num_prompts=12", "--distill.keep=all", "--distill.min_reward=-1",
            "--distill.keep_truncated=false")
    assert rows(out) == [r for r in sampled if not r["truncated"]]


def test_killed_distill_resumes_without_losing_or_duplicating_rows(tiny_model, tmp_path):
    args = ["--distill.num_prompts=40", "--distill.keep=all", "--distill.min_reward=0.1"]
    reference = tmp_path / "uninterrupted"
    distill(tiny_model, reference, *args)

    out = tmp_path / "killed"
    progress = out / "distill.progress.json"
    proc = subprocess.Popen([sys.executable, "-m", "launch", "distill", *flags(tiny_model, out, *args)], cwd=ROOT,
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: progress.exists() and json.loads(progress.read_text())["batches"] >= 3, proc, "3 batches")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = json.loads(progress.read_text())
    assert before["batches"] < 10 and not before["complete"], before
    with open(out / "distill.jsonl", "a") as f:  # a batch's rows written, its progress not: sampled again
        f.write('{"prompt": "half a row')

    resumed = launch("distill", *flags(tiny_model, out, *args))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"after {before['prompts']} prompts" in resumed.stdout
    assert rows(out) == rows(reference)

    again = launch("distill", *flags(tiny_model, out, *args))
    assert again.returncode == 0 and "distill already complete" in again.stdout
    assert rows(out) == rows(reference)

    changed = launch("distill", *flags(tiny_model, out, *args[:-1], "--distill.min_reward=0.5"))
    one_line_error(changed, "distill.min_reward: 0.1 -> 0.5", "Nothing was touched")
    assert rows(out) == rows(reference)
