"""GRPO training: the train state and the jitted steps over one generation batch.

One GRPO step, on device:
  1. `completion_logprobs` of the reference model (beta > 0) and, when the update is
     off-policy (num_iterations > 1 or several minibatches), of the policy before
     the update (old_logp); both without gradients.
  2. `num_iterations` passes over `num_minibatches` minibatches, one optimizer
     update each (`update_step`), minimising `policy_loss`.
Under run.algorithm=ppo step 1 always computes old_logp and the critic's values, the loop then
turns rewards into per-token GAE advantages (`ppo_batch`), and each update also minimises the
critic's value loss with its own optimizer (critic.py, ppo.py); nothing else differs.
With `grpo.micro_batch_size` both run `micro_batch_size` rows at a time: the
log-probs piece by piece, the update's gradients summed in float32 over its
micro-batches under `lax.scan` (gradient accumulation), every loss normalised by
the whole update's counts (`objective.StepTotals`), so it equals the one-shot step.
With several minibatches each pass visits the rows in a fresh order (`minibatch_order`).
The model enters as a `transformer.Decoder` (or any object with its `hidden_states` and
`project`), or as a plain `forward(params, tokens, positions, mask, cache) -> (logits, cache)`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from grpo_jax import distributed, ppo, sharding
from grpo_jax.config import Config
from grpo_jax.critic import critic_values
from grpo_jax.models import lora
from grpo_jax.models.transformer import Decoder, positions_from_mask, shard_activations
from grpo_jax.objective import StepTotals, policy_loss, token_logprobs


class TrainState(flax.struct.PyTreeNode):
    """Everything that changes during training (and is checkpointed). Under LoRA (model.lora_rank) `params`
    are the adapters alone: the frozen base is passed to the steps beside the state (`frozen=`), never
    donated nor checkpointed, and it is the reference policy."""

    step: jax.Array  # int32: GRPO steps done
    params: Any
    opt_state: Any
    rng: jax.Array
    ref_params: Any = None  # frozen reference policy; None when beta = 0 or under LoRA (`keeps_reference`)
    critic_params: Any = None  # run.algorithm=ppo: the critic's params (critic.py) and its optimizer's state
    critic_opt_state: Any = None


def keeps_reference(cfg: Config) -> bool:
    """Whether the train state holds a copy of the weights as the reference: beta != 0 without LoRA
    (whose reference is the frozen base, at no cost)."""
    return cfg.grpo.beta != 0 and not cfg.model.lora_rank


def dropout_key(state: TrainState, spec: Optional[lora.LoraSpec]) -> tuple[TrainState, Optional[jax.Array]]:
    """(state, key) for an update's LoRA dropout masks: the state's key moves on, so a resumed run draws the
    same masks; (state, None) without dropout."""
    if spec is None or spec.dropout == 0:
        return state, None
    rng, key = jax.random.split(state.rng)
    return state.replace(rng=rng), key


def is_ppo(cfg: Config) -> bool:
    return cfg.run.algorithm == "ppo"


def init_train_state(params, optimizer: optax.GradientTransformation, rng: jax.Array, keep_reference: bool,
                     critic_params=None, critic_optimizer: Optional[optax.GradientTransformation] = None) -> TrainState:
    ref = jax.tree.map(jnp.copy, params) if keep_reference else None
    critic_opt = None if critic_params is None else critic_optimizer.init(critic_params)
    return TrainState(step=jnp.int32(0), params=params, opt_state=optimizer.init(params), rng=rng, ref_params=ref,
                      critic_params=critic_params, critic_opt_state=critic_opt)


class Batch(NamedTuple):
    """One generation batch laid out for the loss: R = prompts x G rows.

    Padded (the default): the model reads one sequence per row. Packed (`grpo.pack_sequences`,
    see packing.py): tokens / positions / attention_mask are Rp rows of L tokens holding several
    sequences each (segment_ids tell them apart) and source_row / source_start say where loss
    row r's completion lies; the loss-side fields keep one row per sequence.
    """

    tokens: jax.Array  # [R, P + N] int32: left-padded prompt, then the completion (packed: [Rp, L])
    positions: jax.Array  # [R, P + N] int32 (packed: [Rp, L], restarting per sequence)
    attention_mask: jax.Array  # [R, P + N] bool (packed: [Rp, L])
    completion_mask: jax.Array  # [R, N] bool: tokens that count in the loss
    advantages: jax.Array  # [R] float32 (GRPO), or [R, N] per token (PPO's GAE)
    old_logp: Optional[jax.Array] = None  # [R, N] float32
    ref_logp: Optional[jax.Array] = None  # [R, N] float32
    sampler_logp: Optional[jax.Array] = None  # [R, N] float32: what the sampler reported (drift metrics, tis_cap)
    old_values: Optional[jax.Array] = None  # PPO: [R, N] float32, the critic's values before the update
    returns: Optional[jax.Array] = None  # PPO: [R, N] float32, the value targets
    segment_ids: Optional[jax.Array] = None  # packed: [Rp, L] int32, 0 on padding
    source_row: Optional[jax.Array] = None  # packed: [R] int32, the packed row of loss row r's sequence
    source_start: Optional[jax.Array] = None  # packed: [R] int32, the column of its first completion token


def assemble_batch(prompt_ids, prompt_mask, completion_ids, completion_mask, advantages, sampler_logp=None) -> Batch:
    """Prompt [R, P] (left-padded) + completion [R, N] -> the [R, P + N] sequences the model reads."""
    prompt_mask = jnp.asarray(prompt_mask, bool)
    completion_mask = jnp.asarray(completion_mask, bool)
    prompt_positions = positions_from_mask(prompt_mask)
    start = jnp.sum(prompt_mask, axis=1, keepdims=True)
    completion_positions = start + jnp.arange(completion_ids.shape[1])[None]
    return Batch(
        tokens=jnp.concatenate([jnp.asarray(prompt_ids), jnp.asarray(completion_ids)], axis=1).astype(jnp.int32),
        positions=jnp.concatenate([prompt_positions, completion_positions], axis=1).astype(jnp.int32),
        attention_mask=jnp.concatenate([prompt_mask, completion_mask], axis=1),
        completion_mask=completion_mask,
        advantages=jnp.asarray(advantages, jnp.float32),
        sampler_logp=None if sampler_logp is None else jnp.asarray(sampler_logp, jnp.float32),
    )


def loss_mask(mask, truncated, mask_truncated: bool):
    """The completion tokens that count in the loss: all generated ones, or (mask_truncated,
    grpo.mask_truncated_completions, DAPO) none of a completion that hit the length limit.
    NumPy or JAX arrays: mask [R, N], truncated [R]."""
    return mask & ~truncated[:, None] if mask_truncated else mask


def rollout_batch(prompt_ids, prompt_mask, rollout, mask_truncated: bool) -> Batch:
    """The loss Batch of a rollout's device arrays (no host round trip; `loss_mask`); advantages come later."""
    mask = loss_mask(rollout.mask, rollout.truncated, mask_truncated)
    return assemble_batch(prompt_ids, prompt_mask, rollout.tokens, mask, jnp.zeros(rollout.truncated.shape),
                          rollout.logprobs)


