"""Hugging Face interop: config.json <-> TransformerConfig, safetensors <-> params.

* :func:`config_from_hf` / :func:`hf_config_from`: config translation per ``model_type``
  (llama, mistral, qwen2, qwen3, gemma2, gemma3_text; ``gemma3`` multimodal configs
  load their text model).
* :func:`load_hf` -> ``(model, config)``: an ``nnx`` :class:`Transformer` whose params are
  read from (single or sharded + indexed) safetensors; with ``shardings`` every param is
  built shard by shard with ``jax.make_array_from_callback`` from memory-mapped files.
* :func:`export_hf`: params -> a folder ``transformers.AutoModelForCausalLM`` loads.
* :func:`save_converted` / :func:`load_converted`: the Orbax params checkpoint written
  by ``python -m launch convert`` (``DIR/params``, ``DIR/model_config.json``, ``DIR/tokenizer``).

Safetensors are read and written by a small dependency-free implementation (memory
mapped, bfloat16 through ml_dtypes) so torch is never needed at runtime.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from grpo_jax.models.transformer import Transformer, TransformerConfig, abstract_model, unflatten_paths

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "gemma3")

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}

SCORE_HEAD = "score.weight"  # a value model's head (*ForSequenceClassification, one label): [1, D]

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


class ModelLoadError(ValueError):
    """A model could not be loaded or converted; the message is one line."""


# ============================================================================ safetensors

_ST_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


class SafetensorsFile:
    """Memory-mapped reader of one .safetensors file; ``get(name)`` is a lazy numpy view."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        try:
            size = os.path.getsize(self.path)
        except OSError as e:
            raise ModelLoadError(f"cannot read safetensors file {self.path}: {e.strerror}") from None
        try:
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise ValueError("file shorter than its header")
                (n,) = struct.unpack("<Q", head)
                if n > size - 8:
                    raise ValueError("header length beyond end of file")
                header = json.loads(f.read(n))
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
            self.data_start = 8 + n
            self.metadata = header.pop("__metadata__", None) or {}
            self.entries = {}
            for name, e in header.items():
                dtype = _ST_DTYPES.get(e["dtype"])
                if dtype is None:
                    raise ValueError(f"tensor {name} has unsupported dtype {e['dtype']}")
                start, end = (int(x) for x in e["data_offsets"])
                shape = tuple(int(s) for s in e["shape"])
                if end - start != math.prod(shape) * dtype.itemsize or end > size - self.data_start or start < 0:
                    raise ValueError(f"tensor {name} has inconsistent offsets")
                self.entries[name] = (dtype, shape, start, end)
        except ModelLoadError:
            raise
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise ModelLoadError(f"corrupt safetensors file {self.path}: {str(e).splitlines()[0]}") from None
        self._mm = np.memmap(self.path, dtype=np.uint8, mode="r") if size > 0 else None

    def keys(self):
        return self.entries.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def get(self, name: str) -> np.ndarray:
        dtype, shape, start, end = self.entries[name]
        raw = self._mm[self.data_start + start : self.data_start + end]
        return raw.view(dtype).reshape(shape)


