"""LoRA (models/lora.py, models/peft.py, the trainer's frozen base): exact at step 0, gradients of the
merged weights, only adapters train, the reference is the base, PEFT files in and out of real `peft`."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from model_fixtures import family_config, left_padded_batch, make_hf_model, random_params, torch_logits

from grpo_jax.config import load_config
from grpo_jax.models import lora, transformer
from grpo_jax.models.hf import load_hf
from grpo_jax.models.peft import load_peft, save_peft
from grpo_jax.rollout import SamplingParams, generate
from grpo_jax.trainer import assemble_batch, completion_logprobs, init_train_state, make_steps

SPEC = lora.LoraSpec(rank=4, alpha=8.0, dropout=0.0, weights=lora.target_weights(["all-linear"]))


def trained_adapters(params, spec=SPEC, seed=3, std=0.05):
    """Adapters as after some training: b no longer zero."""
    fresh = lora.init_adapters(params, spec, jax.random.PRNGKey(seed))
    keys = iter(jax.random.split(jax.random.PRNGKey(seed + 1), len(jax.tree.leaves(fresh))))
    return jax.tree.map(lambda x: x + std * jax.random.normal(next(keys), x.shape), fresh)


def rel_norm(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


@pytest.mark.parametrize("family", ["qwen2", "gemma2", "llama"])
def test_step0_is_the_base_and_gradients_are_the_merged_weights(family):
    """qwen2: biases, tied; gemma2: post norms, GeGLU, soft-caps; llama: untied, MHA. Every linear adapted,
    including the MLP's hand-written backward pass."""
    config = family_config(family, attention_impl="dense")
    params = random_params(config)
    tokens, mask = map(jnp.asarray, left_padded_batch(lengths=(21, 9, 26)))
    positions = transformer.positions_from_mask(mask)
    logits = jax.jit(lambda p: transformer.apply(config, p, tokens, positions, mask)[0])

    fresh = lora.init_adapters(params, SPEC, jax.random.PRNGKey(0))
    assert all(not np.any(pair["b"]) and np.any(pair["a"]) for pair in fresh["layers"].values())
    np.testing.assert_array_equal(logits(lora.combine(params, fresh, SPEC)), logits(params))

    adapters = trained_adapters(params)
    cot = jax.random.normal(jax.random.PRNGKey(7), tokens.shape + (config.vocab_size,)) * mask[..., None]

    def loss(adapters, assemble):
        return jnp.sum(transformer.apply(config, assemble(params, adapters, SPEC), tokens, positions, mask)[0] * cot)

    ours, ours_grads = jax.jit(jax.value_and_grad(lambda a: loss(a, lora.combine)))(adapters)
    merged, merged_grads = jax.jit(jax.value_and_grad(lambda a: loss(a, lora.merge)))(adapters)
    np.testing.assert_allclose(ours, merged, rtol=1e-4)
    assert abs(float(ours) - float(loss(fresh, lora.merge))) > 1e-2 * abs(float(ours))  # the adapters matter
    for (path, g), m in zip(jax.tree_util.tree_flatten_with_path(ours_grads)[0], jax.tree.leaves(merged_grads)):
        assert np.linalg.norm(m) > 0 and rel_norm(g, m) < 5e-5, (family, jax.tree_util.keystr(path), rel_norm(g, m))


def test_dropout_masks_the_adapter_input_in_training_passes_only():
    config = family_config("qwen2", attention_impl="dense")
    params = random_params(config)
    spec = dataclasses.replace(SPEC, dropout=0.5)
    adapters = trained_adapters(params, spec)
    tokens, mask = map(jnp.asarray, left_padded_batch(lengths=(12, 9, 14)))
    positions = transformer.positions_from_mask(mask)
    run = jax.jit(lambda a, key: transformer.apply(config, lora.combine(params, a, spec, key), tokens, positions,
                                                   mask)[0])
    plain = lora.combine(params, adapters, spec)  # no key: no dropout (rollout, reference, evaluation)
    assert all(w.key is None for w in plain["layers"].values() if isinstance(w, lora.LoraWeight))
    no_drop = np.asarray(transformer.apply(config, plain, tokens, positions, mask)[0])
    first, again = run(adapters, jax.random.PRNGKey(1)), run(adapters, jax.random.PRNGKey(1))
    np.testing.assert_array_equal(first, again)  # a key gives its masks
    assert not np.allclose(first, no_drop) and not np.allclose(first, run(adapters, jax.random.PRNGKey(2)))
    grads = jax.grad(lambda a: jnp.sum(run(a, jax.random.PRNGKey(1)) ** 2))(adapters)
    assert all(np.isfinite(g).all() and np.any(g) for g in jax.tree.leaves(grads))


