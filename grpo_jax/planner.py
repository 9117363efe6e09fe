"""Will this run fit? Per-device memory of a run config on a mesh, without allocating weights.

`plan(cfg, model_config, mesh)` builds the train state, batches and KV cache as
abstract arrays (`jax.ShapeDtypeStruct` with shardings), lowers and compiles the
three device programs of a GRPO step against them -- the rollout
(`rollout._generate_jit`), the reference / old log-probs and the update step
(`trainer.make_steps`) -- and reads XLA's buffer assignment
(`compiled.memory_analysis()`): argument, output, aliased and temp bytes per device.
Nothing is executed and no weight is ever materialised, so a 7B model can be
planned for a 64-chip pod on a laptop's fake CPU devices.

Caveat: compiled for CPU, the temp numbers come from the CPU compiler, whose fusion
and buffer reuse differ from TPU / GPU (usually more temp, never less of the
resident state). Run the same command on the accelerator itself for its own
compiler's numbers; the resident bytes (params, optimizer, reference) are exact.

With a device memory to fit, it also finds the largest micro-batch (grpo.micro_batch_size)
whose programs fit, by compiling candidates (`fit_micro_batch`); a run with
micro_batch_size=auto does the same at start-up on its own devices
(`resolve_auto_micro_batch`). Targets (`parse_target`: h100x1, v5e-8, ...) name the
hardware a config is sized for (run.sized_for).

`python -m launch plan` is the command-line face (see launch/plan.py).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from grpo_jax import distributed
from grpo_jax import sharding as shd
from grpo_jax.config import Config, minibatch_rows, optimizer_updates
from grpo_jax.critic import critic_config, without_unembedding
from grpo_jax.models import lora, transformer
from grpo_jax.models.hf import config_from_hf
from grpo_jax.models.presets import PRESETS, preset_name
from grpo_jax.optim import make_critic_optimizer, make_optimizer
from grpo_jax.policy import model_config as read_model_config
from grpo_jax.policy import model_source
from grpo_jax.rollout import SamplingParams, _generate_jit, bucket_length
from grpo_jax.trainer import (
    Batch,
    CriticModel,
    TrainState,
    completion_logprobs,
    init_train_state,
    is_on_policy,
    is_ppo,
    keeps_reference,
    make_steps,
)

GiB = 1024 ** 3

# ---------------------------------------------------------------- model shapes

def model_config_for(cfg: Config, preset: Optional[str] = None) -> tuple[transformer.TransformerConfig, str]:
    """The decoder shape of a run: (TransformerConfig with the run's dtypes and remat, where it came from).

    preset (a PRESETS name or hub id) wins; else `model.path` as a local model (policy.model_config:
    a converted checkpoint or an HF folder); else `model.path` matched against the presets by name.
    No weights are read, nothing is downloaded.
    """
    m = cfg.model
    overrides = m.decoder_overrides()
    if preset is not None:
        name = preset_name(preset)
        if name is None:
            raise ValueError(f"unknown model preset {preset!r}; known: {', '.join(PRESETS)}")
        return config_from_hf(PRESETS[name], **overrides), f"preset {name}"
    local = read_model_config(m, download=False)
    if local is not None:
        source = model_source(m.path)
        return local, str(Path(source.path) / ("model_config.json" if source.kind == "converted" else "config.json"))
    name = preset_name(m.path)
    if name is not None:
        return config_from_hf(PRESETS[name], **overrides), f"preset {name} (from model.path={m.path})"
    raise ValueError(f"model.path={m.path} is not a local model folder and matches no preset; "
                     f"pass --model-preset (one of: {', '.join(PRESETS)})")


# ---------------------------------------------------------------- device memory

# HBM per device (a chip; a TensorCore for v2 / v3), GiB.
DEVICE_MEMORY_GIB = {
    "v2": 8, "v3": 16, "v4": 32, "v5e": 16, "v5p": 95, "v6e": 32,
    "h100": 80, "h200": 141, "a100-40gb": 40, "a100": 80, "l4": 24, "b200": 180,
    "cpu": 24,  # host RAM of a 24 GB machine such as CI's, for the CPU-sized configs
}
_KIND_ALIASES = (("v5 lite", "v5e"), ("v5litepod", "v5e"), ("v5e", "v5e"), ("v5p", "v5p"), ("tpu v5", "v5p"),
                 ("v6 lite", "v6e"), ("v6e", "v6e"), ("tpu v4", "v4"), ("tpu v3", "v3"), ("tpu v2", "v2"),
                 ("h200", "h200"), ("h100", "h100"), ("a100-sxm4-40gb", "a100-40gb"), ("a100 40gb", "a100-40gb"),
                 ("a100", "a100"), ("l4", "l4"), ("b200", "b200"))


class Target(NamedTuple):
    """A named piece of hardware a config is sized for (run.sized_for): e.g. "h100x1", "v5e-8"."""

    name: str
    kind: str  # a DEVICE_MEMORY_GIB key
    devices: int


# TPU generations whose slice names count TensorCores, two per chip (one JAX device per chip)
CORE_NAMED = ("v4", "v5p")


def parse_target(name: str) -> Target:
    """ "h100x1" / "h100x8" (GPUs: kind x count) or "v5e-8" / "v5p-64" (TPU slices, named as Google names
    them: chips for v5e / v6e, TensorCores for v4 / v5p, which have two per chip) -> Target (devices = chips)."""
    match = re.fullmatch(r"([a-z0-9-]+?)(?:x|-)(\d+)", name.strip().lower())
    if not match or match.group(1) not in DEVICE_MEMORY_GIB or int(match.group(2)) < 1:
        raise ValueError(f"unknown target {name!r}: expected KINDxN (e.g. h100x1) or KIND-N (e.g. v5e-8) with "
                         f"KIND one of {', '.join(DEVICE_MEMORY_GIB)}")
    kind, count = match.group(1), int(match.group(2))
    if kind in CORE_NAMED and count > 1:  # "v5p-8" is 8 TensorCores: 4 chips, 4 JAX devices
        count //= 2
    return Target(name, kind, count)


def device_kind_key(kind: str) -> Optional[str]:
    """'TPU v5 lite' -> 'v5e', 'NVIDIA H100 80GB HBM3' -> 'h100', 'v5p' -> 'v5p'; None when unknown."""
    k = kind.lower()
    if k in DEVICE_MEMORY_GIB:
        return k
    return next((key for pattern, key in _KIND_ALIASES if pattern in k), None)


def device_memory_bytes(device: jax.Device) -> Optional[int]:
    """What the runtime says a real accelerator holds (None on CPU)."""
    if device.platform == "cpu":
        return None
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001 - not every backend implements it
        stats = {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    key = device_kind_key(device.device_kind)
    return None if key is None else DEVICE_MEMORY_GIB[key] * GiB


# ---------------------------------------------------------------- abstract arrays


def _sds(shape, dtype, sharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


def bytes_per_device(tree) -> int:
    """Bytes one device holds of a pytree of ShapeDtypeStructs (or arrays) with shardings (the largest shard)."""
    total = 0
    for x in jax.tree.leaves(tree):
        sh = getattr(x, "sharding", None)
        shape = sh.shard_shape(x.shape) if sh is not None else x.shape
        total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
    return total


def total_bytes(tree) -> int:
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def abstract_params(model_config: transformer.TransformerConfig, mesh, rules=shd.DEFAULT_RULES):
    """(params as ShapeDtypeStructs with their shardings, the shardings) -- nothing allocated."""
    abs_model = transformer.abstract_model(model_config)
    params = nnx.to_pure_dict(nnx.state(abs_model, nnx.Param))
    shardings = transformer.param_shardings(abs_model, mesh, rules)
    return jax.tree.map(lambda x, s: _sds(x.shape, x.dtype, s), params, shardings), shardings


class AbstractState(NamedTuple):
    """A run's device-resident arrays as ShapeDtypeStructs with shardings (nothing allocated)."""

    state: TrainState  # what trains (the whole model, or LoRA adapters) + optimizer state + reference
    shardings: TrainState
    optimizer: Any
    frozen: Any  # LoRA: the frozen base (in model.lora_base_dtype when set), else None
    critic: Optional[CriticModel] = None  # PPO: the critic's decoder and optimizer (its params are in `state`)


def planned_critic_config(model_config: transformer.TransformerConfig, cfg: Config) -> transformer.TransformerConfig:
    """The critic's decoder shape: ppo.critic_path's when it is a local model (else assumed the policy's)."""
    if cfg.ppo.critic_path is not None:
        other = read_model_config(dataclasses.replace(cfg.model, path=cfg.ppo.critic_path), download=False)
        if other is not None:
            model_config = other.replace(param_dtype=model_config.param_dtype,
                                         compute_dtype=model_config.compute_dtype)
    return critic_config(model_config)


def abstract_critic(model_config: transformer.TransformerConfig, cfg: Config, mesh):
    """(the critic's abstract params, their shardings, CriticModel): critic.py's structure, nothing allocated."""
    config = planned_critic_config(model_config, cfg)
    params, shardings = abstract_params(config, mesh)
    rep = shd.replicated(mesh)
    params = {"decoder": without_unembedding(params),
              "score": _sds((config.hidden_size,), config.param_jnp_dtype, rep)}
    shardings = {"decoder": without_unembedding(shardings), "score": rep}
    optimizer = make_critic_optimizer(cfg, optimizer_updates(cfg))
    return params, shardings, CriticModel(transformer.Decoder(config), optimizer)


def abstract_train_state(model_config: transformer.TransformerConfig, cfg: Config, mesh) -> AbstractState:
    """The abstract train state of cfg on mesh: full fine-tuning, or (model.lora_rank) adapters on a frozen base;
    with PPO's critic."""
    spec, frozen = lora.LoraSpec.from_config(cfg.model), None
    if spec is not None and cfg.model.lora_base_dtype:
        model_config = model_config.replace(param_dtype=cfg.model.lora_base_dtype)
    params, param_shardings = abstract_params(model_config, mesh)
    optimizer = make_optimizer(cfg.optim, optimizer_updates(cfg))
    plain = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    if spec is not None:
        plain = jax.eval_shape(functools.partial(lora.init_adapters, spec=spec, dtype=jnp.dtype(cfg.model.param_dtype),
                                                 key=jax.random.PRNGKey(0)), plain)
        frozen, param_shardings = params, lora.adapter_shardings(plain, param_shardings)
    critic = critic_params = critic_shardings = None
    if is_ppo(cfg):
        critic_params, critic_shardings, critic = abstract_critic(model_config, cfg, mesh)
        critic_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), critic_params)
    state = jax.eval_shape(lambda p, c: init_train_state(p, optimizer, jax.random.PRNGKey(0), keeps_reference(cfg), c,
                                                         critic and critic.optimizer), plain, critic_params)
    state_shardings = shd.train_state_shardings(state, optimizer, param_shardings, mesh, critic and critic.optimizer,
                                                critic_shardings)
    state = jax.tree.map(lambda x, s: _sds(x.shape, x.dtype, s), state, state_shardings)
    return AbstractState(state, state_shardings, optimizer, frozen, critic)