def save_safetensors(path: str | os.PathLike, tensors: dict[str, np.ndarray], metadata: dict | None = None):
    """Write tensors (numpy arrays, any of the safetensors dtypes) to ``path``."""
    header: dict[str, Any] = {}
    offset = 0
    arrays = {}
    for name, arr in tensors.items():
        arr = np.asarray(arr)
        if arr.dtype not in _ST_NAMES:
            raise ValueError(f"cannot write dtype {arr.dtype} of {name} to safetensors")
        arrays[name] = arr
        header[name] = {"dtype": _ST_NAMES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    header["__metadata__"] = {"format": "pt", **(metadata or {})}
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    tmp = str(path) + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for arr in arrays.values():
            f.write(np.ascontiguousarray(arr).tobytes())
    os.replace(tmp, path)


class _WeightStore:
    """All tensors of a model folder (single file, index json, or every *.safetensors)."""

    def __init__(self, folder: Path):
        index = folder / "model.safetensors.index.json"
        files: dict[str, SafetensorsFile] = {}
        self.where: dict[str, str] = {}
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                reason = str(e).splitlines()[0] if str(e) else "no weight_map"
                raise ModelLoadError(f"corrupt {index}: {reason}") from None
            for fname in sorted(set(weight_map.values())):
                if not (folder / fname).exists():
                    raise ModelLoadError(f"missing safetensors shard {folder / fname} (listed in {index.name})")
                files[fname] = SafetensorsFile(folder / fname)
            for name, fname in weight_map.items():
                if name in files[fname].entries:
                    self.where[name] = fname
        else:
            paths = [folder / "model.safetensors"] if (folder / "model.safetensors").exists() else sorted(
                folder.glob("*.safetensors"))
            if not paths:
                raise ModelLoadError(
                    f"no safetensors weights in {folder} (expected model.safetensors or model.safetensors.index.json)")
            for p in paths:
                files[p.name] = SafetensorsFile(p)
                for name in files[p.name].keys():
                    self.where[name] = p.name
        self.files = files
        self.folder = folder

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str) -> np.ndarray:
        if name not in self.where:
            raise ModelLoadError(f"missing tensor {name} in {self.folder}")
        return self.files[self.where[name]].get(name)

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self.where:
            raise ModelLoadError(f"missing tensor {name} in {self.folder}")
        return self.files[self.where[name]].shape(name)


# ============================================================================ configs