def test_rollout_with_adapters_equals_rollout_with_merged_weights():
    config = family_config("qwen2", attention_impl="dense")
    params = random_params(config)
    adapters = trained_adapters(params, std=0.2)
    tokens, mask = left_padded_batch(lengths=(12, 5, 9))
    decoder = transformer.Decoder(config)
    sampling = SamplingParams(max_new_tokens=12, temperature=0.0, stop_token_ids=(), pad_token_id=0)
    runs = [generate(decoder, decoder.init_cache, p, tokens, mask, jax.random.PRNGKey(0), sampling)
            for p in (lora.combine(params, adapters, SPEC), lora.merge(params, adapters, SPEC), params)]
    np.testing.assert_array_equal(np.asarray(runs[0].tokens), np.asarray(runs[1].tokens))
    assert not np.array_equal(np.asarray(runs[0].tokens), np.asarray(runs[2].tokens))  # the adapters matter


def test_update_trains_only_adapters_and_the_reference_is_the_base(tmp_path):
    """The jitted GRPO steps under LoRA: beta > 0 and two iterations (so old log-probs are computed too)."""
    config = family_config("qwen2", attention_impl="dense")
    base = random_params(config)
    cfg = load_config(None, ["model.lora_rank=4", "model.lora_alpha=8", "grpo.beta=0.04", "grpo.num_iterations=2",
                             "rollout.max_completion_length=6", "optim.learning_rate=0.01"])
    spec = lora.LoraSpec.from_config(cfg.model)
    assert spec == SPEC
    optimizer = optax.adam(0.01)
    adapters = lora.init_adapters(base, spec, jax.random.PRNGKey(0))
    state = init_train_state(adapters, optimizer, jax.random.PRNGKey(0), keep_reference=False)
    assert state.ref_params is None
    steps = make_steps(transformer.Decoder(config), optimizer, cfg)
    tokens, mask = left_padded_batch(lengths=(12, 9, 14, 10))
    rng = np.random.default_rng(0)
    batch = assemble_batch(tokens, mask, rng.integers(1, config.vocab_size, (4, 6)), np.ones((4, 6), bool),
                           np.array([1.0, -1.0, 0.5, -0.5], np.float32))
    with pytest.raises(ValueError, match="frozen base"):
        steps.update(state, batch)
    base_before = jax.tree.map(np.array, base)

    batch = steps.reference_and_old_logps(state, batch, frozen=base)
    np.testing.assert_array_equal(batch.ref_logp, completion_logprobs(transformer.Decoder(config), base, batch, 1.0))
    np.testing.assert_array_equal(batch.old_logp, batch.ref_logp)  # step 0: the adapted model is the base
    before = jax.tree.map(np.array, state.params)
    for _ in range(2):
        state, metrics = steps.update(state, batch, frozen=base)
    assert metrics["grad_norm"] > 0 and metrics["update_skipped"] == 0
    for leaf, old in zip(jax.tree.leaves(state.params), jax.tree.leaves(before)):
        assert not np.array_equal(leaf, old)
    for leaf, old in zip(jax.tree.leaves(base), jax.tree.leaves(base_before)):  # alive (not donated), unchanged
        np.testing.assert_array_equal(leaf, old)
    later = steps.reference_and_old_logps(state, batch._replace(ref_logp=None, old_logp=None), frozen=base)
    np.testing.assert_array_equal(later.ref_logp, batch.ref_logp)  # the reference stays the base
    assert not np.allclose(later.old_logp, batch.ref_logp)  # the policy moved