def training_line(cfg: Config, model_config: transformer.TransformerConfig, state: TrainState, frozen) -> str:
    """What trains: "full fine-tuning ..." or "LoRA rank r on ...: N trainable params (x%) ..."."""
    trained = sum(math.prod(x.shape) for x in jax.tree.leaves(state.params))
    if state.critic_params is not None:
        critic = sum(math.prod(x.shape) for x in jax.tree.leaves(state.critic_params))
        lr = cfg.ppo.critic_learning_rate if cfg.ppo.critic_learning_rate is not None else cfg.optim.learning_rate
        return (f"PPO: full fine-tuning, {trained / 1e6:,.1f}M policy params and a critic of {critic / 1e6:,.1f}M "
                f"(its own optimizer, learning rate {lr:g}) in {cfg.model.param_dtype}")
    if frozen is None:
        return f"full fine-tuning, {trained / 1e6:,.1f}M trainable params in {cfg.model.param_dtype}"
    spec = lora.LoraSpec.from_config(cfg.model)
    base = sum(math.prod(x.shape) for x in jax.tree.leaves(frozen))
    base_dtype = cfg.model.lora_base_dtype or model_config.param_dtype
    return (f"LoRA rank {spec.rank} (alpha {spec.alpha:g}) on {', '.join(spec.weights)}: {trained / 1e6:,.1f}M "
            f"trainable params ({100 * trained / base:.2f}% of the base) in {cfg.model.param_dtype}, base frozen in "
            f"{base_dtype}, the reference = the base")