def _unsupported(model_type) -> ModelLoadError:
    return ModelLoadError(f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")


def _as_dict(hf_config) -> dict:
    if isinstance(hf_config, dict):
        return dict(hf_config)
    if hasattr(hf_config, "to_dict"):
        return hf_config.to_dict()
    if isinstance(hf_config, (str, os.PathLike)):
        p = Path(hf_config)
        p = p / "config.json" if p.is_dir() else p
        return json.loads(p.read_text())
    raise TypeError(f"expected a dict, a transformers config or a path, got {type(hf_config).__name__}")


def _parse_rope(d: dict) -> tuple[dict, dict | None]:
    """-> (global rope params, local rope params or None) in the flat HF rope dict form."""
    rp = d.get("rope_parameters")
    scaling = d.get("rope_scaling")
    glob: dict = {}
    local = None
    if isinstance(rp, dict) and rp:
        if "full_attention" in rp or "sliding_attention" in rp:
            glob = dict(rp.get("full_attention") or {})
            local = dict(rp["sliding_attention"]) if rp.get("sliding_attention") else None
        else:
            glob = dict(rp)
    if isinstance(scaling, dict) and scaling:
        glob = {**glob, **scaling}
    if "rope_theta" in d and d["rope_theta"] is not None:
        glob.setdefault("rope_theta", d["rope_theta"])
    if "type" in glob and "rope_type" not in glob:
        glob["rope_type"] = glob["type"]
    if d.get("rope_local_base_freq") is not None and local is None:
        local = {"rope_type": "default", "rope_theta": d["rope_local_base_freq"]}
    return glob, local


# keys we derive ourselves (not kept in hf_extra)
_DERIVED_KEYS = {
    "model_type", "architectures", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "tie_word_embeddings",
    "attention_bias", "hidden_act", "hidden_activation", "rope_theta", "rope_scaling", "rope_parameters",
    "rope_local_base_freq", "max_position_embeddings", "sliding_window", "layer_types", "use_sliding_window",
    "max_window_layers", "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping",
    "torch_dtype", "dtype", "transformers_version", "_name_or_path", "sliding_window_pattern", "mlp_bias",
    "text_config", "vision_config",
}


def config_from_hf(hf_config, **overrides) -> TransformerConfig:
    """TransformerConfig from an HF config (dict, ``PretrainedConfig``, or path to config.json / folder).

    ``overrides`` replace fields afterwards (e.g. ``param_dtype="bfloat16", remat_policy="full"``).
    """
    d = _as_dict(hf_config)
    mt = d.get("model_type")
    if mt == "gemma3":
        text = dict(d.get("text_config") or {})
        text["model_type"] = "gemma3_text"
        if "tie_word_embeddings" not in text and "tie_word_embeddings" in d:
            text["tie_word_embeddings"] = d["tie_word_embeddings"]
        return config_from_hf(text, **overrides)
    if mt not in SUPPORTED_MODEL_TYPES:
        raise _unsupported(mt)
    gemma = mt in ("gemma2", "gemma3_text")
    try:
        hidden = int(d["hidden_size"])
        heads = int(d["num_attention_heads"])
        layers = int(d["num_hidden_layers"])
        vocab = int(d["vocab_size"])
        inter = int(d["intermediate_size"])
    except (KeyError, TypeError) as e:
        raise ModelLoadError(f"{mt} config lacks required field {e}") from None
    if d.get("mlp_bias"):
        raise ModelLoadError("mlp_bias=True is not supported")
    kv = d.get("num_key_value_heads") or heads
    head_dim = d.get("head_dim") or hidden // heads
    defaults_theta = {"gemma3_text": 1_000_000.0}.get(mt, 10_000.0)
    glob, local = _parse_rope(d)
    rope_type = glob.get("rope_type", "default") or "default"
    if rope_type not in ("default", "linear", "llama3"):
        raise ModelLoadError(f"unsupported rope type {rope_type!r}; supported: default, linear, llama3")
    if glob.get("partial_rotary_factor") not in (None, 1.0):
        raise ModelLoadError("partial_rotary_factor != 1 is not supported")

    # attention pattern
    sliding_window = d.get("sliding_window")
    layer_types = d.get("layer_types")
    if mt in ("qwen2", "qwen3"):
        if not d.get("use_sliding_window", False):
            sliding_window = None
        if sliding_window and layer_types is None:
            mwl = d.get("max_window_layers", 28)
            layer_types = ["sliding_attention" if i >= mwl else "full_attention" for i in range(layers)]
    elif mt == "mistral":
        layer_types = None  # all layers slide when sliding_window is set
    elif mt == "gemma2":
        if layer_types is None:
            layer_types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers)]
    elif mt == "gemma3_text":
        if layer_types is None:
            pattern = d.get("sliding_window_pattern") or 6
            layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]
    else:  # llama
        sliding_window = None
        layer_types = None
    if not sliding_window:
        sliding_window, layer_types = None, None
    if layer_types is not None and all(t == "full_attention" for t in layer_types):
        sliding_window, layer_types = None, None

    attention_bias = bool(d.get("attention_bias", False))
    qkv_bias = mt == "qwen2" or attention_bias
    o_bias = attention_bias and mt != "qwen2"
    activation = d.get("hidden_activation") if gemma else d.get("hidden_act")
    activation = activation or d.get("hidden_act") or ("gelu_pytorch_tanh" if gemma else "silu")
    tie_default = gemma
    extra = {k: v for k, v in d.items() if k not in _DERIVED_KEYS}
    if mt == "gemma3_text" and d.get("attn_logit_softcapping") is not None:
        # transformers' Gemma3 ignores this field; keep it for the round trip only
        extra["attn_logit_softcapping"] = d["attn_logit_softcapping"]
    if mt in ("qwen2", "qwen3") and d.get("max_window_layers") is not None:
        extra["max_window_layers"] = d["max_window_layers"]

    cfg = TransformerConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(kv),
        head_dim=int(head_dim),
        rope_theta=float(glob.get("rope_theta", defaults_theta)),
        rope_type=rope_type,
        rope_factor=float(glob.get("factor", 1.0) or 1.0),
        rope_low_freq_factor=float(glob.get("low_freq_factor", 1.0)),
        rope_high_freq_factor=float(glob.get("high_freq_factor", 4.0)),
        rope_original_max_position=int(glob.get("original_max_position_embeddings", 8192) or 8192),
        rope_local_theta=float(local.get("rope_theta", 10_000.0)) if (local and mt == "gemma3_text") else (
            10_000.0 if mt == "gemma3_text" else None),
        max_position_embeddings=int(d.get("max_position_embeddings") or 4096),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        norm_style="gemma" if gemma else "llama",
        post_norms=gemma,
        qk_norm=mt in ("qwen3", "gemma3_text"),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", tie_default)),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        activation=activation,
        embed_scale=float(hidden) ** 0.5 if gemma else 1.0,
        query_pre_attn_scalar=float(d.get("query_pre_attn_scalar", 256)) if gemma else None,
        attn_logit_softcap=(float(d["attn_logit_softcapping"]) if mt == "gemma2" and d.get("attn_logit_softcapping")
                            else None),
        final_logit_softcap=(float(d["final_logit_softcapping"]) if gemma and d.get("final_logit_softcapping")
                             else None),
        sliding_window=int(sliding_window) if sliding_window else None,
        layer_types=tuple(layer_types) if layer_types is not None else None,
        model_type=mt,
        hf_extra=json.dumps(extra, sort_keys=True),
    )
    if local is not None and local.get("rope_type", "default") not in ("default", None):
        raise ModelLoadError("scaled rope on sliding layers is not supported")
    return cfg.replace(**overrides) if overrides else cfg


