"""`pipeline`: tiny stages (eval -> distill -> sft -> train -> eval) chain their outputs, a re-run resumes at
the first unfinished stage, a finished stage with changed settings refuses, and bad stage lists fail in one line."""

import json
from pathlib import Path

import pytest
import yaml
from runs import launch, one_line_error
from tiny import make_tokenizer

from grpo_jax.config import ConfigError, load_config
from grpo_jax.pipeline import plan

pytestmark = pytest.mark.slow
SEVEN = make_tokenizer().convert_tokens_to_ids("7")
STAGES = [
    {"kind": "eval", "name": "base-eval"},
    {"kind": "distill", "overrides": {"distill": {"num_prompts": 8, "keep": "all", "min_reward": 0.0,
                                                  "keep_truncated": True}}},
    {"kind": "sft", "overrides": {"sft.steps": 3, "sft.batch_size": 8, "sft.max_completion_length": 8,
                                  "sft.warmup_steps": 1}},
    {"kind": "train", "name": "grpo", "overrides": {"run": {"steps": 2}}},
    {"kind": "eval"},
]


def write_config(tmp_path, model, stages=STAGES) -> Path:
    cfg = {
        "model": {"path": str(model)},
        "run": {"output_dir": str(tmp_path / "pipe"), "seed": 0, "eval_max_examples": 8},
        "data": {"source": "arithmetic", "batch_size": 4, "chat_template": False, "eval_split": "test"},
        "rollout": {"group_size": 8, "max_completion_length": 6, "max_prompt_length": 64,
                    "prompt_length_buckets": [64], "temperature": 1.0},
        "rewards": {"functions": [f"target_token(token_id={SEVEN})"]},
        "grpo": {"beta": 0.0},
        "optim": {"learning_rate": 0.01},
        "checkpoint": {"every_steps": 0},
        "logging": {"progress_bar": False},
        "pipeline": {"stages": stages},
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_stages_chain_and_resume_at_the_first_unfinished(tiny_model, tmp_path):
    config = write_config(tmp_path, tiny_model)
    root = tmp_path / "pipe"
    first = launch("pipeline", "--config", config)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    dirs = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name != "plots")
    assert dirs == ["stage-1-base-eval", "stage-2-distill", "stage-3-sft", "stage-4-grpo", "stage-5-eval"]
    stage = {d: load_config(root / d / "config.yaml") for d in dirs}
    # the chain: distill -> sft's data, sft's model -> train, train's model -> eval
    corpus = root / "stage-2-distill" / "distill.jsonl"
    assert stage["stage-2-distill"].model.path == str(tiny_model)
    assert stage["stage-3-sft"].data.source == "jsonl" and stage["stage-3-sft"].data.path == str(corpus)
    assert stage["stage-3-sft"].sft.completion_template == "{completion}" and stage["stage-3-sft"].sft.steps == 3
    assert stage["stage-4-grpo"].model.path == str(root / "stage-3-sft" / "model")
    assert stage["stage-4-grpo"].run.steps == 2 and stage["stage-3-sft"].run.steps == 100  # overrides stay in stage
    assert stage["stage-5-eval"].model.path == str(root / "stage-4-grpo" / "model")
    assert len(corpus.read_text().splitlines()) == 8 * 8
    assert (root / "stage-4-grpo" / "model" / "model_config.json").exists()
    records = {d: json.loads((root / d / "stage.json").read_text()) for d in dirs}
    assert records["stage-2-distill"]["kept"] == 64
    table = (root / "results.md").read_text()
    for label in ("| base | stage 1 (base-eval)", "| after 3-sft | stage 4 (grpo)", "| after 4-grpo | stage 5 (eval)"):
        assert label in table, table
    assert "pass@1" in table and "mean_length" in table
    assert (root / "plots" / "stages.png").stat().st_size > 0

    # an interrupted pipeline: the train stage ended but was not recorded, the last eval never ran
    (root / "stage-4-grpo" / "stage.json").unlink()
    (root / "stage-5-eval" / "stage.json").unlink()
    eval_before = json.loads((root / "stage-5-eval" / "eval.json").read_text())
    second = launch("pipeline", "--config", config)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    for n, name in ((1, "base-eval"), (2, "distill"), (3, "sft")):
        assert f"[stage {n}/5] {name}: finished earlier" in second.stdout
    assert "run already complete at step 2" in second.stdout  # the train stage resumed its own run dir
    assert "[stage 5/5] eval (eval)" in second.stdout
    eval_after = json.loads((root / "stage-5-eval" / "eval.json").read_text())
    assert eval_after["eval/pass@1"] == eval_before["eval/pass@1"]  # the same exported model

    changed = launch("pipeline", "--config", config, "--sft.learning_rate=0.5")
    one_line_error(changed, "stage 3 (sft) finished", "sft.learning_rate: 0.001 -> 0.5", "Nothing was touched")


def test_stage_lists_are_validated_before_anything_runs(tiny_model, tmp_path):
    def error(stages):
        with pytest.raises(ConfigError) as e:
            plan(load_config(write_config(tmp_path, tiny_model, stages)))
        return str(e.value)

    assert "kind='rl' must be one of distill, sft, train, eval" in error([{"kind": "rl"}])
    assert "unknown key 'overide'" in error([{"kind": "sft", "overide": {}}])
    assert "pipeline.stages[1] (train): unknown config key grpo.betta; did you mean grpo.beta?" in \
        error([{"kind": "sft"}, {"kind": "train", "overrides": {"grpo.betta": 0.1}}])
    assert "pipeline.stages[0] (sft): rollout.group_size=1" in \
        error([{"kind": "sft", "overrides": {"rollout": {"group_size": 1}}}])
    assert "pipeline.stages is empty" in error([])
    assert not (tmp_path / "pipe").exists()  # planning writes nothing
