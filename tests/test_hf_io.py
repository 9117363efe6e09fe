"""Parity with transformers for every family, HF import/export, converted checkpoints, bad input."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from model_fixtures import (  # noqa: E402
    FAMILIES,
    greedy_decode,
    hf_positions,
    left_padded_batch,
    make_hf_model,
    max_diff_valid,
    ours_logits,
    torch_greedy,
    torch_logits,
)

from grpo_jax.models import (  # noqa: E402
    ModelLoadError,
    check_tokenizer,
    config_from_hf,
    export_hf,
    hf_config_from,
    load_hf,
)
from grpo_jax.models.hf import SafetensorsFile, load_converted, save_converted, save_safetensors  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_NEW = 16


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """family -> (folder, torch model); built lazily, shared by the tests of this module."""
    cache = {}

    def get(family):
        if family not in cache:
            folder = tmp_path_factory.mktemp(family)
            cache[family] = make_hf_model(family, folder)
        return cache[family]

    return get


def one_line(err: BaseException) -> str:
    msg = str(err)
    assert msg and "\n" not in msg, repr(msg)
    return msg


# ---------------------------------------------------------------------------- parity


# A config change that must change the logits (guards against a feature silently doing nothing).
FEATURE_SWITCH = {
    "llama3": dict(rope_type="default"),
    "mistral": dict(sliding_window=None),
    "qwen2": dict(rope_type="default"),
    "gemma2": dict(attn_logit_softcap=None),
    "gemma3": dict(rope_local_theta=None),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_matches_transformers(family, hf_models):
    folder, tm = hf_models(family)
    model, cfg = load_hf(folder)
    tokens, mask = left_padded_batch(lengths=(7, 3, 9))
    ref = torch_logits(tm, tokens, mask)
    ours = ours_logits(model, tokens, mask)
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    assert max_diff_valid(ref, ours, mask) < 1e-4

    ids, _ = greedy_decode(model, tokens, mask, N_NEW)
    ref_ids = torch_greedy(tm, tokens, mask, N_NEW)
    np.testing.assert_array_equal(ids, ref_ids)

    if family in FEATURE_SWITCH:
        from flax import nnx

        from grpo_jax.models import Transformer

        other = nnx.merge(nnx.graphdef(Transformer(cfg.replace(**FEATURE_SWITCH[family]), rngs=nnx.Rngs(0))),
                          nnx.state(model))
        assert max_diff_valid(ref, ours_logits(other, tokens, mask), mask) > 1e-3


@pytest.mark.parametrize("family", ["llama3", "qwen2", "gemma2"])
def test_gradients_match_torch_autograd(family, hf_models, tmp_path):
    """d(sum of next-token log-probs)/d(every weight) equals torch's, read back in HF names via export_hf.

    Guards the hand-written MLP backward (silu for llama / qwen, gelu-tanh for gemma) and
    every other gradient path of the decoder against an independent implementation.
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from grpo_jax.models import forward, positions_from_mask
    from grpo_jax.models.hf import SafetensorsFile

    folder, tm = hf_models(family)
    model, cfg = load_hf(folder)
    tokens, mask = left_padded_batch(lengths=(7, 3, 9))
    valid = mask[:, 1:] * mask[:, :-1]

    tm.zero_grad()
    logits = tm(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long),
                position_ids=torch.tensor(hf_positions(mask), dtype=torch.long)).logits
    targets = torch.tensor(tokens[:, 1:, None], dtype=torch.long)
    logp = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, targets)
    (logp[..., 0] * torch.tensor(valid)).sum().backward()

    graphdef, state = nnx.split(model)

    def loss(state):
        out, _ = forward(graphdef, state, jnp.asarray(tokens), positions_from_mask(mask), jnp.asarray(mask))
        lp = jnp.take_along_axis(jax.nn.log_softmax(out[:, :-1]), jnp.asarray(tokens)[:, 1:, None], -1)[..., 0]
        return jnp.sum(lp * valid)

    grads = jax.jit(jax.grad(loss))(state)
    export_hf(grads, cfg, tmp_path / "grads")
    ours = SafetensorsFile(tmp_path / "grads" / "model.safetensors")
    checked = 0
    for name, p in tm.named_parameters():
        ref = p.grad.double().numpy()
        got = np.asarray(ours.get(name), np.float64)
        scale = max(1.0, np.abs(ref).max())
        assert np.abs(got - ref).max() < 2e-4 * scale, (name, np.abs(got - ref).max(), scale)
        checked += 1
    assert checked == len(list(tm.parameters())) and any("mlp.gate_proj" in n for n, _ in tm.named_parameters())


