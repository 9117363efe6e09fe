"""LoRA adapters as a PEFT folder: `adapter_config.json` + `adapter_model.safetensors`, out and in.

`save_peft` writes what `peft.PeftModel.from_pretrained(AutoModelForCausalLM(base), folder)` loads;
`load_peft` reads such a folder (ours or one trained with PEFT) into the adapters' layout
(lora.py), to continue training from it. PEFT keeps per module lora_A [r, in] and lora_B [out, r]
in torch's [out, in] orientation; ours are stacked over layers with the weight's axes split
out, so each converts as its weight does in hf.py, with the rank standing in for the other side.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import NamedTuple

import numpy as np
from flax import nnx

from grpo_jax.models import lora
from grpo_jax.models.hf import (
    SafetensorsFile,
    hf_layout_shape,
    hf_weight_names,
    save_safetensors,
    to_hf_layout,
    to_our_layout,
)
from grpo_jax.models.transformer import TransformerConfig, abstract_model

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model.model."  # PeftModel(LlamaForCausalLM-like) -> .model (the decoder)
_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+_proj)\.lora_([AB])\.weight$")


class PeftAdapters(NamedTuple):
    """A PEFT adapter folder read into our layout."""

    adapters: dict  # {"layers": {weight: {"a": [L, *in, r], "b": [L, r, *out]}}}, numpy
    rank: int
    alpha: float
    weights: tuple[str, ...]  # the decoder weights adapted ("wq", ...)
    base_model: str | None  # base_model_name_or_path, as recorded


def _module(config: TransformerConfig, weight: str) -> str:
    """'layers.{i}.self_attn.q_proj' of decoder weight 'wq'."""
    return hf_weight_names(config)[("layers", weight)][0].removesuffix(".weight")


def _kinds(weight: str) -> tuple[str, str]:
    """How a and b convert (hf.to_hf_layout kinds): a as a weight whose output is the rank, b as one whose input is."""
    return ("o" if weight == "wo" else "T"), ("qkv" if weight in ("wq", "wk", "wv") else "T")


def save_peft(out_dir: str | os.PathLike, adapters: dict, spec: lora.LoraSpec, config: TransformerConfig,
              base_model: str | None = None) -> Path:
    """Write `adapters` (host or device arrays) as a PEFT LoRA folder for the HF export of `config`'s model."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for weight, pair in adapters["layers"].items():
        a, b = np.asarray(pair["a"]), np.asarray(pair["b"])
        kind_a, kind_b = _kinds(weight)
        for i in range(a.shape[0]):
            name = PREFIX + _module(config, weight).format(i=i)
            tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(to_hf_layout(a[i], kind_a))
            tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(to_hf_layout(b[i], kind_b))
    save_safetensors(out / WEIGHTS_FILE, tensors, metadata={"format": "pt"})
    modules = [_module(config, w).rsplit(".", 1)[-1] for w in spec.weights]
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": spec.rank, "lora_alpha": spec.alpha, "lora_dropout": spec.dropout, "target_modules": modules,
        "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
        "inference_mode": True, "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {},
        "alpha_pattern": {},
    }
    (out / CONFIG_FILE).write_text(json.dumps(adapter_config, indent=2))
    return out


def load_peft(folder: str | os.PathLike, config: TransformerConfig) -> PeftAdapters:
    """A PEFT LoRA folder for a model of `config`'s shape; anything we cannot represent is one clear error."""
    folder = Path(folder).expanduser()
    if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise ValueError(f"{folder} is not a PEFT adapter folder (needs {CONFIG_FILE} and {WEIGHTS_FILE}; "
                         "adapter_model.bin is not read: save with safe_serialization=True)")
    meta = json.loads((folder / CONFIG_FILE).read_text())
    unsupported = [f"{k}={meta.get(k)!r}" for k, ok in (
        ("peft_type", meta.get("peft_type") == "LORA"), ("use_dora", not meta.get("use_dora")),
        ("use_rslora", not meta.get("use_rslora")), ("fan_in_fan_out", not meta.get("fan_in_fan_out")),
        ("bias", meta.get("bias", "none") == "none"), ("rank_pattern", not meta.get("rank_pattern")),
        ("alpha_pattern", not meta.get("alpha_pattern")), ("modules_to_save", not meta.get("modules_to_save")),
    ) if not ok]
    if unsupported:
        raise ValueError(f"{folder}: unsupported PEFT adapter setting {unsupported[0]} (plain LoRA only: one rank "
                         "and alpha, no DoRA / rsLoRA / bias / extra trained modules)")
    store = SafetensorsFile(folder / WEIGHTS_FILE)
    found: dict = {}
    for key in store.keys():
        m = _KEY.search(key)
        if m is None:
            raise ValueError(f"{folder}: tensor {key} is not a LoRA weight of a decoder layer's projection")
        layer, module, side = int(m.group(1)), m.group(2), m.group(3)
        short = lora.HF_MODULES.get(module)
        if short is None:
            raise ValueError(f"{folder}: tensor {key} adapts {module}, which this decoder does not have")
        found.setdefault(lora.TARGETS[short], {}).setdefault(side, {})[layer] = key
    weights = tuple(w for w in lora.TARGETS.values() if w in found)
    if not weights:
        raise ValueError(f"{folder}: no LoRA tensors in {WEIGHTS_FILE}")
    rank = int(meta["r"])
    base_shapes = _base_shapes(config)
    adapters = {}
    for weight in weights:
        sides = found[weight]
        missing = [i for i in range(config.num_layers) if i not in sides.get("A", {}) or i not in sides.get("B", {})]
        if missing:
            raise ValueError(f"{folder}: {weight} has no adapter in layer {missing[0]} (all {config.num_layers} "
                             "layers must be adapted)")
        n_in = lora.IN_AXES.get(weight, 1)
        in_shape, out_shape = base_shapes[weight][:n_in], base_shapes[weight][n_in:]
        kind_a, kind_b = _kinds(weight)
        pair = {"a": [], "b": []}
        for i in range(config.num_layers):
            for side, ours, kind in (("A", (*in_shape, rank), kind_a), ("B", (rank, *out_shape), kind_b)):
                arr = store.get(sides[side][i])
                want = hf_layout_shape(kind, ours)
                if tuple(arr.shape) != want:
                    raise ValueError(f"{folder}: {sides[side][i]} has shape {tuple(arr.shape)}, expected {want} "
                                     f"(rank {rank} for this model; is it an adapter of another base?)")
                pair["a" if side == "A" else "b"].append(to_our_layout(arr, kind, ours))
        adapters[weight] = {k: np.stack(v).astype(np.float32) for k, v in pair.items()}
    return PeftAdapters({"layers": adapters}, rank, float(meta.get("lora_alpha", 8)), weights,
                        meta.get("base_model_name_or_path"))


def _base_shapes(config: TransformerConfig) -> dict[str, tuple[int, ...]]:
    """Per-layer shapes of the decoder's weights (no memory)."""
    layers = nnx.to_pure_dict(nnx.state(abstract_model(config), nnx.Param))["layers"]
    return {name: tuple(x.shape[1:]) for name, x in layers.items()}