def packed_batch(packed, completion_mask, advantages, sampler_logp=None) -> Batch:
    """A Batch of host arrays from `packing.pack`'s rows and the loss-side arrays (in the packed order)."""
    return Batch(tokens=packed.tokens, positions=packed.positions, attention_mask=packed.attention_mask,
                 completion_mask=np.asarray(completion_mask, bool), advantages=np.asarray(advantages, np.float32),
                 sampler_logp=None if sampler_logp is None else np.asarray(sampler_logp, np.float32),
                 segment_ids=packed.segment_ids, source_row=packed.source_row, source_start=packed.source_start)


def gather_completions(x: jax.Array, source_row: jax.Array, columns: jax.Array, blocks: int) -> jax.Array:
    """x[source_row[r], columns[r, n]] for packed rows x [Rp, L, ...] -> [R, N, ...].

    blocks: the row blocks the arrays are split in over devices; each loss row's sequence lies in
    its own block's packed rows (packing.py), so the gather runs block by block and stays local."""
    rows_per_block = x.shape[0] // blocks
    xb = x.reshape(blocks, rows_per_block, *x.shape[1:])
    local = (source_row % rows_per_block).reshape(blocks, -1)
    cols = jnp.clip(columns, 0, x.shape[1] - 1).reshape(blocks, -1, columns.shape[-1])
    out = jax.vmap(lambda xs, r, c: xs[r[:, None], c])(xb, local, cols)
    return out.reshape(-1, *out.shape[2:])


