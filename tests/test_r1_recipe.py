"""The shipped R1 recipe (configs/r1-smollm2-arithmetic.yaml) on the real SmolLM2-135M-Instruct, shrunk to
seconds per stage: its stages chain with the real chat template and R1 system prompt. The full run
(README, "The R1 recipe") is not part of the suite; this smoke version is."""

from pathlib import Path

import pytest
import yaml
from runs import ROOT, launch

pytestmark = pytest.mark.slow
MODEL = Path(ROOT) / ".cache" / "smollm2" / "hf"
SHRINK = {  # per stage kind, on top of the config's own overrides
    "distill": {"distill.num_prompts": 4, "distill.samples_per_prompt": 2, "distill.min_reward": 0.0,
                "distill.keep_truncated": True, "distill.keep": "all", "data.batch_size": 4,
                "rollout.max_completion_length": 8},
    "sft": {"sft.steps": 2, "sft.batch_size": 4, "sft.max_completion_length": 16},
    "train": {"run.steps": 1, "run.eval_every": 0},
}


@pytest.mark.skipif(not (MODEL / "config.json").exists(), reason="no .cache/smollm2/hf (`make smollm2` makes it)")
def test_shipped_recipe_runs_its_stages_on_smollm2(tmp_path):
    cfg = yaml.safe_load((Path(ROOT) / "configs" / "r1-smollm2-arithmetic.yaml").read_text())
    for stage in cfg["pipeline"]["stages"]:
        stage["overrides"] = {**(stage.get("overrides") or {}), **SHRINK.get(stage["kind"], {})}
    cfg["model"]["path"] = str(MODEL)
    cfg["run"].update(output_dir=str(tmp_path / "r1"), eval_max_examples=4)
    cfg["rollout"].update(max_completion_length=8, group_size=8)
    config = tmp_path / "r1.yaml"
    config.write_text(yaml.safe_dump(cfg))

    # one device: eight fake ones would each hold the 135M model's params, reference and Adam state
    out = launch("pipeline", "--config", config, timeout=900, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    root = tmp_path / "r1"
    kinds = [s["kind"] for s in cfg["pipeline"]["stages"]]
    assert kinds == ["eval", "distill", "sft", "train"]
    corpus = (root / "stage-2-distill" / "distill.jsonl").read_text().splitlines()
    assert len(corpus) == 4 * 2
    sft_config = yaml.safe_load((root / "stage-3-sft" / "config.yaml").read_text())
    assert sft_config["data"]["system_prompt"] == "r1"  # the distill stage asked without it; SFT trains with it
    assert sft_config["sft"]["completion_template"].startswith("<think>\n{completion}")
    table = (root / "results.md").read_text()
    assert "| base |" in table and "| after 3-sft |" in table and "| after 4-grpo |" in table
