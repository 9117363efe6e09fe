"""GRPO training: the train state and the jitted steps over one generation batch.

One GRPO step, on device:
  1. `completion_logprobs` of the reference model (beta > 0) and, when the update is
     off-policy (num_iterations > 1 or several minibatches), of the policy before
     the update (old_logp); both without gradients.
  2. `num_iterations` passes over `num_minibatches` minibatches, one optimizer
     update each (`update_step`), minimising `policy_loss`.
With `grpo.micro_batch_size` both run `micro_batch_size` rows at a time: the
log-probs piece by piece, the update's gradients summed in float32 over its
micro-batches under `lax.scan` (gradient accumulation), every loss normalised by
the whole update's counts (`objective.StepTotals`), so it equals the one-shot step.
The model enters as `forward(params, tokens, positions, mask, cache=None) -> (logits, cache)`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from grpo_jax import sharding
from grpo_jax.config import Config
from grpo_jax.models import transformer as tf
from grpo_jax.models.transformer import positions_from_mask, shard_activations
from grpo_jax.objective import StepTotals, policy_loss, token_logprobs


class TrainState(flax.struct.PyTreeNode):
    """Everything that changes during training (and is checkpointed)."""

    step: jax.Array  # int32: GRPO steps done
    params: Any
    opt_state: Any
    rng: jax.Array
    ref_params: Any = None  # frozen reference policy; None when beta = 0


def init_train_state(params, optimizer: optax.GradientTransformation, rng: jax.Array, keep_reference: bool) -> TrainState:
    ref = jax.tree.map(jnp.copy, params) if keep_reference else None
    return TrainState(step=jnp.int32(0), params=params, opt_state=optimizer.init(params), rng=rng, ref_params=ref)


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
    advantages: jax.Array  # [R] float32
    old_logp: Optional[jax.Array] = None  # [R, N] float32
    ref_logp: Optional[jax.Array] = None  # [R, N] float32
    segment_ids: Optional[jax.Array] = None  # packed: [Rp, L] int32, 0 on padding
    source_row: Optional[jax.Array] = None  # packed: [R] int32, the packed row of loss row r's sequence
    source_start: Optional[jax.Array] = None  # packed: [R] int32, the column of its first completion token


def assemble_batch(prompt_ids, prompt_mask, completion_ids, completion_mask, advantages) -> Batch:
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
    )


def packed_batch(packed, completion_mask, advantages) -> Batch:
    """A Batch of host arrays from `packing.pack`'s rows and the loss-side arrays (in the packed order)."""
    return Batch(tokens=packed.tokens, positions=packed.positions, attention_mask=packed.attention_mask,
                 completion_mask=np.asarray(completion_mask, bool), advantages=np.asarray(advantages, np.float32),
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


def completion_logprobs(forward: Callable, params, batch: Batch, temperature: float,
                        blocks: int = 1) -> jax.Array:
    """log p(completion token | everything before it) [R, N], float32, at the sampling temperature.

    With the library's decoder (`functools.partial(transformer.apply, config)`, as loop and
    planner build it) the model stops at its final hidden states and the unembedding runs
    inside `token_logprobs`' chunks, so the [R, T, V] logits never exist, forward or backward
    (issue 9: the update step's temp for Qwen2.5-0.5B at 64 x 1024 tokens on fsdp=8 went
    from 33.0 to 23.0 GiB per device; BENCHMARKS.md).
    Any other forward returns logits, which are then read a chunk at a time.
    A packed batch (segment_ids set) is read packed and each completion gathered out of it;
    blocks: the row blocks over devices (`gather_completions`).
    """
    n = batch.completion_mask.shape[1]
    config = _decoder_config(forward)
    if batch.segment_ids is not None:  # packed: the completions are gathered out of the packed rows
        if config is None:
            raise ValueError("grpo.pack_sequences needs the library's decoder (segment ids in its attention)")
        hidden, _ = forward(params, batch.tokens, batch.positions, batch.attention_mask, None, return_hidden=True,
                            segment_ids=batch.segment_ids)
        # log-probs of every packed token (their count, not R x N, sets the unembedding's cost), then each
        # completion token's: column c is predicted by the state at c - 1
        project = lambda x: tf.logits_from_hidden(config, params, x)  # noqa: E731
        packed_logp = token_logprobs(hidden[:, :-1], batch.tokens[:, 1:], temperature, project=project)
        columns = batch.source_start[:, None] + jnp.arange(n)[None] - 1  # [R, N]
        return gather_completions(packed_logp, batch.source_row, columns, blocks)
    targets = batch.tokens[:, -n:]
    if config is None:
        logits, _ = forward(params, batch.tokens, batch.positions, batch.attention_mask, None)
        return token_logprobs(logits[:, -n - 1 : -1], targets, temperature)
    hidden, _ = forward(params, batch.tokens, batch.positions, batch.attention_mask, None, return_hidden=True)
    project = lambda h: tf.logits_from_hidden(config, params, h)  # noqa: E731
    return token_logprobs(hidden[:, -n - 1 : -1], targets, temperature, project=project)


def _decoder_config(forward: Callable):
    """The TransformerConfig when `forward` is `functools.partial(transformer.apply, config)`, else None."""
    if isinstance(forward, functools.partial) and forward.func is tf.apply and len(forward.args) == 1:
        return forward.args[0]
    return None


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


def make_steps(forward: Callable, optimizer: optax.GradientTransformation, cfg: Config, state_shardings=None):
    """The jitted device functions of a GRPO step: (reference_and_old_logps, update_step).

    state_shardings (a TrainState of NamedShardings): where update_step leaves the new
    state; fixing it keeps every step on one compiled program and the layout stable.
    Their mesh also pins the model's activations to rows split over data x fsdp
    (`shard_activations`), so under fsdp each device computes only its rows.
    The state is donated: its buffers are reused for the new one.
    """
    temperature = cfg.rollout.temperature or 1.0
    grpo = cfg.grpo
    mesh = _mesh_of(state_shardings)
    pin_rows = functools.partial(sharding.pin_rows, mesh=mesh)  # a micro-batch keeps its rows split over the mesh
    blocks = 1 if mesh is None else sharding.data_parallel_size(mesh)  # row blocks over devices (packed gathers)
    logprobs = functools.partial(completion_logprobs, forward, temperature=temperature, blocks=blocks)

    def logprobs_in_pieces(params, batch: Batch) -> jax.Array:
        count = micro_batch_count(cfg, batch.advantages.shape[0])
        if count == 1:
            return logprobs(params, batch)
        pieces = jax.lax.map(lambda micro: logprobs(params, pin_rows(micro)), split_micro_batches(batch, count))
        return join_micro_batches(pieces)

    @jax.jit
    def reference_and_old_logps(state: TrainState, batch: Batch) -> Batch:
        ref = old = None
        with shard_activations(mesh):
            if grpo.beta != 0:
                ref = logprobs_in_pieces(state.ref_params, batch)
            if not is_on_policy(cfg):
                old = logprobs_in_pieces(state.params, batch)
        return batch._replace(old_logp=old, ref_logp=ref)

    def loss_fn(params, batch: Batch, totals: StepTotals):
        # Each minibatch is one optimizer update, so "dapo" normalises by this minibatch's tokens
        # (TRL: the tokens of one optimizer step's gradient-accumulation window), over all its micro-batches.
        with shard_activations(mesh):
            logp = logprobs(params, batch)
        return policy_loss(logp, batch.old_logp, batch.ref_logp, batch.advantages, batch.completion_mask, grpo,
                           max_completion_length=cfg.rollout.max_completion_length, totals=totals)

    def loss_metrics_grads(params, batch: Batch, totals: StepTotals):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, totals)
        return loss, metrics, grads

    def accumulated_grads(params, minibatch: Batch):
        """(loss, metrics, grads) of one optimizer update, summed over its micro-batches in float32."""
        rows = minibatch.advantages.shape[0]
        totals = StepTotals(sequences=rows, tokens=jnp.sum(minibatch.completion_mask.astype(jnp.float32)))
        count = micro_batch_count(cfg, rows)
        if count == 1:
            return loss_metrics_grads(params, minibatch, totals)
        micro = split_micro_batches(minibatch, count)

        def add(acc, micro_batch):
            value = loss_metrics_grads(params, pin_rows(micro_batch), totals)
            return jax.tree.map(lambda a, x: a + x.astype(jnp.float32), acc, value), None

        shapes = jax.eval_shape(loss_metrics_grads, params, jax.tree.map(lambda x: x[0], micro), totals)
        loss, metrics, grads = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), shapes)
        if state_shardings is not None:  # the float32 sum lives where its params live
            grads = jax.lax.with_sharding_constraint(grads, state_shardings.params)
        (loss, metrics, grads), _ = jax.lax.scan(add, (loss, metrics, grads), micro)
        return loss, metrics, jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)

    def update_step(state: TrainState, minibatch: Batch):
        loss, metrics, grads = accumulated_grads(state.params, minibatch)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        # a non-finite loss or gradient leaves the state untouched; the caller counts it
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        state = state.replace(params=keep(new_params, state.params), opt_state=keep(opt_state, state.opt_state))
        metrics = dict(metrics, grad_norm=grad_norm, update_skipped=(~finite).astype(jnp.float32))
        return state, metrics

    out_shardings = None if state_shardings is None else (state_shardings, None)
    return reference_and_old_logps, jax.jit(update_step, donate_argnums=0, out_shardings=out_shardings)