def test_peft_folder_loads_in_peft_with_our_logits_and_reads_back(tmp_path):
    """Gemma 2 (the end-to-end test below exports a Qwen2): GeGLU, pre + post norms, soft-caps."""
    import peft
    import torch
    import transformers

    folder, _ = make_hf_model("gemma2", tmp_path / "base")
    model, config = load_hf(folder, attention_impl="dense")
    params = jax.tree.map(jnp.asarray, model.params())
    spec = dataclasses.replace(SPEC, weights=lora.target_weights(["q_proj", "v", "o", "down"]))  # some, by both names
    adapters = trained_adapters(params, spec, std=0.3)
    out = save_peft(tmp_path / "adapter", adapters, spec, config, base_model=str(folder))

    base = transformers.AutoModelForCausalLM.from_pretrained(str(folder), torch_dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(base, str(out)).eval()
    tokens, mask = left_padded_batch(lengths=(11, 7, 13))
    valid = mask.astype(bool)

    def ours(decoder_params):
        ids, m = jnp.asarray(tokens), jnp.asarray(mask)
        logits, _ = transformer.apply(config, decoder_params, ids, transformer.positions_from_mask(m), m)
        return np.asarray(logits)[valid]

    reference = torch_logits(theirs, tokens, mask)[valid]
    assert np.abs(ours(params) - reference).max() > 1e-2  # the adapter changes the logits
    np.testing.assert_allclose(ours(lora.combine(params, adapters, spec)), reference, atol=1e-4, rtol=1e-4)

    back = load_peft(out, config)
    assert (back.rank, back.alpha, back.weights, back.base_model) == (spec.rank, spec.alpha, spec.weights, str(folder))
    for a, b in zip(jax.tree.leaves(back.adapters), jax.tree.leaves(adapters)):
        np.testing.assert_array_equal(a, np.asarray(b))

    # and in: an adapter PEFT made itself (random B, as after training), read into ours
    base = transformers.AutoModelForCausalLM.from_pretrained(str(folder), torch_dtype=torch.float32)
    made = peft.get_peft_model(base, peft.LoraConfig(r=3, lora_alpha=5, target_modules="all-linear",
                                                     init_lora_weights=False, task_type="CAUSAL_LM")).eval()
    made.save_pretrained(str(tmp_path / "made"))
    read = load_peft(tmp_path / "made", config)
    assert (read.rank, read.alpha, read.weights) == (3, 5.0, tuple(lora.TARGETS.values()))
    read_spec = lora.LoraSpec(read.rank, read.alpha, 0.0, read.weights)
    np.testing.assert_allclose(ours(lora.combine(params, jax.tree.map(jnp.asarray, read.adapters), read_spec)),
                               torch_logits(made, tokens, mask)[valid], atol=1e-4, rtol=1e-4)


def test_adapter_shardings_follow_their_weights():
    from grpo_jax import sharding

    config = family_config("qwen2", attention_impl="dense")
    from grpo_jax.config import MeshConfig

    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    abstract = transformer.abstract_model(config)
    base_shardings = transformer.param_shardings(abstract, mesh, sharding.DEFAULT_RULES)
    params = random_params(config)
    where = lora.adapter_shardings(lora.init_adapters(params, SPEC, jax.random.PRNGKey(0)), base_shardings)
    for name, pair in where["layers"].items():
        spec = tuple(base_shardings["layers"][name].spec) + (None,) * 4
        n_in = lora.IN_AXES.get(name, 1)
        assert tuple(pair["a"].spec)[: 1 + n_in] == spec[: 1 + n_in] and pair["a"].spec[1 + n_in] is None
        assert pair["b"].spec[0] == spec[0] and pair["b"].spec[1] is None
        assert tuple(pair["b"].spec)[2:] == spec[1 + n_in: len(pair["b"].spec) - 1 + n_in]
    assert any(s is not None for pair in where["layers"].values() for s in (*pair["a"].spec, *pair["b"].spec))


def test_lora_run_checkpoints_adapters_evaluates_exports_and_continues(tiny_model, tmp_path):
    """`train` with LoRA (bfloat16 base, beta > 0): checkpoints hold the adapters and their optimizer state
    only; `eval --run` scores base + adapters as the run's final evaluation did; `export --run` writes a
    PEFT folder that real `peft` loads onto the HF base with the logits of the `--merge` export; a new run
    starts from the PEFT folder (model.lora_init_from) with those adapters."""
    import json

    import peft
    import torch
    import transformers
    from runs import final_state, launch
    from tiny import target_config

    from grpo_jax.checkpoint import Checkpointer, checkpoint_params
    from grpo_jax.config import CheckpointConfig
    from grpo_jax.loop import train
    from grpo_jax.policy import Policy

    run_dir = tmp_path / "run"
    args = target_config(tiny_model, run_dir, "--run.steps=3", "--grpo.beta=0.04", "--model.lora_rank=4",
                         "--model.lora_base_dtype=bfloat16", "--optim.learning_rate=0.1", "--checkpoint.every_steps=1")
    summary = train(load_config(None, args))
    assert summary["history"][-1]["kl"] > 0  # the policy moved away from the base, its reference

    step, leaves = final_state(run_dir)
    base = load_hf(tiny_model)[0].params()
    adapter_size = sum(x.size for x in jax.tree.leaves(lora.init_adapters(base, SPEC, jax.random.PRNGKey(0))))
    saved = sum(x.size for x in leaves)  # adapters + Adam's two moments, + step, rng and Adam's count
    assert step == 3 and 3 * adapter_size <= saved <= 3 * adapter_size + 8, (saved, adapter_size)
    assert not {x.shape for x in leaves} & {x.shape for x in jax.tree.leaves(base)}  # no base weight inside
    ckpt = Checkpointer(run_dir, CheckpointConfig(), read_only=True)
    assert ckpt.read_meta(3)["lora_base"] == str(tiny_model)
    ckpt.close()

    out = launch("eval", *args, "--run", run_dir, "--max-examples", "8", "--json", tmp_path / "e.json")
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((tmp_path / "e.json").read_text())["eval/pass@1"] == summary["after"]["eval/pass@1"]

    for flags, where in ((("--lora-format", "peft"), "adapter"), (("--merge",), "merged")):
        out = launch("export", "--run", run_dir, *flags, "--out", tmp_path / where)
        assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    assert not (tmp_path / "adapter" / "config.json").exists()
    ids = torch.tensor([[5, 17, 33, 42, 8, 60, 2]])
    with torch.no_grad():
        base = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_model), torch_dtype=torch.float32)
        plain = base(ids).logits
        with_adapter = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()(ids).logits
        merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"),
                                                                   torch_dtype=torch.float32).eval()(ids).logits
    assert (with_adapter - plain).abs().max() > 1e-3  # trained adapters
    # the merged export sums into the bfloat16 base the run trained on; PEFT adds onto the float32 original
    np.testing.assert_allclose(merged.numpy(), with_adapter.numpy(), atol=0.05 * float(plain.abs().max()))

    again = load_config(None, target_config(
        tiny_model, tmp_path / "again", "--model.lora_rank=4", f"--model.lora_init_from={tmp_path / 'adapter'}"))
    started = Policy.load(again).initial_adapters(jax.random.PRNGKey(0))
    trained, _ = checkpoint_params(run_dir)
    for a, b in zip(jax.tree.leaves(started), jax.tree.leaves(trained)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    wrong = load_config(None, target_config(
        tiny_model, tmp_path / "wrong", "--model.lora_rank=8", f"--model.lora_init_from={tmp_path / 'adapter'}"))
    with pytest.raises(Exception, match="rank 4"):
        Policy.load(wrong).initial_adapters(jax.random.PRNGKey(0))


def test_lora_settings_are_checked_with_one_line_errors():
    from grpo_jax.config import ConfigError

    cfg = load_config(None, ["model.lora_rank=8", "model.lora_targets=[q_proj,v,gate]"])
    spec = lora.LoraSpec.from_config(cfg.model)
    assert spec.weights == ("wq", "wv", "w_gate") and spec.scale == 2.0  # alpha defaults to 2 x rank
    assert lora.LoraSpec.from_config(load_config(None, ["model.lora_alpha=4"]).model) is None  # rank 0: off
    for flags, needle in ((["model.lora_rank=8", "model.lora_targets=[qkv]"], "lora_targets: qkv"),
                          (["model.lora_rank=8", "model.lora_dropout=1.0"], "lora_dropout"),
                          (["model.lora_rank=-1"], "lora_rank=-1"),
                          (["model.lora_rank=8", "model.lora_alpha=0"], "lora_alpha"),
                          (["model.lora_init_from=/x"], "lora_rank=0"),
                          (["model.lora_rank=8", "grpo.beta=0.04", "grpo.ref_sync_steps=10"], "ref_sync_steps")):
        with pytest.raises(ConfigError, match=needle) as e:
            load_config(None, flags)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="not a PEFT adapter folder"):
        load_peft("/nonexistent", family_config("qwen2"))
