"""SFT: the completion loss falls, only completion tokens count, the result feeds GRPO."""

import json

import jax
import numpy as np
import pytest

from grpo_jax.config import load_config
from grpo_jax.models.tiny import char_tokenizer, make_char_model
from grpo_jax.policy import Policy
from grpo_jax.sft import completion_targets, pad_right, run_sft


def test_completion_targets_end_in_eos_and_name_missing_columns():
    tok = char_tokenizer()
    ids = completion_targets(tok, {"prompt": ["p", "q"], "answer": ["13", "7"]}, "{answer}", 8)
    assert ids == [tok("13", add_special_tokens=False)["input_ids"] + [tok.eos_token_id],
                   tok("7", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    padded, mask = pad_right(ids, 4, 0)
    assert padded.shape == (2, 4) and mask.sum() == 5
    try:
        completion_targets(tok, {"prompt": ["p"], "answer": ["1"]}, "{solution}", 8)
    except ValueError as e:
        assert "solution" in str(e) and "answer" in str(e)
    else:
        raise AssertionError("expected a ValueError")


def test_completion_targets_drop_the_assistant_prefix_the_prompt_already_ends_with():
    tok = char_tokenizer()
    rows = {"prompt": ["p"], "answer": ["13"]}
    eos = [tok.eos_token_id]
    thirteen = tok("13", add_special_tokens=False)["input_ids"]
    assert completion_targets(tok, rows, "=>{answer}", 8, prefix="=>") == [thirteen + eos]
    assert completion_targets(tok, rows, "{answer}", 8, prefix="=>") == [thirteen + eos]
    assert completion_targets(tok, rows, "=>{answer}", 8) == [tok("=>13", add_special_tokens=False)["input_ids"] + eos]


@pytest.mark.parametrize("training", ["full", "lora"])
def test_sft_lowers_the_loss_and_writes_a_model_grpo_can_load(tmp_path, training):
    """LoRA: adapters train on the frozen base; the model written is base + adapters summed."""
    base = make_char_model(tmp_path / "base", hidden=32, layers=2, mlp=64)
    args = [f"--model.path={base}", f"--run.output_dir={tmp_path / 'run'}", "--sft.steps=40", "--sft.batch_size=16",
            "--sft.learning_rate=3e-3", "--sft.max_completion_length=6", "--data.source=arithmetic",
            "--data.task_options={ops: [sum], max_operand: 9}", "--rollout.prompt_length_buckets=[32]",
            "--rollout.max_prompt_length=32", "--logging.every_steps=1", "--rewards.functions=[accuracy]"]
    lora = ["--model.lora_rank=8", "--sft.learning_rate=1e-1"] if training == "lora" else []
    model_dir = run_sft(load_config(None, args + lora))
    rows = [json.loads(l) for l in (tmp_path / "run" / "sft" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["sft/loss"] for r in rows]
    # LoRA on a random base keeps its random (tied) embedding: it learns, but slower
    assert len(losses) == 40 and np.mean(losses[-5:]) < (0.95 if lora else 0.6) * np.mean(losses[:5]), losses
    policy = Policy.load(load_config(None, [*args, f"--model.path={model_dir}"]))
    assert policy.config.num_layers == 2
    start = Policy.load(load_config(None, args)).params
    changed = {jax.tree_util.keystr(path) for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(start)[0],
                                                                   jax.tree.leaves(policy.params))
               if not np.array_equal(np.asarray(a), np.asarray(b))}
    adapted = {f"['layers']['{w}']" for w in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")}
    assert changed == adapted if training == "lora" else changed > adapted, changed