def _mesh_of(shardings):
    """The mesh of the first NamedSharding in a pytree of shardings, or None."""
    for leaf in jax.tree.leaves(shardings):
        if isinstance(leaf, jax.sharding.NamedSharding):
            return leaf.mesh
    return None


def sync_reference(state: TrainState, alpha: float) -> TrainState:
    """ref <- alpha * policy + (1 - alpha) * ref (TR-DPO style soft update of the reference); jit it."""
    ref = jax.tree.map(lambda r, p: (alpha * p.astype(jnp.float32) + (1 - alpha) * r.astype(jnp.float32)).astype(r.dtype),
                       state.ref_params, state.params)
    return state.replace(ref_params=ref)


def train_flops(config, rows: int, seq_len: int, cfg: Config) -> float:
    """Model FLOPs of one GRPO update phase: forward+backward per pass, plus the no-grad forwards."""
    forward = config.forward_flops_per_token(seq_len) * rows * seq_len
    extra = (cfg.grpo.beta != 0) + (not is_on_policy(cfg))
    return forward * (3 * cfg.grpo.num_iterations + extra)


def train_on_batch(state: TrainState, batch: Batch, update_step, cfg: Config, rng: np.random.Generator | None = None):
    """All optimizer updates of one generation batch. Returns (state, metrics averaged over updates).

    `batch` already carries its reference / old log-probs (`reference_and_old_logps`),
    which callers dispatch early so the device computes them while rewards are scored.
    """
    rows = batch.advantages.shape[0]
    per_minibatch = rows // cfg.grpo.num_minibatches
    collected = []
    for _ in range(cfg.grpo.num_iterations):
        order = None if rng is None else rng.permutation(rows)
        for m in range(cfg.grpo.num_minibatches):
            lo, hi = m * per_minibatch, (m + 1) * per_minibatch
            if order is not None:
                idx = jnp.asarray(order[lo:hi])
                minibatch = jax.tree.map(lambda x: x[idx], batch)
            elif (lo, hi) == (0, rows):
                minibatch = batch
            else:  # static slices: no index array to place (multi-process arrays mix only with global ones)
                minibatch = jax.tree.map(lambda x: x[lo:hi], batch)
            state, metrics = update_step(state, minibatch)
            collected.append(metrics)
    averaged = {k: jnp.mean(jnp.stack([m[k] for m in collected])) for k in collected[0]}
    averaged["update_skipped"] = jnp.sum(jnp.stack([m["update_skipped"] for m in collected]))
    step = jax.device_put(state.step + 1, state.step.sharding)  # keep the layout the jitted steps expect
    return state.replace(step=step), averaged