def hf_config_from(config: TransformerConfig, torch_dtype: str | None = None) -> dict:
    """HF config.json dict (with architectures, model_type and torch_dtype) for a TransformerConfig."""
    c = config
    mt = c.model_type if c.model_type in ARCHITECTURES else None
    if mt is None:
        raise _unsupported(c.model_type)
    d = dict(c.extra)
    d.update(
        architectures=[ARCHITECTURES[mt]],
        model_type=mt,
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads,
        head_dim=c.head_dim,
        rms_norm_eps=c.rms_norm_eps,
        tie_word_embeddings=c.tie_word_embeddings,
        max_position_embeddings=c.max_position_embeddings,
        rope_theta=c.rope_theta,
    )
    scaling = None
    if c.rope_type == "linear":
        scaling = {"rope_type": "linear", "factor": c.rope_factor}
    elif c.rope_type == "llama3":
        scaling = {"rope_type": "llama3", "factor": c.rope_factor, "low_freq_factor": c.rope_low_freq_factor,
                   "high_freq_factor": c.rope_high_freq_factor,
                   "original_max_position_embeddings": c.rope_original_max_position}
    d["rope_scaling"] = scaling
    gemma = mt in ("gemma2", "gemma3_text")
    d["hidden_activation" if gemma else "hidden_act"] = c.activation
    if mt in ("llama", "qwen3"):
        d["attention_bias"] = bool(c.qkv_bias or c.o_bias)
        if c.qkv_bias != c.o_bias:
            raise ValueError(f"{mt} needs qkv_bias == o_bias")
    if mt == "llama" and c.sliding_window:
        raise ValueError("llama has no sliding window; use model_type mistral")
    if mt == "mistral":
        d["sliding_window"] = c.sliding_window
    if mt in ("qwen2", "qwen3"):
        d["use_sliding_window"] = bool(c.sliding_window)
        d["sliding_window"] = c.sliding_window
        if c.sliding_window:
            d["layer_types"] = list(c.layer_types or ("sliding_attention",) * c.num_layers)
    if gemma:
        q = c.query_pre_attn_scalar if c.query_pre_attn_scalar is not None else c.head_dim
        d["query_pre_attn_scalar"] = int(q) if float(q).is_integer() else q
        d["final_logit_softcapping"] = c.final_logit_softcap
        if mt == "gemma2":
            d["attn_logit_softcapping"] = c.attn_logit_softcap
        d["sliding_window"] = c.sliding_window or d.get("sliding_window") or 4096
        d["layer_types"] = list(c.layer_types or (("sliding_attention" if c.sliding_window else "full_attention"),)
                                * c.num_layers)
        if mt == "gemma3_text":
            d["rope_local_base_freq"] = c.rope_local_theta if c.rope_local_theta is not None else c.rope_theta
    d["torch_dtype"] = torch_dtype or c.param_dtype
    return d


# ============================================================================ weight maps
# our param path -> (HF name relative to the model prefix, kind); "{i}" = layer index.


