"""A policy: a decoder's weights, its tokenizer and prompt format on a device mesh; sample from it, decode.

    from grpo_jax import Policy, generate, load_config
    policy = Policy.load(load_config("configs/smollm2_gsm8k.yaml"))
    out = generate(policy, ["What is 7 * 6?"], policy.sampling_params(max_new_tokens=64, temperature=0.0))
    print(out.texts[0])

The training run (loop.Run) samples its rollouts with `Policy.sample`; evaluation, SFT and the
CLI load their model with `Policy.load`. `model_source` is the one place that tells a converted
checkpoint (`python -m launch convert`) from a Hugging Face folder or hub id.
Multi-process: every process builds the same Policy, passes its own prompts and gets its own
rows back; the arrays in between are global, on one mesh.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from grpo_jax import distributed, sharding
from grpo_jax.config import Config, ConfigError, ModelConfig
from grpo_jax.data import PromptFormatter
from grpo_jax.data.prompts import EncodedPrompts, pad_prompts_left
from grpo_jax.models import lora, transformer
from grpo_jax.models.hf import (
    config_from_hf,
    load_converted,
    load_hf,
    load_tokenizer,
    read_hf_config,
    resolve_model_dir,
)
from grpo_jax.models.peft import load_peft
from grpo_jax.rollout import Rollout, SamplingParams, bucket_length, generate_rows, row_keys

# ---------------------------------------------------------------- where the model comes from


class ModelSource(NamedTuple):
    """What `model.path` names: a converted checkpoint, or a Hugging Face model."""

    kind: str  # "converted": a `launch convert` folder (model_config.json, params/, tokenizer/); "hf": folder or hub id
    path: str  # model.path, with ~ expanded

    @property
    def local(self) -> bool:
        return Path(self.path).is_dir()

    def default_tokenizer(self) -> str:
        """Where the tokenizer is when model.tokenizer is not set."""
        return str(Path(self.path) / "tokenizer") if self.kind == "converted" else self.path


def model_source(path: str | os.PathLike) -> ModelSource:
    """The one decision "is model.path a converted checkpoint or an HF model?" (by model_config.json)."""
    path = os.path.expanduser(str(path))
    return ModelSource("converted" if (Path(path) / "model_config.json").is_file() else "hf", path)


def model_config(m: ModelConfig, *, download: bool = True) -> Optional[transformer.TransformerConfig]:
    """The decoder shape at model.path with this section's dtypes, remat and attention; no weights read.

    download=False: a hub id that is not a local folder gives None instead of a download."""
    source = model_source(m.path)
    overrides = m.decoder_overrides()
    if source.kind == "converted":
        config = transformer.TransformerConfig.from_json((Path(source.path) / "model_config.json").read_text())
        return config.replace(**overrides)
    if not source.local and not download:
        return None
    return config_from_hf(read_hf_config(resolve_model_dir(source.path)), **overrides)


def load_weights(source: ModelSource, mesh: jax.sharding.Mesh, overrides: dict) -> tuple[Any, dict]:
    """(TransformerConfig, plain param dict placed on `mesh`) of a converted checkpoint or an HF model, with
    `overrides` (TransformerConfig fields: dtypes, remat, attention) applied; the params in its param_dtype."""
    shardings = lambda config, abstract: transformer.param_shardings(abstract, mesh, sharding.DEFAULT_RULES)  # noqa: E731
    overrides = dict(overrides)
    if source.kind == "converted":
        model, config = load_converted(source.path, shardings=shardings)
        config = config.replace(**overrides)
    else:
        model, config = load_hf(source.path, dtype=overrides.pop("param_dtype"), shardings=shardings, **overrides)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return config, jax.tree.map(lambda x: x.astype(config.param_jnp_dtype), params)  # a converted one keeps its own


def stop_token_ids(tokenizer) -> list[int]:
    """EOS plus the chat end-of-turn tokens the tokenizer knows."""
    ids = []
    eos = tokenizer.eos_token_id
    ids.extend(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    vocab = tokenizer.get_vocab()
    for token in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|endoftext|>"):
        tid = vocab.get(token)
        if tid is not None and tid not in ids and tid != tokenizer.unk_token_id:
            ids.append(int(tid))
    return [int(i) for i in ids]


def decode_completions(tokenizer, tokens: np.ndarray, mask: np.ndarray, prefix: str = "") -> list[str]:
    """Completion texts as rewards see them: `prefix` (data.assistant_prefix, which the model
    continued from) followed by the decoded tokens."""
    texts = tokenizer.batch_decode([row[m].tolist() for row, m in zip(tokens, mask)], skip_special_tokens=True)
    return [prefix + t for t in texts]


# ---------------------------------------------------------------- the policy


class Samples(NamedTuple):
    """One `Policy.sample` call: R = prompts x group_size rows, prompt p's samples at rows p*G .. p*G+G-1."""

    prompts: EncodedPrompts  # this process's prompts, left-padded to the prompt bucket
    prompt_ids: jax.Array  # [R, P] int32, global (each prompt repeated G times), rows split over the mesh
    prompt_mask: jax.Array  # [R, P] bool
    rollout: Rollout  # global device arrays, rows split over the mesh as the prompts'
    local: Rollout  # this process's rows of `rollout`, as numpy


