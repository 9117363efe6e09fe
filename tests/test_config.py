"""Config: YAML + dotted overrides, clear one-line errors, round trip."""

import dataclasses
import glob
import os

import pytest

from grpo_jax.config import Config, ConfigError, GRPOConfig, all_keys, describe_fields, load_config, save_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return str(p)


def test_defaults_yaml_and_overrides_layer_in_order(tmp_path):
    path = write(tmp_path, "grpo:\n  beta: 0.1\n  loss_type: dapo\nrollout:\n  group_size: 4\n")
    cfg = load_config(path, ["--grpo.beta=0.0", "--rollout.stop_token_ids=[7,9]", "--optim.max_grad_norm", "null"])
    assert cfg.grpo.beta == 0.0 and cfg.grpo.loss_type == "dapo"
    assert cfg.rollout.group_size == 4 and cfg.rollout.stop_token_ids == (7, 9)
    assert cfg.optim.max_grad_norm is None
    assert cfg.run == Config().run
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.grpo.beta = 1.0


def test_text_fields_take_the_override_as_typed():
    cfg = load_config(None, ["--sft.completion_template={teacher}", "--run.name=007", "--model.tokenizer=null",
                             "--data.system_prompt", "Answer: {x}"])
    assert cfg.sft.completion_template == "{teacher}" and cfg.run.name == "007"
    assert cfg.model.tokenizer is None and cfg.data.system_prompt == "Answer: {x}"
    # double quotes make it a YAML string, escapes and all; without them a backslash stays
    cfg = load_config(None, ['--data.assistant_prefix="<think>\\n"', '--run.name="null"'])
    assert cfg.data.assistant_prefix == "<think>\n" and cfg.run.name == "null"
    assert load_config(None, ["--data.assistant_prefix=<think>\\n"]).data.assistant_prefix == "<think>\\n"
    with pytest.raises(ConfigError, match="assistant_prefix"):
        load_config(None, ['--data.assistant_prefix="a\\q"'])


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))), ids=os.path.basename)
def test_shipped_configs_load(path):
    from grpo_jax.rewards import RewardSet

    cfg = load_config(path)
    assert isinstance(cfg, Config)
    rewards = RewardSet(cfg.rewards.functions, cfg.rewards.weights or None, num_workers=0,
                        context={"group_size": cfg.rollout.group_size,
                                 "max_completion_len": cfg.rollout.max_completion_length})
    assert len(rewards.names) == len(cfg.rewards.functions)


def test_saved_config_loads_back_identically(tmp_path):
    cfg = load_config(None, ["--grpo.epsilon_high=0.28", "--rewards.weights=[1.0,0.5]", "--run.seed=3"])
    path = save_config(cfg, tmp_path / "run")
    assert load_config(path) == cfg


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--grpo.bta=0.1"], "unknown config key grpo.bta; did you mean grpo.beta?"),
        (["--rollout.group_szie=4"], "did you mean rollout.group_size?"),
        (["--grpoo.beta=0.1"], "unknown config key grpoo.beta; did you mean grpo.beta?"),
        (["--beta=0.1"], "did you mean grpo.beta?"),
        (["--group_size=4"], "did you mean rollout.group_size?"),
        (["--grpo.beta=abc"], "grpo.beta"),
        (["--rollout.group_size=1.5"], "expected int"),
        (["--grpo.loss_type=ppo"], "grpo.loss_type"),
        (["--rollout.group_size=1"], "needs at least 2"),
        (["--grpo.epsilon=0"], "grpo.epsilon=0.0 must be > 0"),
        (["--grpo.epsilon=-0.1"], "must be > 0"),
        (["--grpo.delta=1.1"], "must exceed 1 + epsilon_high"),
        (["--rollout.top_p=0"], "rollout.top_p"),
        (["--rewards.weights=[1.0]"], "rewards.weights has 1 entries for 2"),
        (["--mesh.data=-1", "--mesh.fsdp=-1"], "only one mesh axis"),
        (["--grpo.num_minibatches=3"], "do not split"),
        (["oops"], "unexpected argument 'oops'"),
        (["--run.seed"], "--run.seed needs a value"),
    ],
)
def test_bad_config_is_one_clear_line(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    text = str(e.value)
    assert message in text
    assert "\n" not in text


def test_loss_type_error_lists_the_valid_ones():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["--grpo.loss_type=ppo"])
    for name in ("grpo", "bnpo", "dr_grpo", "dapo"):
        assert name in str(e.value)


def test_yaml_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"c\.yaml: unknown config key grpo\.epsilonn; did you mean grpo\.epsilon\?"):
        load_config(write(tmp_path, "grpo:\n  epsilonn: 0.3\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "grpo: [beta\n"))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="grpo: expected a mapping"):
        load_config(write(tmp_path, "grpo: 3\n"))


def test_every_field_is_documented_for_help():
    text = describe_fields()
    for key in all_keys():
        assert f"--{key}=" in text
    # each field has its docstring line under it
    lines = text.splitlines()
    flags = [i for i, l in enumerate(lines) if l.startswith("  --")]
    for i in flags:
        assert lines[i + 1].startswith("      "), f"no help text for {lines[i]}"


def test_epsilon_upper_defaults_to_epsilon():
    assert GRPOConfig(epsilon=0.3).epsilon_upper == 0.3
    assert GRPOConfig(epsilon=0.2, epsilon_high=0.28).epsilon_upper == 0.28