def test_family_features_parsed(hf_models):
    cfg = load_hf(hf_models("gemma2")[0])[1]
    assert cfg.norm_style == "gemma" and cfg.post_norms and cfg.attn_logit_softcap == 5.0
    assert cfg.final_logit_softcap == 3.0 and cfg.sliding_layers == (True, False, True)
    assert abs(cfg.embed_scale - 8.0) < 1e-9 and cfg.attn_scale == 24 ** -0.5
    cfg = load_hf(hf_models("gemma3")[0])[1]
    assert cfg.qk_norm and cfg.rope_local_theta == 10000.0 and cfg.rope_theta == 1e6
    assert cfg.rope_type == "linear" and cfg.rope_factor == 8.0 and cfg.sliding_layers == (True, True, False)
    assert cfg.attn_logit_softcap is None
    cfg = load_hf(hf_models("qwen2")[0])[1]
    assert cfg.qkv_bias and not cfg.o_bias and cfg.tie_word_embeddings
    cfg = load_hf(hf_models("qwen3")[0])[1]
    assert cfg.qk_norm and cfg.head_dim == 32 and cfg.hidden_size // cfg.num_heads == 16


def test_bf16_runs(hf_models):
    folder, tm = hf_models("llama3")
    model, cfg = load_hf(folder, dtype="bfloat16")
    assert cfg.param_dtype == cfg.compute_dtype == "bfloat16"
    tokens, mask = left_padded_batch()
    ref = torch_logits(tm, tokens, mask)
    ours = ours_logits(model, tokens, mask)
    assert ours.dtype == np.float32 and np.isfinite(ours).all()
    assert max_diff_valid(ref, ours, mask) < 0.15 * max(1.0, np.abs(ref).max())
    ids, _ = greedy_decode(model, tokens, mask, 4)
    assert ids.shape == (3, 4)


# ---------------------------------------------------------------------------- export


@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_roundtrip(family, hf_models, tmp_path):
    folder, tm = hf_models(family)
    model, cfg = load_hf(folder)
    out = export_hf(model, cfg, tmp_path / "export")
    hf_cfg = json.loads((out / "config.json").read_text())
    assert hf_cfg["model_type"] == cfg.model_type and hf_cfg["architectures"]
    assert hf_cfg["torch_dtype"] == "float32"
    back = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert type(back).__name__ == type(tm).__name__
    tokens, mask = left_padded_batch()
    assert max_diff_valid(torch_logits(tm, tokens, mask), torch_logits(back, tokens, mask), mask) < 1e-5
    # and our config survives hf_config_from -> config_from_hf
    assert config_from_hf(hf_config_from(cfg)) == cfg


def test_sharded_export_and_load(hf_models, tmp_path):
    folder, tm = hf_models("qwen3")
    model, cfg = load_hf(folder)
    out = export_hf(model.params(), cfg, tmp_path / "sharded", max_shard_size="40KB", dtype="bfloat16")
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 2 and (out / "model.safetensors.index.json").exists()
    assert not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    back = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    tokens, mask = left_padded_batch()
    ref = torch_logits(tm, tokens, mask)
    assert max_diff_valid(ref, torch_logits(back, tokens, mask), mask) < 0.1
    # our loader reads the indexed shards too (bf16 on disk -> f32 params)
    again, _ = load_hf(out)
    assert max_diff_valid(torch_logits(back, tokens, mask), ours_logits(again, tokens, mask), mask) < 1e-4


def test_export_with_tokenizer(hf_models, tmp_path):
    folder, _ = hf_models("llama")
    tok = make_tokenizer(50)
    tok.save_pretrained(str(folder))
    model, cfg = load_hf(folder)
    out = export_hf(model, cfg, tmp_path / "with_tok", tokenizer=folder)
    loaded = transformers.AutoTokenizer.from_pretrained(str(out))
    assert loaded("a b c")["input_ids"] == tok("a b c")["input_ids"]


# ---------------------------------------------------------------------------- sharded loading