def hf_weight_names(c: TransformerConfig) -> dict[tuple[str, ...], tuple[str, str]]:
    gemma = c.norm_style == "gemma" or c.post_norms
    m = {
        ("embed",): ("embed_tokens.weight", "copy"),
        ("final_norm",): ("norm.weight", "copy"),
        ("layers", "attn_norm"): ("layers.{i}.input_layernorm.weight", "copy"),
        ("layers", "wq"): ("layers.{i}.self_attn.q_proj.weight", "qkv"),
        ("layers", "wk"): ("layers.{i}.self_attn.k_proj.weight", "qkv"),
        ("layers", "wv"): ("layers.{i}.self_attn.v_proj.weight", "qkv"),
        ("layers", "wo"): ("layers.{i}.self_attn.o_proj.weight", "o"),
        ("layers", "w_gate"): ("layers.{i}.mlp.gate_proj.weight", "T"),
        ("layers", "w_up"): ("layers.{i}.mlp.up_proj.weight", "T"),
        ("layers", "w_down"): ("layers.{i}.mlp.down_proj.weight", "T"),
    }
    if gemma:
        m[("layers", "post_attn_norm")] = ("layers.{i}.post_attention_layernorm.weight", "copy")
        m[("layers", "mlp_norm")] = ("layers.{i}.pre_feedforward_layernorm.weight", "copy")
        m[("layers", "post_mlp_norm")] = ("layers.{i}.post_feedforward_layernorm.weight", "copy")
    else:
        m[("layers", "mlp_norm")] = ("layers.{i}.post_attention_layernorm.weight", "copy")
    if c.qkv_bias:
        m[("layers", "bq")] = ("layers.{i}.self_attn.q_proj.bias", "bias")
        m[("layers", "bk")] = ("layers.{i}.self_attn.k_proj.bias", "bias")
        m[("layers", "bv")] = ("layers.{i}.self_attn.v_proj.bias", "bias")
    if c.o_bias:
        m[("layers", "bo")] = ("layers.{i}.self_attn.o_proj.bias", "copy")
    if c.qk_norm:
        m[("layers", "q_norm")] = ("layers.{i}.self_attn.q_norm.weight", "copy")
        m[("layers", "k_norm")] = ("layers.{i}.self_attn.k_norm.weight", "copy")
    if not c.tie_word_embeddings:
        m[("lm_head",)] = ("lm_head.weight", "T")
    return m


def to_our_layout(arr: np.ndarray, kind: str, shape: tuple[int, ...]) -> np.ndarray:
    """HF layout -> our layout, as a view when numpy can (memmap stays lazy). shape: ours (per layer)."""
    if kind == "copy":
        return arr
    if kind == "T":
        return arr.T
    if kind == "qkv":  # [N*Dh, D] -> [D, N, Dh]
        return arr.T.reshape(shape)
    if kind == "o":  # [D, H*Dh] -> [H, Dh, D]
        return arr.T.reshape(shape)
    if kind == "bias":  # [N*Dh] -> [N, Dh]
        return arr.reshape(shape)
    raise AssertionError(kind)


def to_hf_layout(arr: np.ndarray, kind: str) -> np.ndarray:
    """Our layout -> HF layout."""
    if kind == "copy":
        return arr
    if kind == "T":
        return arr.T
    if kind == "qkv":  # [D, N, Dh] -> [N*Dh, D]
        return arr.reshape(arr.shape[0], -1).T
    if kind == "o":  # [H, Dh, D] -> [D, H*Dh]
        return arr.reshape(-1, arr.shape[-1]).T
    if kind == "bias":
        return arr.reshape(-1)
    raise AssertionError(kind)


def hf_layout_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if kind == "copy":
        return shape
    if kind == "T":
        return shape[::-1]
    if kind == "qkv":
        return (shape[1] * shape[2], shape[0])
    if kind == "o":
        return (shape[2], shape[0] * shape[1])
    if kind == "bias":
        return (shape[0] * shape[1],)
    raise AssertionError(kind)


def _find_prefix(store: _WeightStore) -> tuple[str, str]:
    for prefix, head in (("model.", ""), ("model.language_model.", ""), ("language_model.model.", "language_model."),
                         ("", "")):
        if prefix + "embed_tokens.weight" in store:
            return prefix, head
    raise ModelLoadError(f"missing tensor model.embed_tokens.weight in {store.folder}")


# ============================================================================ loading


