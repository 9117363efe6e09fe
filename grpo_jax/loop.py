"""The GRPO run on the host: set up from a Config, then every step generate -> score -> advantages -> update -> log.

    from grpo_jax.config import load_config
    from grpo_jax.loop import train
    summary = train(load_config("configs/demo.yaml"))

Everything numeric happens in jitted functions (the policy's sampler, trainer.make_steps);
this module only moves batches between them, scores text, logs and checkpoints.
Rewards are scored on the host while the device computes the reference and old
log-probs of the same batch (JAX dispatches those asynchronously).
Multi-process: each process samples and scores its own prompts' groups (advantages are
per group, and a group never spans processes); the update is global.
"""

from __future__ import annotations

import functools
import signal
import time
from pathlib import Path
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from grpo_jax import distributed, packing, sharding
from grpo_jax.checkpoint import Checkpointer, abstract_like
from grpo_jax.config import Config, ConfigError, announce_config, minibatch_rows, optimizer_updates, to_dict
from grpo_jax.critic import load_critic
from grpo_jax.data import load_dataset, run_batches
from grpo_jax.evaluate import EvaluationStopped, evaluate_over_processes, metric_names
from grpo_jax.metrics import MetricsLogger, plot_run
from grpo_jax.objective import flat_groups, group_advantages
from grpo_jax.optim import make_critic_optimizer, make_optimizer
from grpo_jax.planner import run_micro_batch, training_line
from grpo_jax.policy import Policy, Samples
from grpo_jax.rewards import RewardError, RewardSet
from grpo_jax.rewards.compute import RewardResult
from grpo_jax.run_dir import Claim, RunLock, claim, record_config
from grpo_jax.signals import StopSignals
from grpo_jax.step_metrics import (
    HISTORY_KEYS,
    SkippedUpdates,
    StepTimes,
    combine_prompt_metrics,
    gather_rewards,
    grpo_step_metrics,
)
from grpo_jax.trainer import (
    Batch,
    CriticModel,
    Steps,
    init_train_state,
    is_ppo,
    keeps_reference,
    loss_mask,
    make_steps,
    micro_batch_count,
    packed_batch,
    ppo_batch,
    rollout_batch,
    sync_reference,
    train_flops,
    train_on_batch,
)


class Scored(NamedTuple):
    """A rollout's completions as text and their rewards (this process's rows)."""

    prompts: list[str]  # each prompt's text (prompt p's completions are rows p*G .. p*G+G-1)
    completions: list[str]
    result: RewardResult