def decoder_params(abstract: AbstractState, cfg: Config):
    """What the rollout's decoder reads: the params, or the frozen base with the adapters."""
    if abstract.frozen is None:
        return abstract.state.params
    return lora.combine(abstract.frozen, abstract.state.params, lora.LoraSpec.from_config(cfg.model))


def prompt_width(cfg: Config) -> int:
    """P: the prompt bucket max_prompt_length pads up to (the widest prompt a run sees)."""
    try:
        return bucket_length(cfg.rollout.max_prompt_length, cfg.rollout.prompt_length_buckets)
    except ValueError:
        return cfg.rollout.max_prompt_length


def abstract_batch(cfg: Config, mesh, rows: int, with_old: bool, with_ref: bool):
    """A Batch of `rows` sequences of P + N tokens (see trainer.Batch), rows split over data x fsdp; an update's
    (with_old) under PPO also carries per-token advantages, old values and returns."""
    P, N = prompt_width(cfg), cfg.rollout.max_completion_length
    T = P + N

    def arr(shape, dtype):
        return _sds(shape, dtype, shd.rows_sharding(jax.ShapeDtypeStruct(shape, dtype), mesh))

    token_level = is_ppo(cfg) and with_old
    return Batch(tokens=arr((rows, T), jnp.int32), positions=arr((rows, T), jnp.int32),
                 attention_mask=arr((rows, T), jnp.bool_), completion_mask=arr((rows, N), jnp.bool_),
                 advantages=arr((rows, N) if token_level else (rows,), jnp.float32),
                 old_logp=arr((rows, N), jnp.float32) if with_old else None,
                 ref_logp=arr((rows, N), jnp.float32) if with_ref else None,
                 sampler_logp=arr((rows, N), jnp.float32),
                 old_values=arr((rows, N), jnp.float32) if token_level else None,
                 returns=arr((rows, N), jnp.float32) if token_level else None)


def kv_cache_bytes(model_config: transformer.TransformerConfig, rows: int, length: int, mesh) -> tuple[int, int]:
    """(total, per device) bytes of the rollout's K and V caches: rows split over data x fsdp, kv heads over tensor."""
    c = model_config
    total = 2 * c.num_layers * rows * length * c.num_kv_heads * c.head_dim * jnp.dtype(c.compute_jnp_dtype).itemsize
    dp = shd.data_parallel_size(mesh)
    split = (dp if rows % dp == 0 else 1) * (mesh.shape["tensor"] if c.num_kv_heads % mesh.shape["tensor"] == 0 else 1)
    return total, total // split