class LogitsModel:
    """A plain `forward(params, tokens, positions, mask, cache) -> (logits, cache)` in the trainer's two
    calls: its "hidden states" are the logits and `project` is the identity, so the whole [R, T, V]
    logits exist (the library's `transformer.Decoder` unembeds chunk by chunk instead)."""

    def __init__(self, forward: Callable):
        self.forward = forward

    def hidden_states(self, params, tokens, positions, attention_mask, *, segment_ids=None):
        if segment_ids is not None:
            raise ValueError("grpo.pack_sequences needs a model that reads segment ids, such as the library's "
                             "transformer.Decoder; a plain forward function cannot keep packed sequences apart")
        logits, _ = self.forward(params, tokens, positions, attention_mask, None)
        return logits

    def project(self, params, logits):
        return logits


def as_trainable(model):
    """The model as the trainer calls it: anything with `hidden_states(params, tokens, positions, mask,
    segment_ids=)` and `project(params, hidden)` (a `transformer.Decoder`) as it is; any other callable is
    taken for a plain forward returning logits (`LogitsModel`)."""
    if hasattr(model, "hidden_states") and hasattr(model, "project"):
        return model
    if not callable(model):
        raise TypeError(f"{type(model).__name__} is neither a decoder (hidden_states + project) nor a forward function")
    return LogitsModel(model)


def completion_logprobs(model, params, batch: Batch, temperature: float, blocks: int = 1,
                        return_entropy: bool = False):
    """log p(completion token | everything before it) [R, N], float32, at the sampling temperature;
    with return_entropy also each of those tokens' distribution entropy [R, N] (training logs it).

    model: a `transformer.Decoder` or a plain forward (`as_trainable`). The model stops at its hidden
    states and `project` unembeds them inside `token_logprobs`' chunks, so for the Decoder the
    [R, T, V] logits never exist, forward or backward (BENCHMARKS.md, issue 9).
    A packed batch (segment_ids set) is read packed and each completion gathered out of it;
    blocks: the row blocks over devices (`gather_completions`).
    """
    model = as_trainable(model)
    n = batch.completion_mask.shape[1]
    project = functools.partial(model.project, params)
    hidden = model.hidden_states(params, batch.tokens, batch.positions, batch.attention_mask,
                                 segment_ids=batch.segment_ids)
    if batch.segment_ids is None:
        return token_logprobs(hidden[:, -n - 1 : -1], batch.tokens[:, -n:], temperature, project=project,
                              return_entropy=return_entropy)
    # packed: log-probs of every packed token (their count, not R x N, sets the unembedding's cost), then
    # each completion token's: column c is predicted by the state at c - 1
    packed = token_logprobs(hidden[:, :-1], batch.tokens[:, 1:], temperature, project=project,
                            return_entropy=return_entropy)
    columns = batch.source_start[:, None] + jnp.arange(n)[None] - 1  # [R, N]
    gather = functools.partial(gather_completions, source_row=batch.source_row, columns=columns, blocks=blocks)
    return tuple(map(gather, packed)) if return_entropy else gather(packed)


def is_on_policy(cfg: Config) -> bool:
    """One update per generation batch: old_logp = the current policy's, no extra forward needed."""
    return cfg.grpo.num_iterations == 1 and cfg.grpo.num_minibatches == 1


def micro_batch_count(cfg: Config, rows: int) -> int:
    """How many micro-batches `rows` rows run as under grpo.micro_batch_size (1: all at once)."""
    size = cfg.grpo.micro_batch_size
    if size == "auto":
        raise ValueError("grpo.micro_batch_size=auto must be resolved to a number before the steps are built "
                         "(planner.fit_micro_batch)")
    if not size or size >= rows:
        return 1
    if rows % size:
        raise ValueError(f"grpo.micro_batch_size={size} does not divide {rows} rows")
    return rows // size


