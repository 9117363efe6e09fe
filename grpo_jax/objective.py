"""The GRPO objective: group-relative advantages, token log-probs, the clipped loss.

Pure functions of arrays, jit-able, float32 math whatever the input dtype.
Shapes: `B` completions (prompts x group size), `N` completion length, `V` vocab.
The loss follows TRL's `GRPOTrainer` term for term, so numbers can be compared.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from grpo_jax.config import IMPORTANCE_SAMPLING_LEVELS, LOSS_TYPES
from grpo_jax.config import REWARD_SCALES as SCALES


class StepTotals(NamedTuple):
    """Counts over a whole optimizer update, for a loss computed one micro-batch at a time.

    With them every loss type and metric of a micro-batch is its share of the whole
    update's value (the shares add up), so gradient accumulation equals the one-shot step.
    """

    sequences: Any  # completions in the update (a Python int or int scalar)
    tokens: jax.Array  # completion tokens in the update (mask sum), float32 scalar


def group_advantages(rewards: jax.Array, group_size: int, scale: str = "group", eps: float = 1e-4) -> jax.Array:
    """Advantages [B*G] of rewards [B*G] whose groups of `group_size` are contiguous.

    scale:
      "group": (r - group mean) / (group std + eps)   (GRPO; std with Bessel's N-1, as TRL)
      "batch": (r - group mean) / (batch std + eps)   (Understanding R1-Zero / TRL "batch")
      "none":  r - group mean                          (Dr. GRPO: no std division)
      "rloo":  r - mean of the other G-1 rewards       (leave-one-out, = G/(G-1) (r - mean))
    A group whose rewards are all equal carries no signal: its advantages are exactly 0.
    """
    if scale not in SCALES:
        raise ValueError(f"scale={scale!r}: expected one of {', '.join(SCALES)}")
    if group_size < 2:
        raise ValueError(f"group_size={group_size}: a group needs at least 2 completions")
    if rewards.ndim != 1 or rewards.shape[0] % group_size:
        raise ValueError(f"rewards of shape {rewards.shape} do not split into groups of {group_size}")
    r = rewards.astype(jnp.float32)
    groups = r.reshape(-1, group_size)
    centered = groups - groups.mean(axis=1, keepdims=True)
    if scale == "group":
        std = jnp.sqrt(jnp.sum(centered**2, axis=1, keepdims=True) / (group_size - 1))
        adv = centered / (std + eps)
    elif scale == "batch":
        adv = centered / (jnp.std(r, ddof=1) + eps)
    elif scale == "none":
        adv = centered
    else:
        adv = centered * (group_size / (group_size - 1))
    # Equal rewards can leave rounding residue in `centered` (and 0/0 when eps=0).
    return jnp.where(flat_groups(r, group_size)[:, None], 0.0, adv).reshape(-1)


def flat_groups(rewards, group_size: int):
    """[B] bool, one per group of `group_size` contiguous rewards [B*G]: are they all equal?

    Such a group carries no signal (its advantages are 0; grpo.filter_zero_std_groups leaves it
    out of the loss). Works on NumPy and JAX arrays alike.
    """
    groups = rewards.reshape(-1, group_size)
    return groups.max(axis=1) == groups.min(axis=1)


def token_logprobs(
    logits: jax.Array,
    targets: jax.Array,
    temperature: float = 1.0,
    chunk_size: int = 128,
    return_entropy: bool = False,
    project: Optional[Callable[[jax.Array], jax.Array]] = None,
):
    """log softmax(logits / temperature)[target] per token, float32, shape of `targets`.

    logits: [..., T, V] in any dtype (bf16 from the model is fine); targets: [..., T] ints.
    The sequence is processed `chunk_size` positions at a time (all rows together,
    so a batch sharded over devices stays sharded), each chunk under
    `jax.checkpoint`: the float32 upcast, log-sum-exp and softmax exist for one
    chunk only, in the forward and in the backward pass. For B*G = 64 completions
    of 1024 tokens and a 152k vocab (Qwen2.5), float32 logits of the whole batch
    take 64*1024*152k*4 bytes = 40 GB; with chunk_size=128 the float32 working set
    is 5 GB across the batch, 0.6 GB per device on 8 data-parallel devices.
    (The model's own logits are a separate cost: pass hidden states and `project`
    to compute them per chunk too.)

    project: when given, `logits` are hidden states [..., T, D] and project(chunk) -> [..., c, V]
    makes each chunk's logits (the unembedding), inside the chunk's checkpoint, so the
    logits themselves never exist whole either (trainer.completion_logprobs uses this).

    With return_entropy=True also returns the entropy of each token's distribution.
    Temperature divides the logits exactly as the sampler did, so on-policy these
    log-probs equal the sampler's.
    """
    shape = targets.shape
    if logits.shape[:-1] != shape or not shape:
        raise ValueError(f"logits {logits.shape} and targets {shape} disagree")
    width, length = logits.shape[-1], shape[-1]
    rows_logits = logits.reshape(-1, length, width)
    rows_targets = targets.reshape(-1, length).astype(jnp.int32)

    @jax.checkpoint
    def one_chunk(chunk_logits, chunk_targets):
        if project is not None:
            chunk_logits = project(chunk_logits)
        x = chunk_logits.astype(jnp.float32) / temperature
        # log-sum-exp as jax.nn.logsumexp computes it, keeping its exponentials for the entropy
        peak = jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True))
        peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
        shifted = jnp.exp(x - peak)
        total = jnp.sum(shifted, axis=-1)
        lse = jnp.log(total) + peak[..., 0]
        picked = jnp.take_along_axis(x, chunk_targets[..., None], axis=-1)[..., 0]
        if not return_entropy:
            return picked - lse, jnp.zeros_like(lse)
        # H = lse - E_p[x], E_p[x] = sum(exp(x - peak) x) / sum(exp(x - peak)): no second pass of exponentials
        expected = jnp.sum(jnp.where(shifted > 0, shifted * x, 0.0), axis=-1) / total
        return picked - lse, lse - expected

    num_chunks, rest = divmod(length, chunk_size)
    if num_chunks <= 1:
        logp, ent = one_chunk(rows_logits, rows_targets)
    else:
        def body(_, i):
            start = i * chunk_size
            piece = jax.lax.dynamic_slice_in_dim(rows_logits, start, chunk_size, axis=1)
            return None, one_chunk(piece, jax.lax.dynamic_slice_in_dim(rows_targets, start, chunk_size, axis=1))

        _, (logp, ent) = jax.lax.scan(body, None, jnp.arange(num_chunks))  # [chunks, rows, chunk]
        logp = jnp.moveaxis(logp, 0, 1).reshape(rows_targets.shape[0], -1)
        ent = jnp.moveaxis(ent, 0, 1).reshape(rows_targets.shape[0], -1)
        if rest:
            body_len = length - rest
            tail_logp, tail_ent = one_chunk(rows_logits[:, body_len:], rows_targets[:, body_len:])
            logp = jnp.concatenate([logp, tail_logp], axis=1)
            ent = jnp.concatenate([ent, tail_ent], axis=1)
    if return_entropy:
        return logp.reshape(shape), ent.reshape(shape)
    return logp.reshape(shape)


def token_entropy(logits: jax.Array, temperature: float = 1.0, chunk_size: int = 128) -> jax.Array:
    """Entropy [...] of softmax(logits / temperature) [..., V], float32, chunked."""
    dummy = jnp.zeros(logits.shape[:-1], jnp.int32)
    return token_logprobs(logits, dummy, temperature, chunk_size, return_entropy=True)[1]


def k3_kl(ref_logp: jax.Array, logp: jax.Array) -> jax.Array:
    """Schulman's k3 estimator of KL(policy || ref): exp(ref - logp) - (ref - logp) - 1 >= 0."""
    d = ref_logp - logp
    return jnp.exp(d) - d - 1.0


def policy_loss(
    logp: jax.Array,
    old_logp: Optional[jax.Array],
    ref_logp: Optional[jax.Array],
    advantages: jax.Array,
    mask: jax.Array,
    cfg: Any,
    *,
    num_items_in_batch: Optional[jax.Array] = None,
    max_completion_length: Optional[int] = None,
    totals: Optional[StepTotals] = None,
    logits: Optional[jax.Array] = None,
    entropy: Optional[jax.Array] = None,
    sampler_logp: Optional[jax.Array] = None,
):
    """Clipped surrogate + beta * k3 KL, aggregated by `cfg.loss_type`. Returns (loss, metrics).

    logp, old_logp, ref_logp, mask: [B, N] (completion tokens); advantages: [B] (one per completion,
    GRPO) or [B, N] (per token, PPO's GAE).
    Math runs in float32 (float64 when logp is float64, for gradient checks).
    cfg: anything with GRPOConfig's loss fields (beta, epsilon, epsilon_high, delta, loss_type,
    importance_sampling_level, cispo_epsilon_*, use_bias_correction_kl, tis_cap, tis_level).
    old_logp=None means on-policy (one optimisation pass): old = stop_gradient(logp).
    ref_logp may be None when beta = 0.

    Per token (TRL's GRPOTrainer): the clipped surrogate -min(r A, clip(r) A), or for cispo
    -stop_gradient(clip(r, max=cispo_epsilon_high)) A log p (MiniMax-M1); times the truncated importance
    weight min(pi_old / pi_sampler, tis_cap) when tis_cap is set; plus beta k3 KL (times r with
    use_bias_correction_kl).
    Aggregation (TRL's definitions; `mask` selects completion tokens):
      grpo:    mean over sequences of each sequence's token mean
      bnpo:    sum over tokens / tokens in this batch
      dr_grpo: sum over tokens / (B * max_completion_length)  (default: N)
      dapo, cispo: sum over tokens / num_items_in_batch (the trainer passes the generation batch's
               tokens / its minibatches, as TRL; default: this batch's tokens)
    totals: the sequence and token counts of the whole optimizer update when this batch
    is one of its micro-batches (gradient accumulation): the loss and every metric are
    then this micro-batch's share, normalised by the update's counts, so summing the
    micro-batches' values gives exactly the one-shot loss, gradient and metrics
    (metrics ending in "/max" are maxima: take the max over micro-batches instead).

    sampler_logp [B, N]: the log-probs the sampler reported for these tokens; with it the metrics
    include the sampler-trainer drift (`sampling/...`: old_logp against them) and tis_cap applies.
    Entropy metrics come from `entropy` [B, N] or, failing that, `logits` [B, N, V].
    Padded tokens (mask 0) never reach the loss or its gradient, even if their
    log-probs are inf or NaN.
    """
    if cfg.loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={cfg.loss_type!r}: expected one of {', '.join(LOSS_TYPES)}")
    if cfg.importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(f"importance_sampling_level={cfg.importance_sampling_level!r}: expected one of "
                         f"{', '.join(IMPORTANCE_SAMPLING_LEVELS)}")
    if cfg.beta != 0 and ref_logp is None:
        raise ValueError("beta != 0 needs ref_logp, the reference model's token log-probs")
    tis_cap = cfg.tis_cap
    if tis_cap is not None and sampler_logp is None:
        raise ValueError("tis_cap needs sampler_logp, the log-probs the sampler reported")
    mask = mask.astype(bool)
    dtype = jnp.promote_types(logp.dtype, jnp.float32)  # float32, or float64 when asked for
    fmask = mask.astype(dtype)

    def clean(x):
        return jnp.where(mask, x.astype(dtype), 0.0)

    logp = clean(logp)
    old_logp = jax.lax.stop_gradient(logp) if old_logp is None else clean(old_logp)
    adv = advantages.astype(dtype)
    adv = adv[:, None] if adv.ndim == 1 else adv
    eps_low = cfg.epsilon
    eps_high = cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high

    tokens_per_seq = jnp.sum(fmask, axis=-1)
    log_ratio = logp - old_logp
    if cfg.importance_sampling_level == "sequence":  # GSPO: one ratio per completion
        log_weight = (jnp.sum(log_ratio, axis=-1) / jnp.maximum(tokens_per_seq, 1.0))[:, None]
    else:
        log_weight = log_ratio
    ratio = jnp.exp(log_weight)
    if cfg.loss_type == "cispo":
        low = None if cfg.cispo_epsilon_low is None else 1.0 - cfg.cispo_epsilon_low
        weight = jax.lax.stop_gradient(jnp.clip(ratio, low, cfg.cispo_epsilon_high))
        per_token = -weight * adv * logp
    else:
        clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
        capped = ratio if cfg.delta is None else jnp.minimum(ratio, cfg.delta)
        per_token = -jnp.minimum(capped * adv, clipped * adv)

    drift = {} if sampler_logp is None else sampler_drift(old_logp, clean(sampler_logp), mask,
                                                          cfg.tis_level, tis_cap)
    if tis_cap is not None:
        per_token = per_token * drift.pop("tis_weight")

    kl = None
    if cfg.beta != 0:
        kl = k3_kl(clean(ref_logp), logp)
        if cfg.use_bias_correction_kl:
            kl = kl * ratio
        per_token = per_token + cfg.beta * kl

    per_token = jnp.where(mask, per_token, 0.0)
    total = jnp.sum(per_token)
    num_tokens = jnp.sum(fmask)
    # the update's counts: this batch's own, or (micro-batches) the whole update's
    step_sequences = mask.shape[0] if totals is None else totals.sequences
    step_tokens = jnp.maximum(num_tokens if totals is None else jnp.asarray(totals.tokens, dtype), 1.0)
    if cfg.loss_type == "grpo":
        loss = jnp.sum(jnp.sum(per_token, axis=-1) / jnp.maximum(tokens_per_seq, 1.0)) / step_sequences
    elif cfg.loss_type == "bnpo":
        loss = total / step_tokens
    elif cfg.loss_type == "dr_grpo":
        n = mask.shape[-1] if max_completion_length is None else max_completion_length
        loss = total / (step_sequences * n)
    else:
        denom = step_tokens if num_items_in_batch is None else jnp.asarray(num_items_in_batch, dtype)
        loss = total / jnp.maximum(denom, 1.0)

    def token_mean(x):
        return jnp.sum(jnp.where(mask, jnp.broadcast_to(x, mask.shape).astype(dtype), 0.0)) / step_tokens

    metrics = {"loss": loss, "ratio": token_mean(ratio), "completion_tokens": num_tokens}
    if cfg.loss_type == "cispo":
        metrics["clip_ratio/cispo"] = token_mean((ratio > cfg.cispo_epsilon_high) & (adv > 0))
    else:
        low = (ratio < 1.0 - eps_low) & (adv < 0)
        high = (ratio > 1.0 + eps_high) & (adv > 0)
        metrics.update({"clip_ratio/low": token_mean(low), "clip_ratio/high": token_mean(high),
                        "clip_ratio/region": token_mean(low | high)})
    for name, (value, kind) in drift.items():
        metrics[name] = token_mean(value) if kind == "mean" else jnp.max(jnp.where(mask, value, 0.0))
    if kl is not None:
        metrics["kl"] = token_mean(kl)
    if entropy is None and logits is not None:
        entropy = token_entropy(logits)
    if entropy is not None:
        metrics["entropy"] = token_mean(jax.lax.stop_gradient(entropy))
    return loss, metrics


def sampler_drift(old_logp: jax.Array, sampler_logp: jax.Array, mask: jax.Array, level: str = "token",
                  tis_cap: Optional[float] = None) -> dict:
    """How far the trainer's log-probs of the sampled tokens (old_logp, the policy that sampled) are from the
    sampler's own: {metric name: ([B, N] values, "mean" | "max")}, and with tis_cap the truncated importance
    weights min(pi_old / pi_sampler, tis_cap) as "tis_weight" ([B, N] or [B, 1], TRL's *_truncate modes).
    Both inputs are constants of the update (no gradient)."""
    diff = jax.lax.stop_gradient(jnp.where(mask, old_logp - sampler_logp, 0.0))
    out = {
        "sampling/logp_difference/mean": (jnp.abs(diff), "mean"),
        "sampling/logp_difference/max": (jnp.abs(diff), "max"),
        "sampling/kl": (k3_kl(old_logp, sampler_logp) * mask, "mean"),  # KL(sampler || trainer), k3 on sampled tokens
        "sampling/ratio/max": (jnp.exp(diff), "max"),  # pi_old / pi_sampler
    }
    if tis_cap is not None:
        log_weight = jnp.sum(diff, axis=-1, keepdims=True) if level == "sequence" else diff
        weight = jnp.minimum(jnp.exp(log_weight), tis_cap)
        out["sampling/tis_weight/mean"] = (weight, "mean")
        out["tis_weight"] = weight
    return out