class Run:
    """One training run's live objects. `train(cfg)` builds one and calls `run()`."""

    def __init__(self, cfg: Config, show_config: bool = True):
        distributed.initialize(cfg.mesh)  # first: joins a multi-process run (a no-op otherwise)
        self.is_main = jax.process_index() == 0
        self.lock: Optional[RunLock] = None
        try:
            self.setup(self.claim_run_dir(cfg), show_config)
        except BaseException:
            if self.lock is not None:
                self.lock.release()
            raise

    def claim_run_dir(self, cfg: Config) -> Claim:
        """Lock the run dir (process 0) and check the config against the run it holds (run_dir.claim)."""
        self.lock_run_dir(cfg.run.output_dir)
        claimed = claim(cfg)
        for line in claimed.lines:
            print(line, flush=True)
        if claimed.cfg.run.output_dir != cfg.run.output_dir:  # run.resume=new_dir: the new dir is the run's
            self.lock_run_dir(claimed.cfg.run.output_dir)
        return claimed

    def lock_run_dir(self, run_dir: str) -> None:
        if not self.is_main:
            return
        if self.lock is not None:
            self.lock.release()
        self.lock = RunLock(run_dir)
        note = self.lock.acquire()
        if note:
            print(note, flush=True)

    def setup(self, claimed: Claim, show_config: bool) -> None:
        cfg, self.claimed = claimed.cfg, claimed
        self.run_dir = Path(cfg.run.output_dir)
        if self.is_main:
            announce_config(cfg, save=False, show=show_config)  # written once the run dir's checkpoint restored
        self.mesh = distributed.setup_mesh(cfg.mesh)
        self.policy = Policy.load(cfg, self.mesh)
        cfg, line = run_micro_batch(cfg, self.policy.config, self.mesh)  # auto: compiled against these devices
        if line and self.is_main:
            print(line, flush=True)
        self.cfg = cfg
        self.rewards = RewardSet.from_config(cfg)
        best, known = cfg.checkpoint.keep_best_metric, metric_names(self.rewards.names)
        if best is not None and best not in known:
            raise ConfigError(f"checkpoint.keep_best_metric={best} is not an evaluation metric of this run; "
                              f"its metrics: {', '.join(known)}")
        self.train_data = load_dataset(cfg.data, cfg.data.split, cfg.run.seed)
        self.eval_data = load_dataset(cfg.data, cfg.data.eval_split, cfg.run.seed) if cfg.data.eval_split else None
        self.data = run_batches(self.train_data, cfg, self.policy.formatter, jax.process_index(), jax.process_count())
        self.optimizer = make_optimizer(cfg.optim, optimizer_updates(cfg))
        rng = jax.random.PRNGKey(cfg.run.seed)
        # LoRA: the state trains the adapters; the policy keeps the frozen base, passed to the steps beside it
        trained = self.policy.params if self.policy.lora is None else self.policy.initial_adapters(
            jax.random.fold_in(rng, 1))
        # PPO: the critic (critic.py) trains beside the policy with its own optimizer, in the same state
        critic = load_critic(cfg, self.policy) if is_ppo(cfg) else None
        critic_optimizer = make_critic_optimizer(cfg, optimizer_updates(cfg)) if critic else None
        state = init_train_state(trained, self.optimizer, rng, keep_reference=keeps_reference(cfg),
                                 critic_params=critic and critic.params, critic_optimizer=critic_optimizer)
        if (self.policy.lora is not None or critic) and self.is_main:
            print(f"training: {training_line(cfg, self.policy.config, state, self.policy.params)}", flush=True)
        self.state_shardings = sharding.train_state_shardings(
            state, self.optimizer, self.policy.trained_shardings(trained), self.mesh, critic_optimizer,
            critic and critic.shardings)
        self.state = jax.device_put(state, self.state_shardings)
        steps = make_steps(self.policy.decoder, self.optimizer, cfg, self.state_shardings,
                           critic=critic and CriticModel(critic.decoder, critic_optimizer))
        frozen = None if self.policy.lora is None else self.policy.params
        self.device_steps = Steps(*(functools.partial(fn, frozen=frozen) for fn in steps))
        self.rollout_batch = jax.jit(rollout_batch, static_argnums=3)  # the loss Batch from the rollout's arrays
        self.drop_rows = jax.jit(lambda mask, keep: mask & keep[:, None])
        rows = jax.ShapeDtypeStruct((cfg.data.batch_size * cfg.rollout.group_size,), jnp.float32)
        self.ppo_batch = jax.jit(functools.partial(ppo_batch, cfg=cfg))
        self.group_advantages = jax.jit(functools.partial(group_advantages, group_size=cfg.rollout.group_size,
                                                          scale=cfg.grpo.scale_rewards, eps=cfg.grpo.advantage_eps),
                                        out_shardings=sharding.rows_sharding(rows, self.mesh))  # each its own rows
        self.sync_reference = jax.jit(functools.partial(sync_reference, alpha=cfg.grpo.ref_mixup_alpha),
                                      donate_argnums=0, out_shardings=self.state_shardings)
        self.checkpointer = Checkpointer(self.run_dir, cfg.checkpoint)
        self.logger = MetricsLogger(self.run_dir, cfg.logging, cfg.run.steps, is_main=self.is_main,
                                    run_name=cfg.run.name, run_config=to_dict(cfg))
        self.history: list[dict] = []
        self.eval_history: list[dict] = []
        self.skipped = SkippedUpdates(cfg.run.max_skipped_updates)
        self.packed_shapes: set = set()  # (rows, row length) of this process's packed batches so far
        self.samples: list[dict] = []  # a few (prompt, completion, reward) rows of the last step, for the log
        self.unscored_warned: set = set()  # reward functions already reported for scoring nothing

    # ------------------------------------------------------------ checkpoints

    def resume(self) -> tuple[int, bool]:
        """Restore the newest valid checkpoint, if any, and cut the log files back to it.

        Returns (the step to start from, whether that checkpoint ended a finished run)."""
        restored = self.checkpointer.restore_latest(abstract_like(self.state))
        if restored is None:
            self.logger.cut_back(None)
            return 0, False
        step, self.state, meta = restored
        self.data.restore(meta["data"])  # the same on every process: all walk the same stream of batches
        self.history = meta.get("history", [])
        self.eval_history = meta.get("eval_history", [])
        if "log_rows" in meta:  # (checkpoints written before the row counts were recorded keep their logs)
            self.logger.cut_back(meta["log_rows"])
        return step, bool(meta.get("complete"))

    def save(self, step: int, metrics: Optional[dict] = None, complete: bool = False) -> None:
        """Every process calls it: Orbax writes each process's shards, process 0 the meta.

        The meta (data position, history, log rows) is the same on every process, so process 0's is everyone's.
        complete: the run's final checkpoint, after its final evaluation.
        """
        meta = {"step": step, "data": self.data.state(), "config": to_dict(self.cfg), "history": self.history,
                "eval_history": self.eval_history, "log_rows": dict(self.logger.rows), "complete": complete}
        if self.policy.lora is not None:  # the state holds the adapters only: the base they go on
            meta["lora_base"] = self.cfg.model.path
        self.checkpointer.save(step, self.state, meta, metrics=metrics)

    # ------------------------------------------------------------ one step, stage by stage

    def step(self, step: int) -> dict:
        """One GRPO step (`step` counts from 0): generate -> score -> advantages -> update -> log."""
        t0 = time.perf_counter()
        dropped = self.data.dropped
        rows = next(self.data)
        samples = self.policy.sample(rows["prompt"], jax.random.fold_in(self.state.rng, step),
                                     group_size=self.group_size, params=self.policy.decoder_params(self.state.params))
        t_rollout = time.perf_counter()
        batch, order = self.loss_batch(samples)
        batch = self.device_steps.reference_and_old_logps(self.state, batch)  # dispatched, runs while we score
        scored = self.score(rows, samples)
        t_reward = time.perf_counter()
        batch, advantages, flat, advantage_metrics = self.with_advantages(batch, scored.result, order)
        train_metrics = self.update(batch, step)  # dispatched first: the advantage metrics are read after it
        train_metrics.update({k: float(v) for k, v in advantage_metrics.items()})
        times = StepTimes(t_rollout - t0, t_reward - t_rollout, time.perf_counter() - t_reward)
        metrics = self.step_metrics(step, samples, scored, advantages, flat, train_metrics, times,
                                    seq_len=batch.tokens.shape[1])
        metrics["data/prompts_dropped"] = float(self.data.dropped - dropped)  # too long, left out of the batch
        return metrics

    @property
    def group_size(self) -> int:
        return self.cfg.rollout.group_size

    def loss_batch(self, samples: Samples) -> tuple[Batch, Optional[np.ndarray]]:
        """The rollout laid out for the loss: padded from its device arrays, or packed (grpo.pack_sequences)
        on the host. Returns (Batch, order): packed loss row k holds this process's row order[k] (None: as is)."""
        grpo = self.cfg.grpo
        if not grpo.pack_sequences:
            return self.rollout_batch(samples.prompt_ids, samples.prompt_mask, samples.rollout,
                                      grpo.mask_truncated_completions), None
        out = samples.local
        rows = lambda x: np.repeat(x, self.group_size, axis=0)  # noqa: E731
        return self.packed(rows(samples.prompts.ids), rows(samples.prompts.mask), out.tokens,
                           loss_mask(out.mask, out.truncated, grpo.mask_truncated_completions), out.logprobs)

    def score(self, rows: dict, samples: Samples) -> Scored:
        """Decode this process's completions and score them (host reward functions in the reward workers)."""
        out = samples.local
        completions = self.policy.decode(out.tokens, out.mask)
        result = self.rewards.score_groups(samples.prompts.texts, completions, rows, self.group_size, out.tokens,
                                           out.mask)
        for name in set(result.unscored()) - self.unscored_warned:
            self.unscored_warned.add(name)
            print(f"warning: reward function {name} scored none of the {len(completions)} completions "
                  "(it returned NaN or None for each); it adds nothing to the reward", flush=True)
        return Scored(samples.prompts.texts, completions, result)

    def with_advantages(self, batch: Batch, result: RewardResult, order: Optional[np.ndarray]):
        """Group-relative advantages on the mesh ("batch" scaling needs every process's rewards), in the loss's
        row order; groups with equal rewards leave the loss under grpo.filter_zero_std_groups. PPO: per-token
        GAE advantages from the critic's values instead (`trainer.ppo_batch`).
        Returns (batch, each row's advantage (PPO: mean |A| over its tokens), which groups were flat, metrics)."""
        if is_ppo(self.cfg):
            batch, metrics = self.ppo_batch(batch, self.policy.to_mesh(result.total.astype(np.float32)))
            rows = metrics.pop("advantage_rows")
            single = self.group_size == 1  # no groups to be flat
            flat = np.zeros(len(result.total), bool) if single else flat_groups(result.total, self.group_size)
            return batch, rows, flat, metrics
        advantages = self.group_advantages(self.policy.to_mesh(result.total.astype(np.float32)))
        flat = flat_groups(result.total, self.group_size)
        in_loss_order = (lambda x: x) if order is None else (lambda x: x[order])  # noqa: E731
        if self.cfg.grpo.filter_zero_std_groups:
            informative = self.policy.to_mesh(in_loss_order(np.repeat(~flat, self.group_size)))
            batch = batch._replace(completion_mask=self.drop_rows(batch.completion_mask, informative))
        loss_advantages = advantages if order is None else self.policy.to_mesh(
            in_loss_order(np.asarray(distributed.local_rows(advantages))))
        return batch._replace(advantages=loss_advantages), advantages, flat, {}

    def update(self, batch: Batch, step: int) -> dict:
        """The step's optimizer updates (minibatches shuffled by (seed, step)), then the reference sync."""
        cfg = self.cfg
        self.state, metrics = train_on_batch(self.state, batch, self.device_steps.update, cfg,
                                             shuffle_seed=(cfg.run.seed, step))
        if cfg.grpo.beta != 0 and cfg.grpo.ref_sync_steps and (step + 1) % cfg.grpo.ref_sync_steps == 0:
            self.state = self.sync_reference(self.state)
        return {k: float(v) for k, v in metrics.items()}

    def step_metrics(self, step: int, samples: Samples, scored: Scored, advantages: jax.Array, flat: np.ndarray,
                     train_metrics: dict, times: StepTimes, seq_len: int) -> dict:
        """The logged numbers over the global batch (every process's rows), and a few sample rows."""
        out = samples.local
        result = gather_rewards(scored.result)
        lengths, truncated, flat = (distributed.allgather_rows(x) for x in (out.mask.sum(axis=1), out.truncated, flat))
        abs_advantages = distributed.allgather_rows(np.abs(distributed.local_rows(advantages)))
        flops = train_flops(self.policy.config, len(lengths), seq_len, self.cfg)
        metrics = grpo_step_metrics(train_metrics, result, abs_advantages, lengths, truncated, flat, times, flops,
                                    combine_prompt_metrics(samples.prompts.metrics()),
                                    self.cfg.logging.peak_tflops_per_device)
        self.skipped.check(step, metrics)
        shown = self.cfg.logging.log_completions
        if self.is_main and shown:
            every = max(1, len(scored.completions) // shown)
            self.samples = [{"prompt": scored.prompts[i // self.group_size], "completion": scored.completions[i],
                             "reward": float(scored.result.total[i])} for i in range(0, len(scored.completions), every)]
        return metrics

    def packed(self, prompt_ids, prompt_mask, completion_ids, completion_mask,
               sampler_logp) -> tuple[Batch, np.ndarray]:
        """This process's rows packed (grpo.pack_sequences; packing.py) as a global Batch, and the row order;
        each new packed shape (a compile) is logged."""
        cfg = self.cfg
        packed = packing.pack_over_mesh(
            prompt_ids, prompt_mask, completion_ids, completion_mask,
            devices=sharding.data_parallel_size(self.mesh) // jax.process_count(),
            micro_batches=micro_batch_count(cfg, minibatch_rows(cfg)),  # one minibatch: packing needs one
            length=cfg.grpo.pack_length or prompt_ids.shape[1] + completion_ids.shape[1],
            pad_token_id=self.policy.formatter.pad_id, global_max=distributed.global_max)
        if packed.tokens.shape not in self.packed_shapes and self.is_main:
            self.packed_shapes.add(packed.tokens.shape)
            print(f"packing {len(packed.order)} sequences per process into {packed.tokens.shape[0]} rows of "
                  f"{packed.tokens.shape[1]} tokens (a new packed shape: {len(self.packed_shapes)} so far)", flush=True)
        batch = packed_batch(packed, np.asarray(completion_mask)[packed.order], np.zeros(len(packed.order), np.float32),
                             np.asarray(sampler_logp)[packed.order])
        return self.policy.to_mesh(batch), packed.order

    # ------------------------------------------------------------ evaluation

    def evaluate(self, step: int, signals: Optional[StopSignals] = None) -> dict:
        """Greedy pass@1 of the current params on the held-out split (evaluate.py), over every process.
        A stop signal ends it early (EvaluationStopped)."""
        if self.eval_data is None:
            return {}
        stop = (lambda: signals.received is not None) if signals is not None else None  # noqa: E731
        metrics = evaluate_over_processes(self.policy, self.rewards, self.eval_data, self.cfg.run.eval_max_examples,
                                          params=self.policy.decoder_params(self.state.params), stop=stop)
        self.eval_history.append({"step": step, **metrics})
        return metrics

    # ------------------------------------------------------------ the loop

    def run(self) -> dict:
        """Resume, train to run.steps (evaluating, logging, checkpointing), evaluate and save at the end.

        A stop signal anywhere (SIGTERM, Ctrl-C) saves the last completed step and returns why; before
        the first step there is nothing to save and the signal ends the process (signals.py)."""
        with StopSignals() as signals:
            start, complete = self.resume()
            if self.already_done(start, complete):
                return {"complete_at": start, "run_dir": str(self.run_dir)}
            self.begin(start)
            signals.arm()  # from here on a signal saves a checkpoint
            stopped = self.train_steps(start, signals)
            if stopped:
                return stopped
            return self.finish(signals)

    def already_done(self, start: int, complete: bool) -> bool:
        """Whether the restored checkpoint ends this run (a finished run re-run: say so, touch nothing)."""
        steps = self.cfg.run.steps
        if start < steps or (start == steps and not complete):
            return False
        where = f"run already complete at step {start}" if start == steps else \
            f"run already at step {start}, past run.steps={steps}"
        print(f"{where} in {self.run_dir}; nothing to do (raise run.steps to train further)", flush=True)
        return True

    def begin(self, start: int) -> None:
        """Record the config the run dir now runs under, then say where training starts (evaluating first)."""
        if self.is_main:
            path = record_config(self.claimed)  # as given: micro_batch_size=auto stays auto
            print(f"resolved config saved to {path}", flush=True)
        if start:
            print(f"resumed from checkpoint {start} in {self.checkpointer.directory}", flush=True)
        elif self.eval_data is not None:
            self.logger.log(0, self.evaluate(0))

    def stop(self, step: int, signals: StopSignals, what: str = "") -> dict:
        """Save the last completed step on a stop signal and say how to go on."""
        self.save(step)
        self.checkpointer.wait()
        print(f"saved checkpoint {step}{what}; resume with the same command (it picks up from {self.run_dir})",
              flush=True)
        return {"stopped_at": step, "signal": signals.received or signal.SIGTERM}

    def train_steps(self, start: int, signals: StopSignals) -> Optional[dict]:
        """Steps start .. run.steps; on a stop signal save and return why (else None)."""
        cfg, done = self.cfg, start
        try:
            for step in range(start, cfg.run.steps):
                metrics = self.step(step)
                done = step + 1
                if cfg.run.eval_every and done % cfg.run.eval_every == 0 and done < cfg.run.steps:
                    try:
                        metrics.update(self.evaluate(done, signals))
                    except EvaluationStopped:
                        pass  # the step is done; its evaluation is not needed to resume
                self.history.append({"step": done, **{k: v for k, v in metrics.items() if k in HISTORY_KEYS}})
                self.logger.log_step(done, metrics, self.samples)
                self.checkpointer.check()  # a background save that failed stops the run now
                if distributed.any_process(signals.received is not None):  # all processes stop together
                    return self.stop(done, signals)
                if cfg.checkpoint.every_steps and done % cfg.checkpoint.every_steps == 0 and done < cfg.run.steps:
                    self.save(done, metrics={k: v for k, v in metrics.items() if k.startswith("eval/")} or None)
        except RewardError:
            # multi-process, the other processes are not saving with us: exit (train() does) instead
            if done > 0 and jax.process_count() == 1:
                self.save(done)
                self.checkpointer.wait()
            raise
        return None

    def finish(self, signals: StopSignals) -> dict:
        """The final evaluation and checkpoint, the plots, and the run's summary."""
        steps = self.cfg.run.steps
        try:
            final_eval = self.evaluate(steps, signals) if self.eval_data is not None else {}
        except EvaluationStopped:
            return self.stop(steps, signals, " (the final evaluation was interrupted: resuming runs it)")
        if final_eval:
            self.logger.log(steps, final_eval)
        self.save(steps, metrics=final_eval or None, complete=True)
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
        try:
            self.rewards.close()
            self.checkpointer.close()
        finally:
            if self.lock is not None:
                self.lock.release()


def train(cfg: Config, show_config: bool = True) -> dict:
    """One GRPO run; show_config=False prints only where the resolved config was saved."""
    run = None
    try:
        run = Run(cfg, show_config)
        return run.run()
    except BaseException as e:
        if distributed.is_initialized() and jax.process_count() > 1:
            distributed.exit_now(e)
        raise
    finally:
        if run is not None:
            run.close()