def split_micro_batches(tree, count: int):
    """Every [R, ...] leaf -> [count, R / count, ...]. Micro-batch i holds rows i, i + count, i + 2 count, ...:
    strided, so rows split over devices in contiguous blocks give each device its share of every micro-batch.
    A packed Batch's source_row then indexes its micro-batch's packed rows (packing.py lays them out so)."""
    if isinstance(tree, Batch) and tree.source_row is not None:
        tree = tree._replace(source_row=tree.source_row // count)
    return jax.tree.map(lambda x: jnp.swapaxes(x.reshape(x.shape[0] // count, count, *x.shape[1:]), 0, 1), tree)


def join_micro_batches(x: jax.Array) -> jax.Array:
    """The inverse of split_micro_batches for one leaf: [count, R / count, ...] -> [R, ...]."""
    return jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])


class Steps(NamedTuple):
    """The jitted device functions of a GRPO step (`make_steps`). Under LoRA both take the frozen base as `frozen=`."""

    reference_and_old_logps: Callable  # (state, batch, frozen=None) -> batch with ref_logp / old_logp (/ old_values)
    update: Callable  # (state, minibatch, frozen=None, num_items=None) -> (state, metrics): one optimizer update


class CriticModel(NamedTuple):
    """What the steps need of PPO's critic besides its params (in the train state)."""

    decoder: Decoder
    optimizer: optax.GradientTransformation


def make_steps(model, optimizer: optax.GradientTransformation, cfg: Config, state_shardings=None,
               critic: Optional[CriticModel] = None) -> Steps:
    """The jitted device functions of a GRPO step: Steps(reference_and_old_logps, update).

    model: a `transformer.Decoder`, or a plain forward returning logits (`as_trainable`).

    state_shardings (a TrainState of NamedShardings): where update_step leaves the new
    state; fixing it keeps every step on one compiled program and the layout stable.
    Their mesh also pins the model's activations to rows split over data x fsdp
    (`shard_activations`), so under fsdp each device computes only its rows.
    The state is donated: its buffers are reused for the new one.
    Under LoRA (model.lora_rank > 0) the state's params are the adapters and each call takes the frozen
    base as `frozen=`: the decoder reads `lora.combine(frozen, adapters)`, gradients reach the adapters
    only, and the reference log-probs are the base's.
    critic (run.algorithm=ppo): the critic's decoder and optimizer; its params are the state's critic_params.
    """
    temperature = cfg.rollout.temperature or 1.0
    grpo = cfg.grpo
    with_critic = is_ppo(cfg)
    if with_critic and critic is None:
        raise ValueError("run.algorithm=ppo: make_steps needs the critic (critic=CriticModel(decoder, optimizer))")
    # PPO's KL to the reference is in the rewards by default (ppo.kl_penalty=reward), not in the loss
    loss_cfg = dataclasses.replace(grpo, beta=0.0) if ppo.kl_in_reward(cfg) else grpo
    spec = lora.LoraSpec.from_config(cfg.model)
    mesh = _mesh_of(state_shardings)
    pin_rows = functools.partial(sharding.pin_rows, mesh=mesh)  # a micro-batch keeps its rows split over the mesh
    blocks = 1 if mesh is None else sharding.data_parallel_size(mesh)  # row blocks over devices (packed gathers)
    logprobs = functools.partial(completion_logprobs, as_trainable(model), temperature=temperature, blocks=blocks)

    def values(critic_params, batch: Batch) -> jax.Array:
        return critic_values(critic.decoder, critic_params, batch.tokens, batch.positions, batch.attention_mask,
                             batch.completion_mask.shape[1])

    def model_params(params, frozen, dropout_key=None):
        """The decoder's params: the trained ones, or the frozen base with the trained adapters."""
        if spec is None:
            return params
        if frozen is None:
            raise ValueError("model.lora_rank > 0: the steps need the frozen base weights (frozen=)")
        return lora.combine(frozen, params, spec, dropout_key)

    def in_pieces(fn, params, batch: Batch) -> jax.Array:
        """fn(params, batch) [R, N] run micro_batch_size rows at a time (grpo.micro_batch_size)."""
        count = micro_batch_count(cfg, batch.advantages.shape[0])
        if count == 1:
            return fn(params, batch)
        pieces = jax.lax.map(lambda micro: fn(params, pin_rows(micro)), split_micro_batches(batch, count))
        return join_micro_batches(pieces)

    @jax.jit
    def reference_and_old_logps(state: TrainState, batch: Batch, frozen=None) -> Batch:
        ref = old = old_values = None
        with shard_activations(mesh):
            if grpo.beta != 0:
                ref = in_pieces(logprobs, state.ref_params if spec is None else frozen, batch)
            if with_critic or not is_on_policy(cfg):  # PPO's reward KL needs the sampling policy's log-probs
                old = in_pieces(logprobs, model_params(state.params, frozen), batch)
            if with_critic:
                old_values = in_pieces(values, state.critic_params, batch)
        return batch._replace(old_logp=old, ref_logp=ref, old_values=old_values)

    def loss_fn(trained, batch: Batch, totals: StepTotals, frozen, dropout_key, num_items):
        # "dapo" / "cispo" divide by num_items: the generation batch's tokens / num_minibatches, as TRL.
        # the entropy comes out of the same chunks as the log-probs (no [R, T, V] array), for the logs only
        params, critic_params = trained if with_critic else (trained, None)
        with shard_activations(mesh):
            logp, entropy = logprobs(model_params(params, frozen, dropout_key), batch, return_entropy=True)
            new_values = values(critic_params, batch) if with_critic else None
        loss, metrics = policy_loss(logp, batch.old_logp, batch.ref_logp, batch.advantages, batch.completion_mask,
                                    loss_cfg, max_completion_length=cfg.rollout.max_completion_length, totals=totals,
                                    entropy=entropy, sampler_logp=batch.sampler_logp, num_items_in_batch=num_items)
        if with_critic:
            v_loss, v_metrics = ppo.value_loss(new_values, batch.old_values, batch.returns, batch.completion_mask,
                                               cfg.ppo.cliprange_value, totals)
            metrics = dict(metrics, **v_metrics, **{"policy/loss": loss})
            loss = loss + cfg.ppo.vf_coef * v_loss
            metrics["loss"] = loss
        return loss, metrics

    def loss_metrics_grads(trained, batch: Batch, totals: StepTotals, frozen, dropout_key, num_items):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(trained, batch, totals, frozen,
                                                                           dropout_key, num_items)
        return loss, metrics, grads

    def accumulated_grads(trained, minibatch: Batch, frozen, dropout_key, num_items):
        """(loss, metrics, grads) of one optimizer update, summed over its micro-batches in float32
        (a "/max" metric: the max over them)."""
        rows = minibatch.advantages.shape[0]
        totals = StepTotals(sequences=rows, tokens=jnp.sum(minibatch.completion_mask.astype(jnp.float32)))
        count = micro_batch_count(cfg, rows)
        if count == 1:
            return loss_metrics_grads(trained, minibatch, totals, frozen, dropout_key, num_items)
        micro = split_micro_batches(minibatch, count)
        keys = None if dropout_key is None else jax.random.split(dropout_key, count)  # a fresh mask per micro-batch

        def add(acc, piece):
            micro_batch, key = piece
            loss, metrics, grads = loss_metrics_grads(trained, pin_rows(micro_batch), totals, frozen, key, num_items)
            acc_loss, acc_metrics, acc_grads = acc
            metrics = {k: jnp.maximum(acc_metrics[k], v) if k.endswith("/max") else acc_metrics[k] + v
                       for k, v in metrics.items()}
            grads = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc_grads, grads)
            return (acc_loss + loss, metrics, grads), None

        first_key = None if keys is None else keys[0]
        shapes = jax.eval_shape(loss_metrics_grads, trained, jax.tree.map(lambda x: x[0], micro), totals, frozen,
                                first_key, num_items)
        loss, metrics, grads = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), shapes)
        if state_shardings is not None:  # the float32 sum lives where its params live
            grads = jax.lax.with_sharding_constraint(grads, trained_shardings(state_shardings, with_critic))
        (loss, metrics, grads), _ = jax.lax.scan(add, (loss, metrics, grads), (micro, keys))
        return loss, metrics, jax.tree.map(lambda g, p: g.astype(p.dtype), grads, trained)

    def update_step(state: TrainState, minibatch: Batch, frozen=None, num_items=None):
        state, key = dropout_key(state, spec)
        trained = (state.params, state.critic_params) if with_critic else state.params
        loss, metrics, grads = accumulated_grads(trained, minibatch, frozen, key, num_items)
        policy_grads, critic_grads = grads if with_critic else (grads, None)
        grad_norm = optax.tree.norm(policy_grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        metrics = dict(metrics, grad_norm=grad_norm)
        if with_critic:
            metrics["value/grad_norm"] = optax.tree.norm(critic_grads)
            finite = finite & jnp.isfinite(metrics["value/grad_norm"])
        # a non-finite loss or gradient leaves the state untouched; the caller counts it
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        updates, opt_state = optimizer.update(policy_grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        state = state.replace(params=keep(new_params, state.params), opt_state=keep(opt_state, state.opt_state))
        if with_critic:
            updates, critic_opt = critic.optimizer.update(critic_grads, state.critic_opt_state, state.critic_params)
            new_critic = optax.apply_updates(state.critic_params, updates)
            state = state.replace(critic_params=keep(new_critic, state.critic_params),
                                  critic_opt_state=keep(critic_opt, state.critic_opt_state))
        metrics["update_skipped"] = (~finite).astype(jnp.float32)
        return state, metrics

    out_shardings = None if state_shardings is None else (state_shardings, None)
    return Steps(reference_and_old_logps, jax.jit(update_step, donate_argnums=0, out_shardings=out_shardings))


def trained_shardings(state_shardings: TrainState, with_critic: bool):
    """Where an update's trained params (and their gradients) live: the policy's, and under PPO the critic's."""
    return (state_shardings.params, state_shardings.critic_params) if with_critic else state_shardings.params


def ppo_batch(batch: Batch, scores: jax.Array, cfg: Config) -> tuple[Batch, dict]:
    """PPO's advantage stage (jit it): the batch with per-token GAE advantages and returns from the task scores [R]
    and the log-probs and values `reference_and_old_logps` filled in; and the stage's metrics."""
    settings = ppo.AdvantageSettings.from_config(cfg)
    out = ppo.ppo_advantages(scores, batch.old_logp, batch.ref_logp, batch.old_values, batch.completion_mask,
                             settings)
    mask = batch.completion_mask
    per_row = jnp.sum(jnp.abs(out.advantages), axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1)
    metrics = {"value/explained_variance": ppo.explained_variance(batch.old_values, out.returns, mask),
               "ppo/non_score_reward": jnp.mean(jnp.sum(jnp.where(mask, out.rewards, 0.0), axis=1)
                                                - jnp.where(jnp.any(mask, axis=1), scores, 0.0))}
    return batch._replace(advantages=out.advantages, returns=out.returns), dict(metrics, advantage_rows=per_row)


def _mesh_of(shardings):
    """The mesh of the first NamedSharding in a pytree of shardings, or None."""
    for leaf in jax.tree.leaves(shardings):
        if isinstance(leaf, jax.sharding.NamedSharding):
            return leaf.mesh
    return None


def sync_reference(state: TrainState, alpha: float) -> TrainState:
    """ref <- alpha * policy + (1 - alpha) * ref (TR-DPO style soft update of the reference); jit it."""
    def mix(r, p):
        return (alpha * p.astype(jnp.float32) + (1 - alpha) * r.astype(jnp.float32)).astype(r.dtype)

    ref = jax.tree.map(mix, state.ref_params, state.params)
    return state.replace(ref_params=ref)


def train_flops(config, rows: int, seq_len: int, cfg: Config) -> float:
    """Model FLOPs of one GRPO update phase: forward+backward per pass, plus the no-grad forwards
    (the adapters' own FLOPs left out: rank / hidden of the whole)."""
    forward = config.forward_flops_per_token(seq_len) * rows * seq_len
    extra = (cfg.grpo.beta != 0) + (is_ppo(cfg) or not is_on_policy(cfg))
    passes = 2 if cfg.model.lora_rank else 3  # LoRA's backward pass skips the weights' gradients
    critic = 4 * cfg.grpo.num_iterations if is_ppo(cfg) else 0  # its values (1), then forward + backward per pass
    return forward * (passes * cfg.grpo.num_iterations + extra + critic)


def minibatch_order(seed: int, step: int, iteration: int, rows: int) -> np.ndarray:
    """The row order of pass `iteration` over step `step`'s generation batch (num_minibatches > 1).

    Drawn from (run seed, step, pass) alone: every process draws the same permutation, and a resumed
    run the same as one that was never stopped; each pass and step gets a fresh one (as PPO epochs)."""
    return np.random.default_rng([seed, step, iteration]).permutation(rows)


def permute_rows(batch: Batch, order: np.ndarray) -> Batch:
    """batch's rows in `order` (the same on every process), each leaf keeping its sharding."""
    leaves = jax.tree.leaves(batch)
    if not all(isinstance(x, jax.Array) and isinstance(x.sharding, jax.sharding.NamedSharding) for x in leaves):
        return _permute_program(None)(batch, jnp.asarray(order))
    shardings = jax.tree.map(lambda x: x.sharding, batch)
    placed = distributed.global_batch(np.asarray(order, np.int32), sharding.replicated(leaves[0].sharding.mesh))
    return _permute_program(shardings)(batch, placed)


@functools.lru_cache(maxsize=None)
def _rows_program(start: int, size: int):
    """Rows start .. start + size of every leaf of a batch, jitted once per slice."""
    return jax.jit(lambda batch: jax.tree.map(lambda x: jax.lax.slice_in_dim(x, start, start + size), batch))


@functools.partial(jax.jit, static_argnums=1)
def _tokens_per_minibatch(mask: jax.Array, minibatches: int) -> jax.Array:
    return jnp.sum(mask.astype(jnp.float32)) / minibatches


@functools.lru_cache(maxsize=None)
def _permute_program(shardings: Optional[Batch]):
    """One compiled gather per layout (a Batch of NamedShardings is hashable)."""
    return jax.jit(lambda batch, order: jax.tree.map(lambda x: x[order], batch), out_shardings=shardings)


def train_on_batch(state: TrainState, batch: Batch, update_step, cfg: Config, shuffle_seed: Optional[tuple] = None):
    """All optimizer updates of one generation batch. Returns (state, metrics averaged over updates, on the host).

    `batch` already carries its reference / old log-probs (`reference_and_old_logps`),
    which callers dispatch early so the device computes them while rewards are scored.
    shuffle_seed: (run seed, step): with several minibatches each pass first puts the rows in
    `minibatch_order`; None (or one minibatch) keeps the batch's order.
    """
    rows = batch.advantages.shape[0]
    per_minibatch = rows // cfg.grpo.num_minibatches
    shuffle = shuffle_seed is not None and cfg.grpo.num_minibatches > 1
    if shuffle and batch.source_row is not None:
        raise ValueError("a packed batch keeps its row order (grpo.pack_sequences needs num_minibatches = 1)")
    # dapo / cispo normalise every update by the generation batch's tokens / num_minibatches (TRL's num_items_in_batch)
    num_items = _tokens_per_minibatch(batch.completion_mask, cfg.grpo.num_minibatches)
    collected = []
    for iteration in range(cfg.grpo.num_iterations):
        rows_in_order = permute_rows(batch, minibatch_order(*shuffle_seed, iteration, rows)) if shuffle else batch
        for m in range(cfg.grpo.num_minibatches):
            # static slices in one compiled program: no index array to place (multi-process arrays mix only
            # with global ones) and no eager op per leaf
            whole = per_minibatch == rows
            minibatch = rows_in_order if whole else _rows_program(m * per_minibatch, per_minibatch)(rows_in_order)
            state, metrics = update_step(state, minibatch, num_items=num_items)
            collected.append(metrics)
    # averaged on the host (the caller logs them): no eager multi-device ops between the updates' programs
    collected = [jax.device_get(m) for m in collected]
    averaged = {k: (np.max if k.endswith("/max") else np.mean)([m[k] for m in collected]) for k in collected[0]}
    averaged["update_skipped"] = np.sum([m["update_skipped"] for m in collected])
    step = jax.device_put(state.step + 1, state.step.sharding)  # keep the layout the jitted steps expect
    return state.replace(step=step), averaged
