"""The GRPO run on the host: set up from a Config, then loop rollout -> rewards -> update.

    from grpo_jax.config import load_config
    from grpo_jax.loop import train
    summary = train(load_config("configs/demo.yaml"))

Everything numeric happens in jitted functions (rollout.generate, trainer.make_steps);
this module only moves batches between them, scores text, logs and checkpoints.
Rewards are scored on the host while the device computes the reference and old
log-probs of the same batch (JAX dispatches those asynchronously).
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from grpo_jax import distributed, packing, sharding
from grpo_jax.checkpoint import Checkpointer, abstract_like
from grpo_jax.config import CheckpointConfig, Config, announce_config, minibatch_rows, to_dict
from grpo_jax.data import PromptFormatter, batches, load_dataset
from grpo_jax.evaluate import evaluate
from grpo_jax.metrics import MetricsLogger, plot_run, truncate_metrics
from grpo_jax.models import transformer as tf
from grpo_jax.models.hf import load_converted, load_hf, load_tokenizer
from grpo_jax.objective import group_advantages
from grpo_jax.optim import make_optimizer
from grpo_jax.planner import micro_batch_candidates, resolve_auto_micro_batch
from grpo_jax.rewards import RewardError, RewardSet
from grpo_jax.rewards.compute import RewardResult
from grpo_jax.rollout import Rollout, SamplingParams, bucket_length, generate_rows, pad_prompts_left
from grpo_jax.trainer import (Batch, assemble_batch, init_train_state, make_steps, micro_batch_count, packed_batch,
                              sync_reference, train_flops, train_on_batch)

SKIP_COLUMNS = ("prompt", "index", "valid")


class TrainingStopped(ValueError):
    """Training cannot go on (e.g. non-finite losses in a row); the message says why."""


@dataclass
class Policy:
    """A loaded model as pure functions + params, and its tokenizer."""

    config: tf.TransformerConfig
    params: Any  # plain nested dict of arrays
    tokenizer: Any
    forward: Any  # (params, tokens, positions, mask, cache) -> (logits, cache)
    init_cache: Any  # (batch, max_len) -> KVCache
    param_shardings: Any  # same structure as params


def load_policy(cfg: Config, mesh: jax.sharding.Mesh) -> Policy:
    """model.path: an HF folder / hub id, or a folder written by `python -m launch convert`."""
    m = cfg.model
    shardings = lambda config, abs_model: tf.param_shardings(abs_model, mesh, sharding.DEFAULT_RULES)  # noqa: E731
    path = Path(os.path.expanduser(m.path))
    if (path / "model_config.json").exists():
        model, config = load_converted(path, shardings=shardings)
        config = config.replace(**m.decoder_overrides())
        tokenizer_src = m.tokenizer or (path / "tokenizer")
    else:
        overrides = m.decoder_overrides()
        model, config = load_hf(m.path, dtype=overrides.pop("param_dtype"), shardings=shardings, **overrides)
        tokenizer_src = m.tokenizer or m.path
    tokenizer = load_tokenizer(tokenizer_src, config)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    return Policy(config, params, tokenizer, functools.partial(tf.apply, config),
                  functools.partial(tf.init_cache, config), param_shardings)


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


def reward_columns(batch: dict, group_size: int, completion_lengths: np.ndarray) -> dict:
    """Dataset columns, each value repeated for the G completions of its prompt."""
    cols = {k: [v for v in values for _ in range(group_size)] for k, values in batch.items() if k not in SKIP_COLUMNS}
    cols["completion_lengths"] = [int(n) for n in completion_lengths]
    return cols


class _SignalFlag:
    """First SIGTERM / SIGINT: finish the step, save, exit. Second: exit at once."""

    def __init__(self):
        self.received: Optional[int] = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.received is not None:
            print(f"\nsecond {signal.Signals(signum).name}: exiting now without saving", flush=True)
            os._exit(128 + signum)
        self.received = signum
        print(f"\n{signal.Signals(signum).name} received: finishing this step and saving a checkpoint "
              "(send it again to exit at once)", flush=True)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Generation:
    """What sampling and scoring need: mesh, policy, prompts, rewards. Evaluation runs on this alone.

    Multi-process: every process builds one (with the same config), feeds its own prompts
    and gets its own rows back; the arrays in between are global, on one mesh.
    """

    def __init__(self, cfg: Config):
        distributed.initialize(cfg.mesh)  # first: joins a multi-process run (a no-op otherwise)
        self.cfg = cfg
        self.is_main = jax.process_index() == 0
        self.mesh = sharding.make_mesh(cfg.mesh)
        processes, dp = jax.process_count(), sharding.data_parallel_size(self.mesh)
        if dp % processes:
            raise ValueError(f"mesh data x fsdp = {dp} must be a multiple of the {processes} processes: each "
                             "process feeds its own rows of the batch")
        self.policy = load_policy(cfg, self.mesh)
        self.formatter = PromptFormatter.from_config(cfg.data, self.policy.tokenizer)
        self.rewards = RewardSet(cfg.rewards.functions, cfg.rewards.weights or None, on_error=cfg.rewards.on_error,
                                 num_workers=cfg.rewards.num_workers,
                                 context={"group_size": cfg.rollout.group_size,
                                          "max_completion_len": cfg.rollout.max_completion_length})
        self.sampling = SamplingParams.from_config(cfg.rollout, stop_token_ids(self.policy.tokenizer),
                                                   self.formatter.pad_id)
        self.greedy = SamplingParams(cfg.rollout.max_completion_length, temperature=0.0,
                                     stop_token_ids=self.sampling.stop_token_ids, pad_token_id=self.formatter.pad_id)

    @property
    def params(self):
        """The weights that sample: the loaded ones here, the training state's in a Run."""
        return self.policy.params

    def rollout(self, prompts, key, sampling: SamplingParams, group_size: int):
        """Encode, pad to the prompt bucket (the width the train step sees too), sample.

        prompts: this process's share (every process passes as many). Returns (enc, Rollout
        of this process's rows, as numpy). The width is the bucket of the longest prompt
        of any process, so all build the same global shape; row r samples with key
        `row_keys(key, R)[r]`, so the tokens do not depend on the process or mesh layout.
        """
        enc = self.formatter.encode(prompts, self.cfg.rollout.max_prompt_length, self.cfg.data.overlong_prompts)
        longest = distributed.global_max(int(enc.mask.sum(axis=1).max()))
        width = bucket_length(longest, self.cfg.rollout.prompt_length_buckets)
        enc.ids, enc.mask = pad_prompts_left(enc.ids, enc.mask, width, self.formatter.pad_id)
        ids, mask = self.to_mesh((np.repeat(enc.ids, group_size, 0), np.repeat(enc.mask, group_size, 0)))
        out = generate_rows(self.policy.forward, self.policy.init_cache, self.params, ids, mask,
                            self.row_keys(key, ids.shape[0]), sampling, group_size=group_size, mesh=self.mesh)
        tokens, mask, logprobs, truncated = (distributed.local_rows(x) for x in out[:4])
        return enc, Rollout(tokens, mask, logprobs, truncated, np.int32(mask.sum()))

    def to_mesh(self, local):
        """This process's rows (a pytree of host arrays) -> global arrays, rows split over data x fsdp."""
        return distributed.global_batch(local, self.mesh)

    def row_keys(self, key, rows: int) -> jax.Array:
        """One key per global row, the same on every process (replicated)."""
        if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
            key = jax.random.key_data(key)
        keys = np.asarray(jax.random.split(np.asarray(key), rows))
        return distributed.global_batch(keys, sharding.replicated(self.mesh))

    def close(self) -> None:
        self.rewards.close()