def resolve_model_dir(path_or_id: str | os.PathLike) -> Path:
    """A local folder, or a hub id downloaded with huggingface_hub (config, safetensors, tokenizer)."""
    p = Path(path_or_id).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise ModelLoadError(f"{p} is a file; expected a model folder with config.json and safetensors")
    s = str(path_or_id)
    if s.startswith((".", "/", "~")) or s.count("/") > 1 or not re.fullmatch(r"[\w.\-]+(/[\w.\-]+)?", s):
        raise ModelLoadError(f"model folder {s} does not exist")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(repo_id=s, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model",
                                                             "*.txt", "*.jinja"])
    except Exception as e:  # noqa: BLE001 - any hub / network failure becomes one line
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelLoadError(
            f"cannot fetch {s!r} from the Hugging Face hub ({type(e).__name__}: {msg}); when offline, pass a local "
            f"folder") from None
    return Path(local)


def read_hf_config(folder: Path) -> dict:
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise ModelLoadError(f"missing config.json in {folder}")
    try:
        return json.loads(cfg_path.read_text())
    except ValueError as e:
        raise ModelLoadError(f"corrupt {cfg_path}: {str(e).splitlines()[0]}") from None


def _flatten_pure(tree: dict, prefix=()) -> dict[tuple[str, ...], Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten_pure(v, prefix + (str(k),)))
        else:
            out[prefix + (str(k),)] = v
    return out


def _pure(tree) -> dict:
    if isinstance(tree, nnx.Module):
        tree = nnx.state(tree, nnx.Param)
    if isinstance(tree, nnx.State):
        tree = nnx.to_pure_dict(tree)
    return tree


def load_hf(
    path_or_id: str | os.PathLike,
    dtype: Any = None,
    shardings: Any = None,
    **overrides,
) -> tuple[Transformer, TransformerConfig]:
    """Load an HF causal LM folder (or hub id) -> ``(model, config)``.

    dtype: param dtype ("float32" when None); compute_dtype follows it unless given in
    ``overrides`` (any TransformerConfig field, e.g. ``remat_policy="full"``).
    shardings: ``None`` (default device), a pytree of ``jax.sharding.Sharding`` with the
    structure of ``nnx.to_pure_dict(nnx.state(model))`` (an ``nnx.State`` works too), or a
    callable ``(config, abstract_model) -> such a pytree``. Each param is then assembled
    shard by shard from the memory-mapped safetensors, never whole on one device.
    Use ``nnx.split(model)`` for the ``(graphdef, state)`` pair jitted code works on.
    """
    folder = resolve_model_dir(path_or_id)
    hf_cfg = read_hf_config(folder)
    param_dtype = "float32" if dtype is None else dtype
    overrides.setdefault("compute_dtype", param_dtype)
    config = config_from_hf(hf_cfg, param_dtype=param_dtype, **overrides)
    store = _WeightStore(folder)
    prefix, head = _find_prefix(store)

    abs_model = abstract_model(config)
    graphdef, abs_state = nnx.split(abs_model)
    abs_flat = _flatten_pure(nnx.to_pure_dict(abs_state))
    if callable(shardings) and not isinstance(shardings, (dict, nnx.State)):
        shardings = shardings(config, abs_model)
    shard_flat = _flatten_pure(_pure(shardings)) if shardings is not None else None

    wmap = hf_weight_names(config)
    missing = set(abs_flat) - set(wmap)
    if missing:
        raise AssertionError(f"no weight mapping for {sorted(missing)}")
    np_dtype = np.dtype(config.param_jnp_dtype)
    loaded = {}
    for path, sds in abs_flat.items():
        template, kind = wmap[path]
        stacked = path[0] == "layers"
        full_shape = tuple(sds.shape)
        shape = full_shape[1:] if stacked else full_shape
        expected = hf_layout_shape(kind, shape)
        names = ([(head if template.startswith("lm_head") else prefix) + template.format(i=i)
                  for i in range(config.num_layers)] if stacked else
                 [(head if template.startswith("lm_head") else prefix) + template])
        views = []
        for name in names:
            got = store.shape(name)
            if tuple(got) != expected:
                raise ModelLoadError(f"tensor {name}: expected shape {list(expected)}, got {list(got)}")
            views.append(to_our_layout(store.get(name), kind, shape))

        def read(index, views=views, stacked=stacked, full_shape=full_shape):
            if index is None:
                index = (slice(None),) * len(full_shape)
            if stacked:
                rows = range(len(views))[index[0]]
                out = np.stack([np.asarray(views[i][index[1:]]) for i in rows])
            else:
                out = np.asarray(views[0][index])
            return out.astype(np_dtype)

        if shard_flat is not None:
            if path not in shard_flat:
                raise ModelLoadError(f"shardings has no entry for param {'/'.join(path)}")
            loaded[path] = jax.make_array_from_callback(full_shape, shard_flat[path], read)
        else:
            loaded[path] = jax.device_put(read(None))
    nnx.replace_by_pure_dict(abs_state, unflatten_paths(loaded))
    model = nnx.merge(graphdef, abs_state)
    return model, config