# ---------------------------------------------------------------- compiling


def compile_stats(jitted, *args) -> dict:
    """Lower + compile a jitted function on abstract args; XLA's per-device memory numbers and the time taken."""
    t0 = time.perf_counter()
    lowered = jitted.lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    ma = compiled.memory_analysis()
    out = {"lower_s": round(t1 - t0, 2), "compile_s": round(t2 - t1, 2)}
    for key in ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
                "generated_code_size_in_bytes"):
        out[key.replace("_size_in_bytes", "")] = int(getattr(ma, key, 0) or 0) if ma is not None else None
    return out


def _with_peak(stats: dict, resident: int, other_args: int) -> dict:
    """Peak bytes per device while a program runs: the resident train state (on device all along, whether
    or not the program reads it), its other inputs, its outputs not written over donated inputs, its temps."""
    stats["other_args"] = other_args
    stats["peak"] = resident + other_args + max(stats["output"] - stats["alias"], 0) + stats["temp"]
    return stats


def _rollout_program(model_config, cfg: Config, params, mesh):
    B, G = cfg.data.batch_size, cfg.rollout.group_size
    P = prompt_width(cfg)
    sp = SamplingParams.from_config(cfg.rollout, stop_token_ids=(0,), pad_token_id=0)

    def arr(shape, dtype):
        return _sds(shape, dtype, shd.rows_sharding(jax.ShapeDtypeStruct(shape, dtype), mesh))

    decoder = transformer.Decoder(model_config)
    fn = functools.partial(_generate_jit, decoder, decoder.init_cache)
    jitted = jax.jit(lambda p, ids, mask, keys: fn(p, ids, mask, keys, sp, G, True, 1, mesh))
    return jitted, (params, arr((B, P), jnp.int32), arr((B, P), jnp.bool_), arr((B * G, 2), jnp.uint32))


FIT_FRACTION = 0.85  # a program "fits" at or below this share of device memory (headroom for fragmentation)


def planned_attention(model_config: transformer.TransformerConfig, platform: str,
                      target_kind: Optional[str]) -> transformer.TransformerConfig:
    """The attention backend to compile with. Planned on CPU for a TPU / GPU target, `auto`, `splash` and
    `cudnn` compile as `blockwise`: the accelerator kernels cannot compile for CPU, and blockwise holds
    splash's O(T) working set (no [T, S] scores). cuDNN also takes a [B, 1, T, S] boolean mask, which
    this leaves out. For a CPU target the backend is what a CPU run picks."""
    on_accelerator = target_kind is None or device_kind_key(target_kind) != "cpu"
    if platform == "cpu" and on_accelerator and model_config.attention_impl in ("auto", "splash", "cudnn"):
        return model_config.replace(attention_impl="blockwise")
    return model_config


def planned_dtypes(model_config: transformer.TransformerConfig, cfg: Config, platform: str,
                   target_kind: Optional[str]) -> tuple[transformer.TransformerConfig, Config]:
    """The dtypes to compile with. Planned on CPU for a TPU / GPU target, bfloat16 (params, compute, a LoRA
    base) compiles as float16: the same bytes, but XLA:CPU has no bfloat16 dot and gives every one float32
    operands, weights included, which it then hoists out of the decode loop as a float32 copy of the model
    that no accelerator makes (BENCHMARKS.md, "LoRA"). For a CPU target the dtypes are what a CPU run uses."""
    on_accelerator = target_kind is None or device_kind_key(target_kind) != "cpu"
    if platform != "cpu" or not on_accelerator:
        return model_config, cfg
    stand_in = lambda name: "float16" if name == "bfloat16" else name  # noqa: E731
    model_config = model_config.replace(param_dtype=stand_in(model_config.param_dtype),
                                        compute_dtype=stand_in(model_config.compute_dtype))
    m = cfg.model
    model = dataclasses.replace(m, param_dtype=stand_in(m.param_dtype), compute_dtype=stand_in(m.compute_dtype),
                                lora_base_dtype=m.lora_base_dtype and stand_in(m.lora_base_dtype))
    return model_config, dataclasses.replace(cfg, model=model)


def with_completion_length(cfg: Config, length: int) -> Config:
    """cfg with rollout.max_completion_length = length (for `plan --completion-lengths` sweeps)."""
    return dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, max_completion_length=length))


def micro_batch_candidates(cfg: Config, mesh) -> list[int]:
    """Micro-batch sizes an update can run at, ascending: divisors of the minibatch rows that split
    evenly over the mesh's data x fsdp devices (each device then holds a share of every micro-batch)."""
    minibatch = minibatch_rows(cfg)
    dp = shd.data_parallel_size(mesh)
    return [m for m in range(1, minibatch + 1) if minibatch % m == 0 and (m % dp == 0 or m == minibatch)]