class Run(Generation):
    """One training run's live objects. `train(cfg)` builds one and calls `run()`."""

    def __init__(self, cfg: Config, show_config: bool = True):
        self.run_dir = Path(cfg.run.output_dir)
        distributed.initialize(cfg.mesh)  # before the first JAX call below
        if jax.process_index() == 0:
            announce_config(cfg, show=show_config)
        super().__init__(cfg)
        if cfg.grpo.micro_batch_size == "auto":  # compiled against this run's devices, before the steps are built
            cfg, line = resolve_auto_micro_batch(cfg, self.policy.config, self.mesh)
            self.cfg = cfg
            if self.is_main:
                print(line, flush=True)
        micro = cfg.grpo.micro_batch_size
        if micro and micro not in micro_batch_candidates(cfg, self.mesh):
            raise ValueError(f"grpo.micro_batch_size={micro} does not split over the mesh's data x fsdp = "
                             f"{sharding.data_parallel_size(self.mesh)} devices (each device takes a share of every "
                             "micro-batch); use a multiple of it or auto")
        updates = max(cfg.run.steps, 1) * cfg.grpo.num_iterations * cfg.grpo.num_minibatches
        self.optimizer = make_optimizer(cfg.optim, updates)
        self.train_data = load_dataset(cfg.data, cfg.data.split, cfg.run.seed)
        keep = None
        if cfg.data.overlong_prompts == "drop":
            keep = lambda row: not self.formatter.is_overlong(row["prompt"], cfg.rollout.max_prompt_length)  # noqa: E731
        self.data = batches(self.train_data, cfg.data.batch_size, cfg.run.seed, shuffle=cfg.data.shuffle, repeat=True,
                            process_index=jax.process_index(), process_count=jax.process_count(), keep=keep)
        self.eval_data = load_dataset(cfg.data, cfg.data.eval_split, cfg.run.seed) if cfg.data.eval_split else None
        state = init_train_state(self.policy.params, self.optimizer, jax.random.PRNGKey(cfg.run.seed),
                                 keep_reference=cfg.grpo.beta != 0)
        self.state_shardings = sharding.train_state_shardings(state, self.optimizer, self.policy.param_shardings,
                                                              self.mesh)
        self.state = jax.device_put(state, self.state_shardings)
        self.steps = make_steps(self.policy.forward, self.optimizer, cfg, self.state_shardings)
        self.assemble = jax.jit(assemble_batch)
        rows = jax.ShapeDtypeStruct((cfg.data.batch_size * cfg.rollout.group_size,), jnp.float32)
        self.advantages = jax.jit(functools.partial(group_advantages, group_size=cfg.rollout.group_size,
                                                    scale=cfg.grpo.scale_rewards, eps=cfg.grpo.advantage_eps),
                                  out_shardings=sharding.rows_sharding(rows, self.mesh))  # each process's own rows
        self.sync_reference = jax.jit(functools.partial(sync_reference, alpha=cfg.grpo.ref_mixup_alpha),
                                      donate_argnums=0, out_shardings=self.state_shardings)
        self.checkpointer = Checkpointer(self.run_dir, cfg.checkpoint)
        self.logger = MetricsLogger(self.run_dir, cfg.logging, cfg.run.steps, is_main=self.is_main,
                                    run_name=cfg.run.name, run_config=to_dict(cfg))
        self.history: list[dict] = []
        self.eval_history: list[dict] = []
        self.skipped_in_a_row = 0
        self.packed_shapes: set = set()  # (rows per unit, row length) of the packed batches so far
        self.samples: list[dict] = []  # a few (prompt, completion, reward) rows of the last step, for the log

    @property
    def params(self):
        return self.state.params

    # ------------------------------------------------------------ checkpoints

    def resume(self) -> int:
        """Restore the newest complete checkpoint, if any; returns the step to start from."""
        if not self.cfg.checkpoint.resume:
            return 0
        restored = self.checkpointer.restore_latest(abstract_like(self.state))
        if restored is None:
            return 0
        step, self.state, meta = restored
        self.data.restore(meta["data"])  # the same on every process: all walk the same stream of batches
        self.history = meta.get("history", [])
        self.eval_history = meta.get("eval_history", [])
        if self.is_main:
            truncate_metrics(self.run_dir, step)
        print(f"resumed from checkpoint {step} in {self.checkpointer.directory}", flush=True)
        return step

    def save(self, step: int, metrics: Optional[dict] = None) -> None:
        """Every process calls it: Orbax writes each process's shards, process 0 the meta.

        The meta (data position, history) is the same on every process, so process 0's is everyone's.
        """
        meta = {"step": step, "data": self.data.state(), "config": to_dict(self.cfg),
                "history": self.history, "eval_history": self.eval_history}
        self.checkpointer.save(step, self.state, meta, metrics=metrics)

    # ------------------------------------------------------------ one step

    def step(self, step: int) -> dict:
        """One GRPO step. Multi-process: each process samples and scores its own prompts' groups
        (advantages are per group, and a group never spans processes); the update is global."""
        cfg, G = self.cfg, self.cfg.rollout.group_size
        t0 = time.perf_counter()
        batch = next(self.data)
        enc, out = self.rollout(batch["prompt"], jax.random.fold_in(self.state.rng, step), self.sampling, G)
        tokens, mask, truncated = out.tokens, out.mask, out.truncated  # this process's rows
        t_rollout = time.perf_counter()

        loss_mask = mask & ~truncated[:, None] if cfg.grpo.mask_truncated_completions else mask
        rows = lambda x: np.repeat(x, G, axis=0)  # noqa: E731
        order = None  # packed: loss row k holds this process's row order[k]
        if cfg.grpo.pack_sequences:
            pending, order = self.packed(rows(enc.ids), rows(enc.mask), tokens, loss_mask)
        else:
            pending = self.assemble(*self.to_mesh((rows(enc.ids), rows(enc.mask), tokens, loss_mask,
                                                   np.zeros(len(tokens), np.float32))))
        in_loss_order = (lambda x: x) if order is None else (lambda x: x[order])  # noqa: E731
        pending = self.steps[0](self.state, pending)  # reference / old log-probs, dispatched asynchronously
        completions = decode_completions(self.policy.tokenizer, tokens, mask, self.formatter.assistant_prefix)
        prompts_text = [t for t in enc.texts for _ in range(G)]
        lengths = mask.sum(axis=1)
        result = self.rewards.submit(prompts_text, completions, reward_columns(batch, G, lengths),
                                     completion_ids=tokens, completion_mask=mask).result()
        t_reward = time.perf_counter()

        # advantages on the mesh, from every process's rewards ("batch" scaling needs the global std)
        advantages = self.advantages(self.to_mesh(result.total.astype(np.float32)))
        groups = result.total.reshape(-1, G)
        flat_groups = groups.max(1) == groups.min(1)
        if cfg.grpo.filter_zero_std_groups:
            informative = np.repeat(~flat_groups, G)[:, None]
            pending = pending._replace(completion_mask=self.to_mesh(in_loss_order(loss_mask & informative)))
        loss_advantages = advantages if order is None else self.to_mesh(
            in_loss_order(np.asarray(distributed.local_rows(advantages))))
        self.state, train_metrics = self._update(pending._replace(advantages=loss_advantages))
        if cfg.grpo.beta != 0 and cfg.grpo.ref_sync_steps and (step + 1) % cfg.grpo.ref_sync_steps == 0:
            self.state = self.sync_reference(self.state)
        train_metrics = {k: float(v) for k, v in train_metrics.items()}
        t_train = time.perf_counter()
        # the logged numbers cover the global batch: gather every process's rows (a no-op single-process)
        result, lengths, truncated, flat_groups = self.gather_result(result), *(
            distributed.allgather_rows(x) for x in (lengths, truncated, flat_groups))
        abs_advantages = distributed.allgather_rows(np.abs(distributed.local_rows(advantages)))
        flops = train_flops(self.policy.config, len(lengths), pending.tokens.shape[1], cfg)
        metrics = {
            **train_metrics,
            **result.stats("reward/"),
            "reward/mean": float(result.total.mean()),
            "reward/std": float(result.total.std()),
            "reward/zero_std_groups": float(np.mean(flat_groups)),
            "advantage/abs_mean": float(abs_advantages.mean()),
            "completion/mean_length": float(lengths.mean()),
            "completion/min_length": float(lengths.min()),
            "completion/max_length": float(lengths.max()),
            "completion/truncated": float(truncated.mean()),
            "time/rollout_s": t_rollout - t0,
            "time/reward_s": t_reward - t_rollout,
            "time/train_s": t_train - t_reward,
            "time/step_s": t_train - t0,
            "throughput/generated_tokens_per_s": float(lengths.sum()) / max(t_rollout - t0, 1e-9),
            "throughput/train_tflops": flops / max(t_train - t_reward, 1e-9) / 1e12,
            **self.combine_over_processes(enc.metrics()),
        }
        peak = cfg.logging.peak_tflops_per_device
        if peak:
            metrics["throughput/train_mfu"] = metrics["throughput/train_tflops"] / (peak * jax.device_count())
        self.check_finite(step, metrics)
        if self.is_main and cfg.logging.log_completions:
            samples = [{"prompt": prompts_text[i], "completion": completions[i], "reward": float(result.total[i])}
                       for i in range(0, len(completions), max(1, len(completions) // cfg.logging.log_completions))]
            self.samples = samples
        return metrics

    def packed(self, prompt_ids, prompt_mask, completion_ids, completion_mask) -> tuple[Batch, np.ndarray]:
        """This process's rows packed (grpo.pack_sequences; packing.py) as a global Batch, and the row order.

        Rows per (device, micro-batch) unit are the same on every process: the most any needs,
        rounded up to a bucket (packing.bucket_rows), so a run compiles a few packed shapes (each one is logged)."""
        cfg = self.cfg
        devices = sharding.data_parallel_size(self.mesh) // jax.process_count()
        micro = micro_batch_count(cfg, minibatch_rows(cfg))  # one minibatch: packing needs num_minibatches=1
        length = cfg.grpo.pack_length or prompt_ids.shape[1] + completion_ids.shape[1]
        lengths = np.asarray(prompt_mask).sum(1) + np.asarray(completion_mask).sum(1)
        units = devices * micro
        needed = distributed.global_max(packing.rows_needed(lengths, units, length))
        per_unit = packing.bucket_rows(needed, len(lengths) // units)
        if (per_unit, length) not in self.packed_shapes and self.is_main:
            self.packed_shapes.add((per_unit, length))
            print(f"packing {len(lengths)} sequences per process into {units * per_unit} rows of {length} tokens "
                  f"(a new packed shape: {len(self.packed_shapes)} so far)", flush=True)
        packed = packing.pack(prompt_ids, prompt_mask, completion_ids, completion_mask, devices=devices,
                              micro_batches=micro, length=length, rows_per_unit=per_unit,
                              pad_token_id=self.formatter.pad_id)
        batch = packed_batch(packed, np.asarray(completion_mask)[packed.order],
                             np.zeros(len(lengths), np.float32))
        return self.to_mesh(batch), packed.order

    def _update(self, batch: Batch):
        return train_on_batch(self.state, batch, self.steps[1], self.cfg)

    @staticmethod
    def gather_result(result: RewardResult) -> RewardResult:
        """Every process's scores in one RewardResult (for logging); the result itself single-process."""
        if jax.process_count() == 1:
            return result
        rewards = distributed.allgather_rows(result.rewards)
        errors = distributed.allgather_rows(np.asarray([[result.num_errors.get(n, 0) for n in result.names]]))
        means = {}
        for k, name in enumerate(result.names):
            col = rewards[:, k][~np.isnan(rewards[:, k])]
            means[name] = float(col.mean()) if col.size else float("nan")
        return RewardResult(result.names, result.weights, rewards, distributed.allgather_rows(result.total), means,
                            {n: int(e) for n, e in zip(result.names, errors.sum(0))})

    @staticmethod
    def combine_over_processes(metrics: dict) -> dict:
        """Per-process prompt metrics over all processes: counts add up, maxima take the max, means average
        (every process has as many prompts). The dict itself single-process."""
        if jax.process_count() == 1:
            return metrics
        def combine(key, column):
            if key.endswith("_max"):
                return column.max()
            return column.sum() if key.startswith("data/prompts_") else column.mean()

        return {k: float(combine(k, column)) for k, column in distributed.allgather_scalars(metrics).items()}

    def check_finite(self, step: int, metrics: dict) -> None:
        skipped = metrics.get("update_skipped", 0.0)
        self.skipped_in_a_row = self.skipped_in_a_row + 1 if skipped else 0
        if skipped:
            print(f"warning: step {step + 1}: non-finite loss ({metrics.get('loss')}) or grad norm "
                  f"({metrics.get('grad_norm')}); update skipped", flush=True)
        if self.skipped_in_a_row >= self.cfg.run.max_skipped_updates:
            raise TrainingStopped(
                f"{self.skipped_in_a_row} steps in a row ending at step {step + 1} had a non-finite loss "
                f"(last: loss={metrics.get('loss')}, grad_norm={metrics.get('grad_norm')}); lower optim.learning_rate "
                "or check the rewards and data; the last good checkpoint is kept")

    # ------------------------------------------------------------ evaluation

    def evaluate(self, step: int) -> dict:
        """Greedy pass@1 on the held-out split: each reward function's mean, and the mean length."""
        if self.eval_data is None:
            return {}
        # multi-process: each process scores its share of the examples; combine weighted by examples
        processes = jax.process_count()
        metrics = evaluate(self, self.eval_data, -(-self.cfg.run.eval_max_examples // processes))
        if processes > 1:
            columns = distributed.allgather_scalars(metrics)
            weights = columns["eval/examples"]
            metrics = {k: float(np.average(column, weights=weights)) for k, column in columns.items()}
            metrics["eval/examples"] = float(weights.sum())
            metrics["eval/time_s"] = float(columns["eval/time_s"].max())
        self.eval_history.append({"step": step, **metrics})
        return metrics

    # ------------------------------------------------------------ the loop

    def run(self) -> dict:
        cfg = self.cfg
        start = self.resume()
        if start == 0 and self.eval_data is not None:
            self.logger.log(0, self.evaluate(0))
        step = start
        with _SignalFlag() as signals:
            try:
                for step in range(start, cfg.run.steps):
                    metrics = self.step(step)
                    done = step + 1
                    if cfg.run.eval_every and done % cfg.run.eval_every == 0 and done < cfg.run.steps:
                        metrics.update(self.evaluate(done))
                    self.history.append({"step": done, **{k: v for k, v in metrics.items() if k in HISTORY_KEYS}})
                    if done % cfg.logging.every_steps == 0 or done == cfg.run.steps:
                        self.logger.log(done, metrics)
                        if self.samples:
                            self.logger.log_samples(done, self.samples)
                    else:
                        self.logger.log(done, metrics, console=False)
                    if distributed.any_process(signals.received is not None):  # all processes stop together
                        self.save(done)
                        self.checkpointer.wait()
                        print(f"saved checkpoint {done}; resume with the same command "
                              f"(checkpoint.resume=true picks it up from {self.run_dir})", flush=True)
                        return {"stopped_at": done, "signal": signals.received or signal.SIGTERM}
                    if cfg.checkpoint.every_steps and done % cfg.checkpoint.every_steps == 0 and done < cfg.run.steps:
                        self.save(done, metrics={k: v for k, v in metrics.items() if k.startswith("eval/")} or None)
                step = cfg.run.steps
            except RewardError:
                # multi-process, the other processes are not saving with us: exit (train() does) instead
                if step > 0 and jax.process_count() == 1:
                    self.save(step)
                    self.checkpointer.wait()
                raise
        final_eval = self.evaluate(cfg.run.steps) if self.eval_data is not None and start < cfg.run.steps else {}
        if final_eval:
            self.logger.log(cfg.run.steps, final_eval)
        self.save(cfg.run.steps, metrics=final_eval or None)
        self.checkpointer.wait()
        self.logger.close()
        plots = []
        if self.is_main:
            try:
                plots = [str(p) for p in plot_run(self.run_dir)]
            except ValueError:
                plots = []
        before = next((e for e in self.eval_history if e["step"] == 0), {})
        return {"before": before, "after": final_eval, "history": self.history, "run_dir": str(self.run_dir),
                "plots": plots}

    def close(self) -> None:
        super().close()
        self.checkpointer.close()


HISTORY_KEYS = ("reward/mean", "loss", "kl", "completion/mean_length", "time/step_s")


def train(cfg: Config, show_config: bool = True) -> dict:
    """One GRPO run; show_config=False prints only where the resolved config was saved."""
    run = None
    try:
        run = Run(cfg, show_config)
        return run.run()
    except BaseException as e:
        if distributed.is_initialized() and jax.process_count() > 1:
            exit_now(e)
        raise
    finally:
        if run is not None:
            run.close()


def exit_now(error: BaseException) -> None:
    """Multi-process: a process that fails leaves at once, without the shutdown barrier at exit.

    Its peers then see it gone (a failed collective, or missed heartbeats) and stop
    too, instead of waiting for it in the next collective.
    """
    import traceback

    traceback.print_exception(error)
    print(f"process {jax.process_index()} of {jax.process_count()} failed ({type(error).__name__}: "
          f"{str(error).splitlines()[0] if str(error) else ''}); exiting so that the other processes stop too",
          file=sys.stderr, flush=True)
    os._exit(1)


def checkpoint_params(run_dir: str | os.PathLike, step: Optional[int] = None, best: bool = False) -> tuple[Any, int]:
    """The policy params saved in a training run's checkpoint: the newest, a given step, or the best.

    "Best" is by the run's checkpoint.keep_best_metric over the evaluations it recorded
    (checkpoint.keep_best_mode says whether higher or lower wins).
    """
    from grpo_jax.checkpoint import Checkpointer
    from grpo_jax.config import load_config

    run_dir = Path(run_dir)
    if not (run_dir / "checkpoints").is_dir():
        raise ValueError(f"{run_dir} is not a training run directory (no checkpoints/ inside)")
    cfg = load_config(run_dir / "config.yaml") if (run_dir / "config.yaml").exists() else None
    ckpt = Checkpointer(run_dir, cfg.checkpoint if cfg else CheckpointConfig())
    steps = ckpt.steps()
    if not steps:
        raise ValueError(f"{run_dir}: no complete checkpoint to read")
    if best:
        metric = cfg.checkpoint.keep_best_metric if cfg else None
        if not metric:
            raise ValueError(f"{run_dir}: --best needs checkpoint.keep_best_metric in the run's config")
        _, meta = ckpt.read(steps[-1])
        scored = [(e["step"], e[metric]) for e in meta.get("eval_history", [])
                  if e.get("step") in steps and e.get(metric) is not None]
        if not scored:
            raise ValueError(f"{run_dir}: no checkpoint has a recorded {metric}")
        pick = max if cfg.checkpoint.keep_best_mode == "max" else min
        step = pick(scored, key=lambda item: item[1])[0]
    elif step is None:
        step = steps[-1]
    elif step not in steps:
        raise ValueError(f"{run_dir}: no checkpoint for step {step}; have {steps}")
    state, _ = ckpt.read(step)
    ckpt.close()
    return state["params"], step
