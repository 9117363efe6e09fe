"""The public sampling call and the one "converted or HF?" decision (grpo_jax/policy.py)."""

import numpy as np

from grpo_jax import Policy, generate, load_config
from grpo_jax.models.hf import save_converted
from grpo_jax.policy import model_config, model_source


def test_generate_samples_decodes_and_matches_the_samplers_rows(tiny_model, tmp_path):
    cfg = load_config(None, [f"--model.path={tiny_model}", "--data.chat_template=false",
                             "--rollout.prompt_length_buckets=[16]", "--rollout.max_prompt_length=16"])
    policy = Policy.load(cfg)
    greedy = policy.sampling_params(max_new_tokens=5, temperature=0.0)
    out = generate(policy, ["1+2=", "30+4="], greedy, group_size=3)
    assert len(out.texts) == 6 and out.token_ids.shape == (6, 5) and out.mask.shape == (6, 5)
    assert out.texts == policy.decode(out.token_ids, out.mask)
    assert out.texts[0] == out.texts[1] == out.texts[2]  # greedy: a group's samples agree
    sampled = [generate(policy, ["1+2="], policy.sampling_params(max_new_tokens=5), seed=s) for s in (0, 0, 1)]
    np.testing.assert_array_equal(sampled[0].token_ids, sampled[1].token_ids)  # a seed fixes the sample

    converted = tmp_path / "converted"
    save_converted(converted, policy.params, policy.config, tokenizer_src=tiny_model)
    assert model_source(tiny_model).kind == "hf" and model_source(converted).kind == "converted"
    assert model_source(converted).default_tokenizer() == str(converted / "tokenizer")
    assert model_config(cfg.model) == model_config(load_config(None, [f"--model.path={converted}"]).model)
    assert model_config(load_config(None, ["--model.path=nobody/not-a-local-model"]).model, download=False) is None