def with_micro_batch(cfg: Config, size: int) -> Config:
    """cfg with grpo.micro_batch_size = size (0 when size is the whole minibatch: no accumulation)."""
    no_accumulation = size >= minibatch_rows(cfg)
    return dataclasses.replace(cfg, grpo=dataclasses.replace(cfg.grpo, micro_batch_size=0 if no_accumulation
                                                             else size))


class _Abstract:
    """The abstract train state of a plan, built once and shared by every program compiled for it."""
    def __init__(self, model_config: transformer.TransformerConfig, cfg: Config, mesh):
        self.model_config, self.cfg, self.mesh = model_config, cfg, mesh
        self.abstract = abstract_train_state(model_config, cfg, mesh)
        self.state, self.state_shardings, self.optimizer, self.frozen, self.critic = self.abstract
        self.resident = bytes_per_device(self.state) + bytes_per_device(self.frozen)

    def step_programs(self, cfg: Config, which=("logps", "update")) -> dict:
        """Compiled stats of the log-prob and update programs of cfg (its micro-batch size)."""
        steps = make_steps(transformer.Decoder(self.model_config), self.optimizer, cfg, self.state_shardings,
                           critic=self.critic)
        rows = cfg.data.batch_size * cfg.rollout.group_size
        with_ref, with_old = cfg.grpo.beta != 0, is_ppo(cfg) or not is_on_policy(cfg)
        out = {}
        if "logps" in which and (with_ref or with_old):
            batch = abstract_batch(cfg, self.mesh, rows, False, False)
            out["logps"] = _with_peak(compile_stats(steps.reference_and_old_logps, self.state, batch, self.frozen),
                                      self.resident, bytes_per_device(batch))
        if "update" in which:
            mb = abstract_batch(cfg, self.mesh, minibatch_rows(cfg), with_old, with_ref)
            out["update"] = _with_peak(compile_stats(steps.update, self.state, mb, self.frozen), self.resident,
                                       bytes_per_device(mb))
        return out


def fit_micro_batch(cfg: Config, model_config: transformer.TransformerConfig, mesh, device_memory: int,
                    progress: Callable[[str], None] = lambda _: None, abstract: Optional[_Abstract] = None) -> dict:
    """The largest micro-batch whose log-prob and update programs fit `device_memory` (FIT_FRACTION of it).

    Compiles the whole minibatch first, then candidates (`micro_batch_candidates`) in a binary search,
    assuming a smaller micro-batch never needs more memory. Returns {"size": rows or None when even the
    smallest does not fit, "tried": {size: peak bytes}, "programs": the chosen size's compiled stats}.
    """
    abstract = abstract or _Abstract(model_config, cfg, mesh)
    candidates = micro_batch_candidates(cfg, mesh)
    limit = FIT_FRACTION * device_memory
    tried, compiled = {}, {}

    def fits(index: int) -> bool:
        size = candidates[index]
        progress(f"compiling log-probs and update at micro-batch {size}")
        compiled[size] = abstract.step_programs(with_micro_batch(cfg, size))
        tried[size] = max(p["peak"] for p in compiled[size].values())
        return tried[size] <= limit

    best = None
    if fits(len(candidates) - 1):  # the whole minibatch at once: the common case, one compile
        best = candidates[-1]
    else:
        lo, hi = 0, len(candidates) - 2
        while lo <= hi:
            mid = (lo + hi) // 2
            if fits(mid):
                best, lo = candidates[mid], mid + 1
            else:
                hi = mid - 1
    return {"size": best, "tried": dict(sorted(tried.items())), "programs": compiled.get(best)}


def run_micro_batch(cfg: Config, model_config: transformer.TransformerConfig, mesh) -> tuple[Config, Optional[str]]:
    """A run's micro-batch size on its mesh: auto resolved (`resolve_auto_micro_batch`, with the line to log),
    any other size checked against `micro_batch_candidates`. Returns (cfg, line or None)."""
    line = None
    if cfg.grpo.micro_batch_size == "auto":
        cfg, line = resolve_auto_micro_batch(cfg, model_config, mesh)
    micro = cfg.grpo.micro_batch_size
    if micro and micro not in micro_batch_candidates(cfg, mesh):
        raise ValueError(f"grpo.micro_batch_size={micro} does not split over the mesh's data x fsdp = "
                         f"{shd.data_parallel_size(mesh)} devices (each device takes a share of every "
                         "micro-batch); use a multiple of it or auto")
    return cfg, line