SHARDED_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
    from model_fixtures import left_padded_batch, ours_logits
    from grpo_jax.models import load_hf, param_shardings
    assert jax.device_count() == 8, jax.devices()
    mesh = jax.make_mesh((2, 4), ("fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    rules = {{"embed": "fsdp", "heads": "tensor", "kv_heads": "tensor", "mlp": "tensor", "vocab": "tensor"}}
    model, cfg = load_hf({folder!r}, shardings=lambda cfg, abstract: param_shardings(abstract, mesh, rules))
    p = model.params()
    wq = p["layers"]["wq"]
    assert len(wq.sharding.device_set) == 8, wq.sharding
    shard_shapes = sorted({{s.data.shape for s in wq.addressable_shards}})
    assert shard_shapes == [(wq.shape[0], wq.shape[1] // 2, wq.shape[2] // 4, wq.shape[3])], shard_shapes
    ref_model, _ = load_hf({folder!r})
    tokens, mask = left_padded_batch()
    gathered = jax.tree.map(lambda a: np.asarray(a), p)
    ref = jax.tree.map(lambda a: np.asarray(a), ref_model.params())
    same = jax.tree.map(lambda a, b: bool((a == b).all()), gathered, ref)
    assert all(jax.tree.leaves(same)), same
    a = ours_logits(ref_model, tokens, mask)
    # explicit-axes params: run the forward with GSPMD propagation inside auto_axes
    from flax import nnx
    from grpo_jax.models import forward, positions_from_mask
    g, st = nnx.split(model)
    with jax.set_mesh(mesh):
        f = jax.jit(jax.sharding.auto_axes(lambda st, t, pp, m: forward(g, st, t, pp, m)[0],
                                           out_sharding=jax.sharding.PartitionSpec()))
        b = np.asarray(f(st, tokens, positions_from_mask(mask), mask))
    print(json.dumps({{"max_diff": float(np.abs(a - b).max()), "spec": str(wq.sharding.spec)}}))
""")


def test_sharded_loading_8_devices(hf_models, tmp_path):
    folder, _ = hf_models("llama3")  # 8 heads / 2 kv heads
    # shard the file set too, so the loader also goes through the index
    model, cfg = load_hf(folder)
    sharded = export_hf(model, cfg, tmp_path / "sh", max_shard_size="60KB")
    script = SHARDED_SCRIPT.format(root=ROOT, tests=os.path.join(ROOT, "tests"), folder=str(sharded))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["max_diff"] < 1e-5, out


# ---------------------------------------------------------------------------- converted checkpoints / CLI


def test_convert_and_export_cli(hf_models, tmp_path):
    from launch import convert, export

    folder, tm = hf_models("gemma2")
    tok = make_tokenizer(40)
    tok.save_pretrained(str(folder))

    p = argparse.ArgumentParser()
    convert.add_arguments(p)
    args = p.parse_args(["--hf", str(folder), "--out", str(tmp_path / "ckpt")])
    assert convert.main(args) == 0
    assert (tmp_path / "ckpt" / "model_config.json").exists()
    assert (tmp_path / "ckpt" / "tokenizer" / "tokenizer.json").exists()
    model, cfg = load_converted(tmp_path / "ckpt")
    assert cfg.model_type == "gemma2"
    tokens, mask = left_padded_batch()
    ref = torch_logits(tm, tokens, mask)
    assert max_diff_valid(ref, ours_logits(model, tokens, mask), mask) < 1e-4

    p = argparse.ArgumentParser()
    export.add_arguments(p)
    args = p.parse_args(["--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")])
    assert export.main(args) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    assert max_diff_valid(ref, torch_logits(back, tokens, mask), mask) < 1e-5
    assert transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))("a b")["input_ids"] == tok("a b")[
        "input_ids"]

    p = argparse.ArgumentParser()
    convert.add_arguments(p)
    with pytest.raises(SystemExit):  # --hf and --gguf are mutually exclusive
        p.parse_args(["--hf", "x", "--gguf", "y", "--out", "z"])


def test_load_converted_errors(tmp_path):
    with pytest.raises(ModelLoadError) as e:
        load_converted(tmp_path)
    assert "not a converted checkpoint" in one_line(e.value)


def test_save_converted_roundtrip_bf16(hf_models, tmp_path):
    folder, _ = hf_models("qwen2")
    model, cfg = load_hf(folder, dtype="bfloat16")
    save_converted(tmp_path / "c", model, cfg)
    again, cfg2 = load_converted(tmp_path / "c")
    assert cfg2 == cfg
    a, b = model.params(), again.params()
    assert b["layers"]["wq"].dtype == np.dtype("bfloat16")
    np.testing.assert_array_equal(np.asarray(a["layers"]["bq"], np.float32), np.asarray(b["layers"]["bq"], np.float32))


# ---------------------------------------------------------------------------- bad input


@pytest.fixture
def llama_copy(hf_models, tmp_path):
    folder, _ = hf_models("llama")
    dst = tmp_path / "copy"
    shutil.copytree(folder, dst)
    return dst


def test_missing_safetensors(llama_copy):
    (llama_copy / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError) as e:
        load_hf(llama_copy)
    assert "no safetensors" in one_line(e.value)


def test_corrupt_safetensors(llama_copy):
    path = llama_copy / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:8] + b"{not json" + data[17:])
    with pytest.raises(ModelLoadError) as e:
        load_hf(llama_copy)
    assert "corrupt" in one_line(e.value)
    path.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ModelLoadError) as e:
        load_hf(llama_copy)
    assert "corrupt" in one_line(e.value)


def test_missing_shard(hf_models, tmp_path):
    folder, _ = hf_models("llama")
    model, cfg = load_hf(folder)
    out = export_hf(model, cfg, tmp_path / "s", max_shard_size="50KB")
    victim = sorted(out.glob("model-*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(ModelLoadError) as e:
        load_hf(out)
    assert victim.name in one_line(e.value)


def test_unsupported_model_type(llama_copy):
    cfg = json.loads((llama_copy / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (llama_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError) as e:
        load_hf(llama_copy)
    msg = one_line(e.value)
    assert "gpt2" in msg and all(t in msg for t in ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text"))
    with pytest.raises(ValueError):
        config_from_hf({"model_type": "falcon"})


def _rewrite(folder, fn):
    f = SafetensorsFile(folder / "model.safetensors")
    tensors = {k: np.array(f.get(k)) for k in f.keys()}
    del f
    fn(tensors)
    save_safetensors(folder / "model.safetensors", tensors)


def test_shape_mismatch(llama_copy):
    name = "model.layers.1.mlp.up_proj.weight"
    _rewrite(llama_copy, lambda t: t.__setitem__(name, t[name][:-1]))
    with pytest.raises(ModelLoadError) as e:
        load_hf(llama_copy)
    msg = one_line(e.value)
    assert name in msg and "[128, 64]" in msg and "[127, 64]" in msg


def test_missing_tensor(llama_copy):
    name = "model.layers.0.self_attn.k_proj.weight"
    _rewrite(llama_copy, lambda t: t.pop(name))
    with pytest.raises(ModelLoadError) as e:
        load_hf(llama_copy)
    assert name in one_line(e.value)


def test_missing_folder_and_offline_hub(tmp_path):
    with pytest.raises(ModelLoadError) as e:
        load_hf(tmp_path / "nope")
    assert "does not exist" in one_line(e.value)
    with pytest.raises(ModelLoadError) as e:
        load_hf(tmp_path)
    assert "config.json" in one_line(e.value)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    script = ("import sys; sys.path.insert(0, %r)\nfrom grpo_jax.models.hf import load_hf, ModelLoadError\n"
              "try:\n    load_hf('someone/not-a-real-model-xyz')\nexcept ModelLoadError as e:\n    print(e)\n") % ROOT
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 1 and "not-a-real-model-xyz" in lines[0] and "offline" in lines[0]


def make_tokenizer(n_words: int):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<unk>": 1, "<eos>": 2}
    for i in range(n_words):
        vocab[chr(ord("a") + i % 26) * (1 + i // 26)] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>",
                                                eos_token="<eos>")


def test_tokenizer_vocab_check(hf_models):
    _, cfg = load_hf(hf_models("llama")[0])
    check_tokenizer(make_tokenizer(cfg.vocab_size - 3), cfg)  # exactly fits
    with pytest.raises(ModelLoadError) as e:
        check_tokenizer(make_tokenizer(cfg.vocab_size), cfg)
    msg = one_line(e.value)
    assert str(cfg.vocab_size) in msg and str(cfg.vocab_size + 3) in msg