class Generated(NamedTuple):
    """What `generate` returns: this process's rows."""

    texts: list[str]  # data.assistant_prefix + the decoded completion
    token_ids: np.ndarray  # [R, N] int32, pad after the stop token
    mask: np.ndarray  # [R, N] bool, True up to and including the stop token
    truncated: np.ndarray  # [R] bool: reached max_new_tokens without a stop token


@dataclasses.dataclass
class Policy:
    """A loaded decoder on a mesh, with its tokenizer, prompt format and the config's sampling settings."""

    cfg: Config
    mesh: jax.sharding.Mesh
    decoder: transformer.Decoder
    params: Any  # plain nested dict of arrays, placed by param_shardings
    param_shardings: Any
    tokenizer: Any
    formatter: PromptFormatter
    sampling: SamplingParams  # the config's rollout section, with the tokenizer's stop and pad ids
    lora: Optional[lora.LoraSpec] = None  # model.lora_rank > 0: `params` are the frozen base of the adapters

    @classmethod
    def load(cls, cfg: Config, mesh: Optional[jax.sharding.Mesh] = None) -> "Policy":
        """model.path (converted checkpoint, HF folder or hub id) on `mesh` (default: the config's mesh,
        joining a multi-process run first)."""
        mesh = distributed.setup_mesh(cfg.mesh) if mesh is None else mesh
        m, source = cfg.model, model_source(cfg.model.path)
        overrides = m.decoder_overrides()
        if m.lora_rank and m.lora_base_dtype:  # the frozen base in its own dtype; the adapters keep param_dtype
            overrides["param_dtype"] = m.lora_base_dtype
        config, params = load_weights(source, mesh, overrides)
        tokenizer = load_tokenizer(m.tokenizer or source.default_tokenizer(), config)
        beyond = [t for t in cfg.rollout.stop_token_ids if t >= config.vocab_size]
        if beyond:
            raise ConfigError(f"rollout.stop_token_ids: {beyond[0]} is beyond the model's vocabulary "
                              f"({config.vocab_size} tokens: ids 0..{config.vocab_size - 1})")
        formatter = PromptFormatter.from_config(cfg.data, tokenizer)
        sampling = SamplingParams.from_config(cfg.rollout, stop_token_ids(tokenizer), formatter.pad_id)
        return cls(cfg, mesh, transformer.Decoder(config), params, jax.tree.map(lambda x: x.sharding, params),
                   tokenizer, formatter, sampling, lora.LoraSpec.from_config(m))

    # ------------------------------------------------------------ trained params (full, or LoRA adapters)

    def initial_adapters(self, key: jax.Array) -> Any:
        """The adapters a LoRA run starts from, on the mesh: model.lora_init_from's (a PEFT folder) or fresh."""
        m, dtype = self.cfg.model, jnp.dtype(self.cfg.model.param_dtype)
        if m.lora_init_from:
            loaded = load_peft(m.lora_init_from, self.config)
            mine = (self.lora.rank, self.lora.alpha, self.lora.weights)
            if (loaded.rank, loaded.alpha, loaded.weights) != mine:
                raise ConfigError(f"model.lora_init_from={m.lora_init_from}: its adapters have rank {loaded.rank}, "
                                  f"alpha {loaded.alpha:g} on {', '.join(loaded.weights)}; the config asks for rank "
                                  f"{mine[0]}, alpha {mine[1]:g} on {', '.join(mine[2])} (set model.lora_rank, "
                                  "lora_alpha and lora_targets to match)")
        fresh = functools.partial(lora.init_adapters, spec=self.lora, dtype=dtype)
        shardings = self.trained_shardings(jax.eval_shape(fresh, self.params, key=key))
        if not m.lora_init_from:
            return jax.jit(fresh, out_shardings=shardings)(self.params, key=key)
        # every process holds the whole file: each places its own shards
        return jax.tree.map(lambda x, where: jax.make_array_from_callback(x.shape, where, lambda i: x[i]),
                            jax.tree.map(lambda x: x.astype(dtype), loaded.adapters), shardings)

    def trained_shardings(self, trained: Any) -> Any:
        """Where a run's trained params live: the model's shardings, or its adapters' (`lora.adapter_shardings`)."""
        return self.param_shardings if self.lora is None else lora.adapter_shardings(trained, self.param_shardings)

    def decoder_params(self, trained: Any) -> Any:
        """What the decoder reads for a run's trained params: themselves, or the base with the adapters
        (`lora.combine`: nothing merged, nothing copied)."""
        return trained if self.lora is None else lora.combine(self.params, trained, self.lora)

    def use_trained(self, trained: Any) -> None:
        """Sample with a checkpoint's trained params from now on (`checkpoint.checkpoint_params`)."""
        self.params = self.decoder_params(jax.device_put(trained, self.trained_shardings(trained)))

    def merged(self, trained: Any) -> Any:
        """A run's trained params as one plain param dict: themselves, or base + adapters summed (export)."""
        if self.lora is None:
            return trained
        return jax.jit(lora.merge, static_argnums=2)(self.params, jax.device_put(trained, self.trained_shardings(
            trained)), self.lora)

    @property
    def config(self) -> transformer.TransformerConfig:
        return self.decoder.config

    @property
    def greedy(self) -> SamplingParams:
        """The config's sampling at temperature 0 (evaluation's pass@1)."""
        return self.sampling_params(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0)

    def sampling_params(self, **changes) -> SamplingParams:
        """The config's sampling settings with some changed (max_new_tokens=, temperature=, top_p=, ...)."""
        return dataclasses.replace(self.sampling, **changes)

    def encode(self, prompts: Sequence) -> EncodedPrompts:
        """Template and tokenize this process's prompts, left-padded to the bucket of the longest prompt of any
        process (rollout.prompt_length_buckets), so every process builds the same global shape."""
        rollout = self.cfg.rollout
        enc = self.formatter.encode(prompts, rollout.max_prompt_length, self.cfg.data.overlong_prompts)
        longest = distributed.global_max(int(enc.mask.sum(axis=1).max()))
        width = bucket_length(longest, rollout.prompt_length_buckets)
        enc.ids, enc.mask = pad_prompts_left(enc.ids, enc.mask, width, self.formatter.pad_id)
        return enc

    def sample(self, prompts: Sequence, key: jax.Array, sampling: Optional[SamplingParams] = None,
               group_size: int = 1, params: Any = None) -> Samples:
        """`group_size` completions of each of this process's prompts (every process passes as many).

        params: the weights to sample with (default: the loaded ones; a run passes its train state's).
        Row r samples with key `row_keys(key, R)[r]`, so the tokens depend neither on the process
        nor on the mesh layout.
        """
        enc = self.encode(prompts)
        ids, mask = self.to_mesh((np.repeat(enc.ids, group_size, 0), np.repeat(enc.mask, group_size, 0)))
        rollout = generate_rows(self.decoder, self.decoder.init_cache, self.params if params is None else params,
                                ids, mask, self.row_keys(key, ids.shape[0]), sampling or self.sampling,
                                group_size=group_size, mesh=self.mesh)
        tokens, out_mask, logprobs, truncated = (distributed.local_rows(x) for x in
                                                 (rollout.tokens, rollout.mask, rollout.logprobs, rollout.truncated))
        local = Rollout(tokens, out_mask, logprobs, truncated, np.int32(out_mask.sum()))
        return Samples(enc, ids, mask, rollout, local)

    def decode(self, tokens: np.ndarray, mask: np.ndarray) -> list[str]:
        """Completion texts as rewards see them (`decode_completions`)."""
        return decode_completions(self.tokenizer, tokens, mask, self.formatter.assistant_prefix)

    def to_mesh(self, local):
        """This process's rows (a pytree of host arrays) -> global arrays, rows split over data x fsdp."""
        return distributed.global_batch(local, self.mesh)

    def row_keys(self, key: jax.Array, rows: int) -> jax.Array:
        """One key per global row, the same on every process (replicated)."""
        if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
            key = jax.random.key_data(key)
        return distributed.global_batch(np.asarray(row_keys(np.asarray(key), rows)), sharding.replicated(self.mesh))


def generate(policy: Policy, prompts: Sequence, sampling: Optional[SamplingParams] = None, *,
             group_size: int = 1, seed: int = 0) -> Generated:
    """Sample completions of `prompts` (text or chat messages, formatted as the config's data section says).

    sampling: default the config's rollout settings (`policy.sampling_params(...)` changes some).
    Returns this process's rows: group_size per prompt, prompt p's at rows p*G .. p*G+G-1.
    """
    out = policy.sample(list(prompts), jax.random.PRNGKey(seed), sampling, group_size).local
    return Generated(policy.decode(out.tokens, out.mask), out.tokens, out.mask, out.truncated)