def resolve_auto_micro_batch(cfg: Config, model_config: transformer.TransformerConfig, mesh) -> tuple[Config, str]:
    """grpo.micro_batch_size=auto -> a number, on the devices the run has: (cfg, the line to log).

    On an accelerator, the largest micro-batch whose programs fit its memory (`fit_micro_batch`,
    compiled against the real devices' compiler). On CPU there is no device limit to fit: the
    whole minibatch runs at once.
    """
    minibatch = minibatch_rows(cfg)
    device = jax.local_devices()[0]  # one this process can ask; every process then takes the smallest answer
    memory = device_memory_bytes(device)
    if memory is None:
        return (with_micro_batch(cfg, minibatch),
                f"grpo.micro_batch_size=auto: no device memory limit on {device.platform}; the whole minibatch "
                f"({minibatch} rows) per forward/backward pass")
    fit = fit_micro_batch(cfg, model_config, mesh, memory)
    tried = ", ".join(f"{size}: {_gib(peak)}" for size, peak in fit["tried"].items())
    if fit["size"] is None:
        smallest = micro_batch_candidates(cfg, mesh)[0]
        return (with_micro_batch(cfg, smallest),
                f"warning: grpo.micro_batch_size=auto: no micro-batch fits {FIT_FRACTION:.0%} of {_gib(memory)} "
                f"per device (compiled peaks {tried}); trying the smallest, {smallest} rows (see `python -m launch "
                "plan`: shorten rollout.max_completion_length, use model.remat=full or a larger mesh.fsdp)")

    agreed = -distributed.global_max(-fit["size"])  # all processes must compile the same program
    if agreed != fit["size"]:
        fit = dict(fit, size=agreed)
    return (with_micro_batch(cfg, fit["size"]),
            f"grpo.micro_batch_size=auto -> {fit['size']} of {minibatch} rows per forward/backward pass (the largest "
            f"that fits {FIT_FRACTION:.0%} of {_gib(memory)} per device; compiled peaks {tried})")


def plan(cfg: Config, model_config: transformer.TransformerConfig, mesh, *, programs=("rollout", "logps", "update"),
         device_memory: Optional[int] = None, device_kind: Optional[str] = None,
         compare_logprobs: bool = False, search_micro_batch: bool = True,
         progress: Callable[[str], None] = lambda _: None) -> dict:
    """Per-device memory report of one GRPO step of `cfg` on `mesh` (a dict; see format_report).

    grpo.micro_batch_size=auto (or search_micro_batch, with a device memory) also finds the largest
    micro-batch that fits; with auto the step programs are reported at that size.
    """
    platform = mesh.devices.flat[0].platform
    model_config = planned_attention(model_config, platform, device_kind)
    asked, asked_cfg = model_config, cfg  # the report names the dtypes the run uses
    model_config, cfg = planned_dtypes(model_config, cfg, platform, device_kind)
    abstract = _Abstract(model_config, cfg, mesh)
    state, resident = abstract.state, abstract.resident
    B, G = cfg.data.batch_size, cfg.rollout.group_size
    rows = B * G
    P, N = prompt_width(cfg), cfg.rollout.max_completion_length
    params_b = bytes_per_device(state.params)
    opt_b = bytes_per_device(state.opt_state)
    ref_b = bytes_per_device(state.ref_params) if state.ref_params is not None else 0
    frozen = abstract.frozen
    kv_total, kv_dev = kv_cache_bytes(model_config, rows, P + N, mesh)
    minibatch = minibatch_rows(cfg)
    report: dict[str, Any] = {
        "model": {"num_params": model_config.num_params(), "param_dtype": asked.param_dtype,
                  "compute_dtype": asked.compute_dtype, "remat": model_config.remat_policy,
                  "attention": model_config.attention_impl,
                  "layers": model_config.num_layers, "hidden": model_config.hidden_size,
                  "vocab": model_config.vocab_size},
        "training": training_line(asked_cfg, asked, state, frozen),
        "dtype_stand_in": asked != model_config,
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "devices": int(mesh.devices.size),
        "platform": platform,
        "batch": {"prompts": B, "group_size": G, "rows": rows, "prompt_tokens": P, "completion_tokens": N,
                  "minibatch_rows": minibatch},
        "per_device_bytes": {
            "params": params_b, "optimizer_state": opt_b, "grads (in update temp)": params_b,
            "reference_params": ref_b, **({} if frozen is None else {"frozen_base": bytes_per_device(frozen)}),
            **({} if state.critic_params is None else {
                "critic_params": bytes_per_device(state.critic_params),
                "critic_optimizer_state": bytes_per_device(state.critic_opt_state)}),
            "kv_cache (in rollout temp)": kv_dev, "resident_state": resident,
        },
        "total_bytes": {"params": total_bytes(state.params), "optimizer_state": total_bytes(state.opt_state),
                        "reference_params": total_bytes(state.ref_params) if state.ref_params is not None else 0,
                        **({} if frozen is None else {"frozen_base": total_bytes(frozen)}),
                        **({} if state.critic_params is None else {
                            "critic_params": total_bytes(state.critic_params),
                            "critic_optimizer_state": total_bytes(state.critic_opt_state)}), "kv_cache": kv_total},
        "programs": {},
    }
    progs = report["programs"]
    if "rollout" in programs:
        progress("compiling the rollout")
        jitted, args = _rollout_program(model_config, cfg, decoder_params(abstract.abstract, cfg), mesh)
        progs["rollout"] = _with_peak(compile_stats(jitted, *args), resident, bytes_per_device(args[1:]))
    step_programs = tuple(p for p in programs if p in ("logps", "update"))
    auto = cfg.grpo.micro_batch_size == "auto"
    fit = None
    if step_programs and device_memory and (auto or search_micro_batch):
        fit = fit_micro_batch(cfg, model_config, mesh, device_memory, progress, abstract)
        report["micro_batch"] = {"fits": fit["size"], "tried_peaks": fit["tried"], "minibatch_rows": minibatch}
    if auto:  # the steps run at the size that fits, the smallest candidate when none does (as a run would)
        if fit is None:  # no device memory to fit against
            size = minibatch
        else:
            size = fit["size"] or micro_batch_candidates(cfg, mesh)[0]
        cfg = with_micro_batch(cfg, size)
        report["micro_batch"] = dict(report.get("micro_batch", {}), auto_resolves_to=size)
    report["batch"]["micro_batch_rows"] = cfg.grpo.micro_batch_size or minibatch
    if step_programs:
        size = report["batch"]["micro_batch_rows"]
        known = fit["programs"] if fit and fit["size"] == size else None
        if known is None:
            progress("compiling reference / old log-probs and the update step")
            known = abstract.step_programs(cfg, step_programs)
        progs.update({name: known[name] for name in step_programs if name in known})
    if compare_logprobs:
        progress("compiling log-prob variants")
        report["logprob_variants"] = compare_logprob_variants(model_config, cfg, mesh,
                                                              decoder_params(abstract.abstract, cfg))
    peak = max([resident] + [p["peak"] for p in progs.values()])
    report["peak_bytes"] = peak
    report["device_kind"] = device_kind
    report["device_memory_bytes"] = device_memory
    if device_memory:
        frac = peak / device_memory
        report["fits"] = frac <= 1.0
        report["verdict"] = ("fits" if frac <= FIT_FRACTION else "tight" if frac <= 1.0 else "does NOT fit")
        report["verdict_line"] = (f"{report['verdict']}: peak {_gib(peak)} of {_gib(device_memory)} per device "
                                  f"({100 * frac:.0f}%)")
    return report