def check_tokenizer(tokenizer, config: TransformerConfig) -> None:
    """Raise ModelLoadError when the tokenizer has more tokens than the embedding has rows."""
    n = len(tokenizer)
    if n > config.vocab_size:
        raise ModelLoadError(
            f"tokenizer has {n} tokens but the model embedding has only {config.vocab_size} rows")


def load_tokenizer(path_or_id, config: TransformerConfig | None = None):
    """transformers.AutoTokenizer from a folder (or hub id); checked against config when given."""
    from transformers import AutoTokenizer

    folder = resolve_model_dir(path_or_id)
    try:
        tok = AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"cannot load a tokenizer from {folder}: {str(e).splitlines()[0] if str(e) else e}") \
            from None
    if not tok("Hello world").get("input_ids"):  # transformers builds an empty one from a folder without its files
        raise ModelLoadError(f"no tokenizer in {folder}: it turns text into no tokens (tokenizer.json / "
                             "tokenizer.model missing?); point model.tokenizer at the model's tokenizer")
    if config is not None:
        check_tokenizer(tok, config)
    return tok


# ============================================================================ export


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ValueError(f"bad size {size!r}; use e.g. 2GB, 500MB, 1GiB or a byte count")
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
            "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(float(m.group(1)) * mult)


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def export_hf(
    params_or_state,
    model_config: TransformerConfig,
    out_dir: str | os.PathLike,
    tokenizer=None,
    max_shard_size: int | str = "2GB",
    dtype: Any = None,
    value_head: Any = None,
) -> Path:
    """Write an HF folder: safetensors (sharded with an index above max_shard_size), config.json, tokenizer.

    params_or_state: the model, its ``nnx.State`` or the pure param dict. tokenizer: a
    transformers tokenizer (saved with ``save_pretrained``), a folder to copy tokenizer
    files from, or None. dtype: stored dtype (default: the params' dtype).
    value_head: a [D] vector: write a value model instead, an ``*ForSequenceClassification`` with one
    label whose ``score.weight`` it is (PPO's critic, as TRL loads one; the config must be tied: no lm_head).
    """
    c = model_config
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    flat = _flatten_pure(_pure(params_or_state))
    wmap = hf_weight_names(c)
    unknown = set(flat) - set(wmap)
    if unknown:
        raise ValueError(f"params have no HF mapping: {sorted('/'.join(p) for p in unknown)}")
    np_dtype = np.dtype(jax.numpy.dtype(dtype)) if dtype is not None else None
    if np_dtype is None:
        np_dtype = np.dtype(next(iter(flat.values())).dtype)
    torch_dtype = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[np_dtype.name]

    # plan: (hf name, param path, layer or None, kind, nbytes)
    plan = []
    for path, (template, kind) in wmap.items():
        if path not in flat:
            raise ValueError(f"params lack {'/'.join(path)}")
        arr = flat[path]
        if path[0] == "layers":
            per = math.prod(arr.shape[1:]) * np_dtype.itemsize
            for i in range(arr.shape[0]):
                plan.append(("model." + template.format(i=i), path, i, kind, per))
        else:
            name = template if template.startswith("lm_head") else "model." + template
            plan.append((name, path, None, kind, math.prod(arr.shape) * np_dtype.itemsize))
    if value_head is not None:
        if not c.tie_word_embeddings:
            raise ValueError("a value model has no lm_head: export it with a tied config (critic.critic_config)")
        flat[("score",)] = np.asarray(jax.device_get(value_head)).reshape(1, -1)
        plan.append((SCORE_HEAD, ("score",), None, "score", flat[("score",)].size * np_dtype.itemsize))
    limit = _parse_size(max_shard_size)
    shards: list[list] = [[]]
    size = 0
    for item in plan:
        if shards[-1] and size + item[4] > limit:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item[4]

    for old in list(out.glob("model*.safetensors")) + [out / "model.safetensors.index.json"]:
        if old.exists():
            old.unlink()
    host_cache: dict = {}

    def host(path):
        if path not in host_cache:
            host_cache.clear()
            host_cache[path] = np.asarray(jax.device_get(flat[path]))
        return host_cache[path]

    weight_map = {}
    n = len(shards)
    for si, items in enumerate(shards):
        fname = "model.safetensors" if n == 1 else f"model-{si + 1:05d}-of-{n:05d}.safetensors"
        tensors = {}
        for name, path, layer, kind, _ in items:
            arr = host(path)
            arr = arr[layer] if layer is not None else arr
            arr = arr if kind == "score" else to_hf_layout(arr, kind)
            tensors[name] = np.ascontiguousarray(arr).astype(np_dtype)
            weight_map[name] = fname
        save_safetensors(out / fname, tensors)
    if n > 1:
        index = {"metadata": {"total_size": sum(p[4] for p in plan)}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    hf_cfg = hf_config_from(c, torch_dtype=torch_dtype)
    if value_head is not None:
        hf_cfg.update(architectures=[hf_cfg["architectures"][0].replace("ForCausalLM", "ForSequenceClassification")],
                      id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2, sort_keys=True))
    if tokenizer is not None:
        if isinstance(tokenizer, (str, os.PathLike)):
            copy_tokenizer_files(tokenizer, out)
        else:
            tokenizer.save_pretrained(str(out))
    return out


