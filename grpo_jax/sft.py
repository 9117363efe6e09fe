"""Supervised fine-tuning on (prompt, completion) pairs: the R1 "cold start" stage.

Same model loading, prompts, data, mesh, metrics and checkpoint format as GRPO;
the loss is the mean negative log-likelihood of the completion tokens only
(prompt tokens are context). The result is written as a converted checkpoint
(`python -m launch convert` format) that `model.path` of a GRPO run can point to.
With model.lora_rank > 0 it trains adapters on the frozen base and writes base + adapters summed.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from grpo_jax import sharding
from grpo_jax.config import Config, save_config
from grpo_jax.data import batches, load_dataset
from grpo_jax.data.prompts import pad_prompts_left
from grpo_jax.metrics import MetricsLogger
from grpo_jax.models import lora
from grpo_jax.models.hf import save_converted
from grpo_jax.optim import make_optimizer
from grpo_jax.policy import Policy
from grpo_jax.rollout import bucket_length
from grpo_jax.trainer import Batch, assemble_batch, completion_logprobs, dropout_key, init_train_state


def completion_targets(tokenizer, rows: dict, template: str, max_len: int, prefix: str = "") -> list[list[int]]:
    """Token ids of each row's target completion (template filled from the row), ending in EOS.

    prefix: data.assistant_prefix, which already ends the prompt; a target starting with
    it has it removed, so prompt + target reads as the filled template once.
    """
    n = len(rows["prompt"])
    out = []
    for i in range(n):
        row = {k: v[i] for k, v in rows.items()}
        try:
            text = template.format(**row)
        except KeyError as e:
            raise ValueError(f"sft.completion_template uses {e}, which the data rows do not have "
                             f"(columns: {', '.join(sorted(row))})") from None
        if prefix and text.startswith(prefix):
            text = text[len(prefix):]
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][: max_len - 1]
        out.append(list(ids) + [tokenizer.eos_token_id])
    return out


def pad_right(seqs: list[list[int]], width: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.full((len(seqs), width), pad, np.int32)
    mask = np.zeros((len(seqs), width), bool)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = True
    return ids, mask


def make_sft_step(model, optimizer, state_shardings, spec: Optional[lora.LoraSpec] = None):
    """The jitted SFT step: mean token NLL of the completions (model: a `transformer.Decoder`).
    spec (LoRA): the state trains adapters, on the base passed as `frozen=`."""
    def loss_fn(params, batch: Batch, frozen, dropout_key):
        if spec is not None:
            params = lora.combine(frozen, params, spec, dropout_key)
        logp = completion_logprobs(model, params, batch, 1.0)
        mask = batch.completion_mask
        nll = -jnp.sum(jnp.where(mask, logp, 0.0)) / jnp.maximum(jnp.sum(mask), 1)
        correct = jnp.sum(jnp.where(mask, logp > jnp.log(0.5), False)) / jnp.maximum(jnp.sum(mask), 1)
        return nll, {"sft/loss": nll, "sft/token_accuracy": correct}

    def step(state, batch: Batch, frozen=None):
        state, key = dropout_key(state, spec)
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, frozen, key)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics["sft/grad_norm"] = optax.tree.norm(grads)
        return state.replace(params=params, opt_state=opt_state, step=state.step + 1), metrics

    return jax.jit(step, donate_argnums=0, out_shardings=(state_shardings, None))


def run_sft(cfg: Config, out_dir: str | Path | None = None) -> Path:
    """Fine-tune model.path on data's train split for sft.steps; returns the converted model folder."""
    out_dir = Path(out_dir or Path(cfg.run.output_dir) / "sft")
    save_config(cfg, out_dir)
    policy = Policy.load(cfg)
    mesh, formatter = policy.mesh, policy.formatter
    s = cfg.sft
    optimizer = make_optimizer(dataclasses.replace(cfg.optim, learning_rate=s.learning_rate, schedule="cosine",
                                                   warmup_steps=s.warmup_steps), max(s.steps, 1))
    rng = jax.random.PRNGKey(cfg.run.seed)
    trained = policy.params if policy.lora is None else policy.initial_adapters(jax.random.fold_in(rng, 1))
    state = init_train_state(trained, optimizer, rng, keep_reference=False)
    shardings = sharding.train_state_shardings(state, optimizer, policy.trained_shardings(trained), mesh)
    state = jax.device_put(state, shardings)
    step_fn = functools.partial(make_sft_step(policy.decoder, optimizer, shardings, policy.lora),
                                frozen=None if policy.lora is None else policy.params)
    data = batches(load_dataset(cfg.data, cfg.data.split, cfg.run.seed), s.batch_size, cfg.run.seed,
                   shuffle=cfg.data.shuffle, repeat=True, process_index=jax.process_index(),
                   process_count=jax.process_count())
    logger = MetricsLogger(out_dir, cfg.logging, s.steps, is_main=jax.process_index() == 0)
    t0 = time.perf_counter()
    for i in range(s.steps):
        rows = next(data)
        enc = formatter.encode(rows["prompt"], cfg.rollout.max_prompt_length, "truncate_left")
        width = bucket_length(enc.ids.shape[1], cfg.rollout.prompt_length_buckets)  # few compiled shapes
        p_ids, p_mask = pad_prompts_left(enc.ids, enc.mask, width, formatter.pad_id)
        c_ids, c_mask = pad_right(completion_targets(policy.tokenizer, rows, s.completion_template,
                                                     s.max_completion_length, formatter.assistant_prefix),
                                  s.max_completion_length, formatter.pad_id)
        batch = sharding.shard_rows(assemble_batch(p_ids, p_mask, c_ids, c_mask, np.zeros(len(c_ids))), mesh)
        state, metrics = step_fn(state, batch)
        if (i + 1) % cfg.logging.every_steps == 0 or i + 1 == s.steps:
            metrics = {k: float(v) for k, v in metrics.items()}
            metrics["time/elapsed_s"] = time.perf_counter() - t0
            line = f"sft step {i + 1}/{s.steps} | loss {metrics['sft/loss']:.4f} | token acc " \
                   f"{metrics['sft/token_accuracy']:.3f}"
            logger.log(i + 1, metrics, console=False)
            if (i + 1) % max(1, s.steps // 10) == 0 or i + 1 == s.steps:
                print(line, flush=True)
    logger.close()
    model_dir = out_dir / "model"
    tokenizer_dir = out_dir / "tokenizer_src"
    policy.tokenizer.save_pretrained(str(tokenizer_dir))
    # LoRA: base + adapters summed, so the next stage (or `launch train`) starts from the fine-tuned model
    save_converted(model_dir, jax.device_get(policy.merged(state.params)), policy.config, tokenizer_src=tokenizer_dir)
    print(f"SFT model written to {model_dir}", flush=True)
    return model_dir
