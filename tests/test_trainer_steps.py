"""The jitted GRPO steps on a bigram policy (logits = table[last token]): it must learn.

A bigram table is a real differentiable policy, small enough that a GRPO run of a
few dozen steps fits in seconds, so the loop's maths (rollout -> rewards ->
advantages -> clipped update) is tested end to end without a transformer.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grpo_jax import group_advantages
from grpo_jax.config import load_config
from grpo_jax.optim import learning_rate_schedule, make_optimizer
from grpo_jax.rollout import SamplingParams, generate
from grpo_jax.trainer import (
    assemble_batch,
    completion_logprobs,
    init_train_state,
    make_steps,
    minibatch_order,
    train_on_batch,
)

V, TARGET = 16, 7


def init_cache(batch, max_len):
    return {"slot_mask": jnp.zeros((batch, max_len), bool), "index": jnp.int32(0)}


def forward(params, tokens, positions, mask, cache):
    logits = params["table"][tokens]
    if cache is None:
        return logits, None
    cache = {"slot_mask": jax.lax.dynamic_update_slice(cache["slot_mask"], mask.astype(bool), (0, cache["index"])),
             "index": cache["index"] + tokens.shape[1]}
    return logits, cache


def run_grpo(overrides, steps, seed=0, shuffle=False):
    cfg = load_config(None, ["--rollout.group_size=8", "--rollout.max_completion_length=6", "--data.batch_size=4",
                             "--optim.learning_rate=0.2", "--rewards.functions=[target]", *overrides])
    optimizer = make_optimizer(cfg.optim, steps * cfg.grpo.num_iterations * cfg.grpo.num_minibatches)
    params = {"table": jnp.zeros((V, V))}
    state = init_train_state(params, optimizer, jax.random.PRNGKey(seed), keep_reference=cfg.grpo.beta != 0)
    steps_fns = make_steps(forward, optimizer, cfg)
    sp = SamplingParams(cfg.rollout.max_completion_length, temperature=1.0, pad_token_id=0)
    prompts = np.array([[1, 2], [3, 4], [5, 6], [0, 9]])
    pmask = np.array([[1, 1], [1, 1], [1, 1], [0, 1]], bool)
    history = []
    for step in range(steps):
        key = jax.random.fold_in(state.rng, step)
        out = generate(forward, init_cache, state.params, prompts, pmask, key, sp, group_size=8, buckets=(2,))
        rewards = jnp.sum((out.tokens == TARGET) & out.mask, axis=1) / out.mask.shape[1]
        adv = group_advantages(rewards, 8, cfg.grpo.scale_rewards, cfg.grpo.advantage_eps)
        batch = assemble_batch(np.repeat(prompts, 8, 0), np.repeat(pmask, 8, 0), out.tokens, out.mask, adv)
        state, metrics = train_on_batch(state, steps_fns[0](state, batch), steps_fns[1], cfg,
                                        shuffle_seed=(seed, step) if shuffle else None)
        history.append({"reward": float(rewards.mean()), **{k: float(v) for k, v in metrics.items()}})
    return state, history


def test_bigram_policy_learns_to_emit_the_target_token():
    state, history = run_grpo([], steps=40)
    first = np.mean([h["reward"] for h in history[:3]])
    last = np.mean([h["reward"] for h in history[-3:]])
    assert first < 0.2, first  # chance is 1/16
    assert last > 0.8, (first, last)
    assert int(state.step) == 40


def test_same_seed_same_numbers():
    _, a = run_grpo([], steps=3, seed=1)
    _, b = run_grpo([], steps=3, seed=1)
    assert a == b


def test_kl_is_zero_at_first_step_then_positive():
    _, history = run_grpo(["--grpo.beta=0.04"], steps=4)
    assert history[0]["kl"] == pytest.approx(0.0, abs=1e-7)
    assert history[-1]["kl"] > 0


def test_several_iterations_clip_at_high_learning_rate():
    _, history = run_grpo(["--grpo.num_iterations=2", "--optim.learning_rate=0.5", "--grpo.beta=0"], steps=3)
    assert max(h["clip_ratio/region"] for h in history) > 0


def test_minibatches_use_recomputed_old_logprobs():
    _, history = run_grpo(["--grpo.num_minibatches=2", "--grpo.beta=0"], steps=2)
    assert len(history) == 2 and all(np.isfinite(h["loss"]) for h in history)


def test_minibatch_order_is_fresh_every_pass_and_step_and_the_same_after_a_resume():
    orders = {(step, it): minibatch_order(0, step, it, 32) for step in range(3) for it in range(2)}
    assert all(sorted(o) == list(range(32)) for o in orders.values())
    assert len({tuple(o) for o in orders.values()}) == len(orders)  # two passes, three steps: six orders
    np.testing.assert_array_equal(minibatch_order(0, 2, 1, 32), orders[2, 1])  # what a resumed run draws again
    assert not np.array_equal(minibatch_order(1, 0, 0, 32), orders[0, 0])  # another seed, another order


def test_shuffled_minibatches_are_wired_into_the_updates():
    args = ["--grpo.num_minibatches=2", "--grpo.num_iterations=2", "--grpo.beta=0", "--optim.optimizer=sgd"]
    shuffled, history = run_grpo(args, steps=2, shuffle=True)
    again, history_again = run_grpo(args, steps=2, shuffle=True)
    in_order, _ = run_grpo(args, steps=2)
    assert history == history_again
    np.testing.assert_array_equal(shuffled.params["table"], again.params["table"])
    assert not np.allclose(shuffled.params["table"], in_order.params["table"])  # other rows in each update


def test_non_finite_loss_skips_the_update():
    cfg = load_config(None, ["--grpo.beta=0"])
    optimizer = make_optimizer(cfg.optim, 10)
    state = init_train_state({"table": jnp.zeros((V, V))}, optimizer, jax.random.PRNGKey(0), keep_reference=False)
    steps_fns = make_steps(forward, optimizer, cfg)
    batch = assemble_batch(np.ones((8, 2), int), np.ones((8, 2), bool), np.ones((8, 3), int), np.ones((8, 3), bool),
                           jnp.full((8,), jnp.nan))
    before = np.asarray(state.params["table"]).copy()
    new_state, metrics = train_on_batch(state, steps_fns[0](state, batch), steps_fns[1], cfg)  # donates `state`
    assert float(metrics["update_skipped"]) == 1.0
    np.testing.assert_array_equal(new_state.params["table"], before)


def test_completion_logprobs_reads_the_right_positions():
    table = jax.random.normal(jax.random.PRNGKey(0), (V, V))
    batch = assemble_batch(np.array([[0, 3]]), np.array([[0, 1]], bool), np.array([[5, 6, 2]]),
                           np.ones((1, 3), bool), jnp.zeros(1))
    lp = completion_logprobs(forward, {"table": table}, batch, 1.0)
    want = [jax.nn.log_softmax(table[3])[5], jax.nn.log_softmax(table[5])[6], jax.nn.log_softmax(table[6])[2]]
    np.testing.assert_allclose(lp[0], want, rtol=1e-6)


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear"])
def test_schedules_warm_up_then_decay(schedule):
    cfg = dataclasses.replace(load_config().optim, schedule=schedule, warmup_steps=10, learning_rate=1.0)
    lr = learning_rate_schedule(cfg, 100)
    assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(0.5)
    assert float(lr(10)) == pytest.approx(1.0)
    if schedule != "constant":
        assert float(lr(100)) == pytest.approx(0.0, abs=1e-6)


def test_dapo_divides_every_minibatch_by_the_generation_batch_tokens_over_the_minibatches():
    """TRL's num_items_in_batch: with 2 minibatches of 3 and 9 tokens, each update's dapo loss is its token sum over
    (12 / 2), not over its own count (which would make dapo bnpo). lr 0: both updates see the same policy."""
    cfg = load_config(None, ["--grpo.beta=0", "--grpo.loss_type=dapo", "--grpo.num_minibatches=2",
                             "--data.batch_size=1", "--optim.learning_rate=0", "--optim.optimizer=sgd"])
    optimizer = make_optimizer(cfg.optim, 10)
    state = init_train_state({"table": jnp.zeros((V, V))}, optimizer, jax.random.PRNGKey(0), keep_reference=False)
    steps_fns = make_steps(forward, optimizer, cfg)
    lengths = np.array([1, 1, 1, 0, 3, 3, 2, 1])
    mask = np.arange(3)[None] < lengths[:, None]
    adv = np.linspace(-1, 1, 8).astype(np.float32)
    batch = assemble_batch(np.ones((8, 2), int), np.ones((8, 2), bool), np.ones((8, 3), int), mask, adv)
    _, metrics = train_on_batch(state, steps_fns[0](state, batch), steps_fns[1], cfg)
    sums = [-(adv[rows, None] * mask[rows]).sum() for rows in (slice(0, 4), slice(4, 8))]
    np.testing.assert_allclose(metrics["loss"], np.mean(sums) / (mask.sum() / 2), rtol=1e-5)