# ---------------------------------------------------------------- issue 9: log-prob memory


def logprob_variants(model_config: transformer.TransformerConfig, temperature: float = 1.0, seq_chunk: int = 128):
    """Three ways to get completion log-probs [R, N] from (params, Batch), for comparing their memory.

    current: `trainer.completion_logprobs` as the trainer calls it, with the library's
             `transformer.Decoder` (hidden states, unembedded chunk by chunk);
    naive:   full logits then one log_softmax over all of them;
    hidden_chunked: the model's final hidden states [R, T, D], then the unembedding,
             log-softmax and gather `seq_chunk` positions at a time under jax.checkpoint,
             so no [R, T, V] array exists in the forward or the backward pass.
    """
    forward = functools.partial(transformer.apply, model_config)

    def current(params, batch):
        return completion_logprobs(transformer.Decoder(model_config), params, batch, temperature)

    def naive(params, batch):
        n = batch.completion_mask.shape[1]
        logits, _ = forward(params, batch.tokens, batch.positions, batch.attention_mask, None)
        lp = jax.nn.log_softmax(logits[:, -n - 1:-1].astype(jnp.float32) / temperature, axis=-1)
        return jnp.take_along_axis(lp, batch.tokens[:, -n:, None], axis=-1)[..., 0]

    def hidden_chunked(params, batch):
        n = batch.completion_mask.shape[1]
        hidden, _ = transformer.apply(model_config, params, batch.tokens, batch.positions, batch.attention_mask, None,
                             return_hidden=True)
        h = hidden[:, -n - 1:-1]  # [R, N, D]
        targets = batch.tokens[:, -n:]
        c = max(d for d in range(1, min(seq_chunk, n) + 1) if n % d == 0)

        @jax.checkpoint
        def one(hc, tc):  # hc [R, c, D], tc [R, c]
            x = transformer.logits_from_hidden(model_config, params, hc) / temperature
            lse = jax.nn.logsumexp(x, axis=-1)
            return jnp.take_along_axis(x, tc[..., None], axis=-1)[..., 0] - lse

        hs = jnp.moveaxis(h.reshape(h.shape[0], n // c, c, h.shape[-1]), 1, 0)
        ts = jnp.moveaxis(targets.reshape(targets.shape[0], n // c, c), 1, 0)
        out = jax.lax.map(lambda xs: one(*xs), (hs, ts))  # [n/c, R, c]
        return jnp.moveaxis(out, 0, 1).reshape(targets.shape)

    return {"current": current, "naive": naive, "hidden_chunked": hidden_chunked}


def compare_logprob_variants(model_config, cfg: Config, mesh, params=None, seq_chunk: int = 128) -> dict:
    """Compiled temp bytes per device of value_and_grad(masked mean log-prob) under each variant.

    This is the part of the update step that differs between them (the optimizer
    and the rest of the loss are the same), at the update step's minibatch size.
    """
    if params is None:
        params, _ = abstract_params(model_config, mesh)
    batch = abstract_batch(cfg, mesh, minibatch_rows(cfg), False, False)
    out = {}
    for name, fn in logprob_variants(model_config, cfg.rollout.temperature or 1.0, seq_chunk).items():
        def loss(p, b, fn=fn):
            logp = fn(p, b)
            m = b.completion_mask.astype(jnp.float32)
            return jnp.sum(logp * m) / jnp.maximum(jnp.sum(m), 1.0)

        jitted = jax.jit(jax.value_and_grad(loss))
        out[name] = compile_stats(jitted, params, batch)
    return out


# ---------------------------------------------------------------- output


def _gib(n: Optional[int]) -> str:
    if n is None:
        return "n/a"
    if n >= GiB / 10:
        return f"{n / GiB:.2f} GiB"
    if n >= 1024 ** 2 / 10:
        return f"{n / 1024 ** 2:.1f} MiB"
    return f"{n / 1024:.1f} KiB"


def format_report(r: dict) -> str:
    m, b = r["model"], r["batch"]
    mesh = " x ".join(f"{k}={v}" for k, v in r["mesh"].items())
    lines = [
        f"model: {r.get('model_source', '')}  {m['num_params'] / 1e9:.3f}B params, {m['layers']} layers, "
        f"hidden {m['hidden']}, vocab {m['vocab']}, param {m['param_dtype']}, compute {m['compute_dtype']}, "
        f"remat {m['remat']}, attention {m['attention']}",
        f"training: {r['training']}",
        f"mesh: {mesh} over {r['devices']} {r['platform']} devices",
        f"batch: {b['prompts']} prompts x G={b['group_size']} = {b['rows']} rows of {b['prompt_tokens']} prompt + "
        f"{b['completion_tokens']} completion tokens (update minibatch {b['minibatch_rows']} rows, "
        f"{b['micro_batch_rows']} per forward/backward pass)",
        "",
        f"{'per device':<28}{'bytes':>14}",
    ]
    for key, value in r["per_device_bytes"].items():
        lines.append(f"  {key:<26}{_gib(value):>14}")
    if r["programs"]:
        lines += ["", f"{'compiled program':<18}{'args':>11}{'batch in':>11}{'output':>11}{'aliased':>11}"
                  f"{'temp':>11}{'peak':>11}{'compile':>10}"]
        for name, p in r["programs"].items():
            lines.append(f"  {name:<16}{_gib(p['argument']):>11}{_gib(p['other_args']):>11}{_gib(p['output']):>11}"
                         f"{_gib(p['alias']):>11}{_gib(p['temp']):>11}{_gib(p['peak']):>11}{p['compile_s']:>9.1f}s")
        lines.append("  peak = resident state + batch in + (output - aliased) + temp")
    mb = r.get("micro_batch")
    if mb and "fits" in mb:
        tried = ", ".join(f"{size}: {_gib(peak)}" for size, peak in mb["tried_peaks"].items())
        lines += ["", (f"micro-batch: the largest that fits is {mb['fits']} rows" if mb["fits"] else
                       "micro-batch: none fits, not even the smallest") + f" (peak per candidate compiled: {tried})"]
    if mb and "auto_resolves_to" in mb:
        lines.append(f"  grpo.micro_batch_size=auto resolves to {mb['auto_resolves_to']} rows")
    if r.get("logprob_variants"):
        lines += ["", "log-prob + backward temp per device (issue 9):"]
        for name, p in r["logprob_variants"].items():
            lines.append(f"  {name:<16}{_gib(p['temp']):>12}")
    lines.append("")
    lines.append(f"peak per device: {_gib(r['peak_bytes'])}")
    if r.get("verdict_line"):
        kind = f" ({r['device_kind']})" if r.get("device_kind") else ""
        lines.append(f"verdict{kind}: {r['verdict_line']}")
    if r.get("dtype_stand_in"):
        lines.append("note: bfloat16 compiled as float16 on this CPU (same bytes: XLA:CPU would give each bfloat16 "
                     "dot float32 copies of its operands, weights included, that a TPU / GPU never makes)")
    if r["platform"] == "cpu" and r["programs"]:
        lines.append("note: temp bytes come from the CPU compiler; TPU / GPU fuse differently (run `plan` on the "
                     "accelerator for its own numbers). Resident bytes are exact.")
    return "\n".join(lines)


def format_sweep(reports: list[dict]) -> str:
    """One row per plan of a --completion-lengths sweep."""
    first = reports[0]
    lines = [format_report(first).split("\n\n")[0], "",
             f"{'completion':>10}{'rollout peak':>15}{'update temp':>14}{'update peak':>14}{'micro':>7}  verdict"]
    for r in reports:
        progs = r["programs"]
        cell = lambda name, key, progs=progs: _gib(progs[name][key]) if name in progs else "-"
        lines.append(f"{r['batch']['completion_tokens']:>10}{cell('rollout', 'peak'):>15}{cell('update', 'temp'):>14}"
                     f"{cell('update', 'peak'):>14}{r['batch']['micro_batch_rows']:>7}  {r.get('verdict_line', '')}")
    if first["platform"] == "cpu":
        lines.append("note: temp bytes come from the CPU compiler; TPU / GPU fuse differently. "
                     "Resident bytes are exact.")
    return "\n".join(lines)


def to_json(r: dict) -> str:
    return json.dumps(r, indent=2, sort_keys=False, default=lambda o: int(o) if isinstance(o, np.integer) else str(o))