# ============================================================================ converted (Orbax) checkpoints

CONVERTED_CONFIG = "model_config.json"


def save_converted(out_dir: str | os.PathLike, model_or_state, config: TransformerConfig,
                   tokenizer_src: str | os.PathLike | None = None) -> Path:
    """Write ``DIR/params`` (Orbax), ``DIR/model_config.json`` and ``DIR/tokenizer/*``."""
    import orbax.checkpoint as ocp

    out = Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    params = _pure(model_or_state)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(out / "params", params, force=True)
    ckptr.wait_until_finished()
    (out / CONVERTED_CONFIG).write_text(config.to_json())
    if tokenizer_src is not None:
        copy_tokenizer_files(tokenizer_src, out / "tokenizer")
    return out


def load_converted(ckpt_dir: str | os.PathLike, shardings: Any = None) -> tuple[Transformer, TransformerConfig]:
    """Restore a folder written by :func:`save_converted` -> ``(model, config)``."""
    import orbax.checkpoint as ocp

    d = Path(ckpt_dir).absolute()
    cfg_path = d / CONVERTED_CONFIG
    if not cfg_path.exists() or not (d / "params").exists():
        raise ModelLoadError(f"{d} is not a converted checkpoint (expected {CONVERTED_CONFIG} and params/)")
    config = TransformerConfig.from_json(cfg_path.read_text())
    abs_model = abstract_model(config)
    graphdef, abs_state = nnx.split(abs_model)
    target = nnx.to_pure_dict(abs_state)
    if callable(shardings) and not isinstance(shardings, (dict, nnx.State)):
        shardings = shardings(config, abs_model)
    if shardings is not None:
        sh = _flatten_pure(_pure(shardings))
        flat = _flatten_pure(target)
        target = unflatten_paths({p: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh[p]) for p, s in flat.items()})
    else:
        dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=dev), target)
    try:
        params = ocp.StandardCheckpointer().restore(d / "params", target)
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"cannot restore {d / 'params'}: {str(e).splitlines()[0] if str(e) else e}") from None
    nnx.replace_by_pure_dict(abs_state, params)
    return nnx.merge(graphdef, abs_state), config
