"""Gradient accumulation (grpo.micro_batch_size): an update run as k micro-batches equals the one-shot update.

The same tiny decoder, batch and optimizer step are built twice, once with the whole
minibatch in one pass and once with micro-batches; loss, metrics, gradients (through
an SGD step, where the update is -lr * gradient) and the reference / old log-prob pass
must agree to float32 rounding (1e-6 relative) for every loss type, both
importance-sampling levels and beta 0 / > 0, on one device and on a data x fsdp mesh.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from grpo_jax import sharding
from grpo_jax.config import load_config
from grpo_jax.models import transformer
from grpo_jax.objective import StepTotals, policy_loss
from grpo_jax.trainer import (
    assemble_batch,
    init_train_state,
    join_micro_batches,
    make_steps,
    micro_batch_count,
    split_micro_batches,
)

CONFIG = transformer.TransformerConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=4,
                              num_kv_heads=2, head_dim=4)
ROWS, PROMPT, COMPLETION = 8, 6, 10
LR = 0.5


def make_batch(seed=0):
    rng = np.random.default_rng(seed)
    prompt_len = rng.integers(2, PROMPT + 1, ROWS)
    prompt_mask = np.arange(PROMPT)[None] >= (PROMPT - prompt_len)[:, None]  # left-padded
    completion_len = rng.integers(0, COMPLETION + 1, ROWS)  # ragged, one may be empty
    completion_len[0] = COMPLETION
    completion_mask = np.arange(COMPLETION)[None] < completion_len[:, None]
    batch = assemble_batch(rng.integers(1, 64, (ROWS, PROMPT)), prompt_mask, rng.integers(1, 64, (ROWS, COMPLETION)),
                           completion_mask, rng.normal(size=ROWS).astype(np.float32))
    noise = lambda scale: jnp.asarray(rng.normal(scale=scale, size=(ROWS, COMPLETION)), jnp.float32)  # noqa: E731
    return batch, noise


def record_gradients() -> optax.GradientTransformation:
    """Passes gradients through unchanged and keeps the last ones in its state, to compare them exactly."""
    return optax.GradientTransformation(lambda params: jax.tree.map(jnp.zeros_like, params),
                                        lambda grads, state, params=None: (grads, grads))


def build(overrides, mesh=None):
    cfg = load_config(None, ["--optim.optimizer=sgd", f"--optim.learning_rate={LR}", "--optim.max_grad_norm=null",
                             f"--data.batch_size={ROWS // 2}", "--rollout.group_size=2",
                             f"--rollout.max_completion_length={COMPLETION}", "--grpo.num_iterations=2", *overrides])
    optimizer = optax.chain(record_gradients(), optax.sgd(LR))
    params = nnx.to_pure_dict(nnx.state(transformer.Transformer(CONFIG, rngs=nnx.Rngs(0)), nnx.Param))
    state = init_train_state(params, optimizer, jax.random.PRNGKey(0), keep_reference=True)
    shardings = None
    if mesh is not None:
        abs_model = transformer.abstract_model(CONFIG)
        shardings = sharding.train_state_shardings(state, optimizer, transformer.param_shardings(abs_model, mesh,
                                                                                        sharding.DEFAULT_RULES), mesh)
        state = jax.device_put(state, shardings)
    return cfg, state, make_steps(transformer.Decoder(CONFIG), optimizer, cfg, shardings)


def one_update(overrides, micro, mesh=None):
    cfg, state, (logps, update) = build([*overrides, f"--grpo.micro_batch_size={micro}"], mesh)
    batch, noise = make_batch()
    if mesh is not None:
        batch = sharding.shard_rows(batch, mesh)
    with_logps = logps(state, batch)
    # old / ref log-probs away from the policy's, so ratios clip and the KL is not zero
    policy_logp = with_logps.old_logp
    batch = with_logps._replace(old_logp=policy_logp + noise(0.3), ref_logp=policy_logp + noise(0.2))
    new_state, metrics = update(state, batch)
    host = lambda tree: jax.tree.map(np.asarray, tree)  # noqa: E731
    return (host(with_logps.old_logp), host(with_logps.ref_logp), host(new_state.opt_state[0]),
            host(new_state.params), {k: float(v) for k, v in metrics.items()})


def assert_close(a, b, what, rtol=1e-6, atol=1e-7):
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        scale = max(float(np.max(np.abs(x))), 1e-3)
        err = float(np.max(np.abs(x - y))) if x.size else 0.0
        assert err <= rtol * scale + atol, (what, jax.tree_util.keystr(path), err, scale)


def test_micro_batch_shares_add_up_to_the_whole_loss():
    """policy_loss with the update's StepTotals, every loss type x ratio level x beta: the micro-batches'
    losses, metrics and log-prob gradients sum to the one-shot ones (no model: cheap to cover all 16)."""
    rng = np.random.default_rng(1)
    mask = np.arange(COMPLETION)[None] < rng.integers(0, COMPLETION + 1, ROWS)[:, None]
    logp, old, ref = (jnp.asarray(rng.normal(-1.5, s, (ROWS, COMPLETION)), jnp.float32) for s in (0.5, 0.6, 0.6))
    adv = jnp.asarray(rng.normal(size=ROWS), jnp.float32)
    for loss_type, level, beta in itertools.product(("grpo", "bnpo", "dr_grpo", "dapo"), ("token", "sequence"),
                                                    (0.0, 0.04)):
        cfg = load_config(None, [f"--grpo.loss_type={loss_type}", f"--grpo.importance_sampling_level={level}",
                                 f"--grpo.beta={beta}", "--grpo.epsilon=0.1"]).grpo
        totals = StepTotals(sequences=ROWS, tokens=jnp.sum(jnp.asarray(mask, jnp.float32)))

        def loss(lp, rows, totals, cfg=cfg):
            return policy_loss(lp, old[rows], ref[rows], adv[rows], mask[rows], cfg, totals=totals,
                               max_completion_length=COMPLETION)

        (whole, m_whole), g_whole = jax.value_and_grad(loss, has_aux=True)(logp, slice(None), None)
        parts, grad = [], jnp.zeros_like(logp)
        for i in range(4):  # micro-batches of rows i, i + 4
            rows = np.arange(i, ROWS, 4)
            (value, metrics), g = jax.value_and_grad(loss, has_aux=True)(logp[rows], rows, totals)
            parts.append(metrics)
            grad = grad.at[rows].set(g)
        for key in m_whole:
            assert sum(float(p[key]) for p in parts) == pytest.approx(float(m_whole[key]), rel=1e-6, abs=1e-8), \
                (key, loss_type, level, beta)
        np.testing.assert_allclose(grad, g_whole, rtol=1e-6, atol=1e-9)
        assert float(whole) != 0.0


# Through the real update step, each loss type once, the ratio levels and betas spread over them (each
# level meets each beta); compiling a decoder's update twice per case is what this costs.
CASES = [("grpo", "token", 0.04), ("bnpo", "sequence", 0.0), ("dr_grpo", "token", 0.0), ("dapo", "sequence", 0.04)]


@pytest.mark.parametrize("loss_type,level,beta", CASES)
def test_accumulated_update_equals_the_one_shot_update(loss_type, level, beta):
    flags = [f"--grpo.loss_type={loss_type}", f"--grpo.importance_sampling_level={level}", f"--grpo.beta={beta}",
             "--grpo.epsilon=0.1"]
    old0, ref0, grads0, after0, m0 = one_update(flags, 0)
    old, ref, grads, after, m = one_update(flags, 2)  # 4 micro-batches of 2 rows
    case = (loss_type, level, beta)
    assert_close(old0, old, ("old_logp", case))
    assert_close(ref0, ref, ("ref_logp", case))
    assert_close(grads0, grads, ("grads", case))
    assert_close(after0, after, ("params", case))
    assert set(m) == set(m0), case
    for key in m0:
        assert m[key] == pytest.approx(m0[key], rel=1e-5, abs=1e-7), (key, case)
    assert m0["clip_ratio/region"] > 0, "the case does not exercise clipping"
    assert beta == 0 or m0["kl"] > 0


def test_accumulation_on_a_mesh_matches_one_device():
    mesh = sharding.make_mesh(load_config(None, ["--mesh.data=2", "--mesh.fsdp=2"]).mesh, jax.devices()[:4])
    flags = ["--grpo.loss_type=dapo", "--grpo.beta=0.04", "--grpo.epsilon=0.1"]
    *_, after0, m0 = one_update(flags, 0)
    *_, after, m = one_update(flags, 4, mesh)
    assert_close(after0, after, "params on a mesh", rtol=2e-6)
    assert m["loss"] == pytest.approx(m0["loss"], rel=1e-5)


def test_micro_batch_layout_and_count():
    cfg = load_config(None, ["--data.batch_size=4", "--rollout.group_size=4", "--grpo.micro_batch_size=4"])
    assert micro_batch_count(cfg, 16) == 4 and micro_batch_count(cfg, 4) == 1
    x = jnp.arange(16 * 3).reshape(16, 3)
    pieces = split_micro_batches({"x": x}, 4)["x"]
    assert pieces.shape == (4, 4, 3)
    # strided: micro-batch i holds rows i, i + 4, ...; so a device's contiguous rows feed every micro-batch
    np.testing.assert_array_equal(pieces[1][:, 0], x[1::4, 0])
    np.testing.assert_array_equal(join_micro_batches(pieces), x)
    with pytest.raises(ValueError, match="resolved"):
        micro_batch_count(load_config(None, ["--grpo.micro_batch_size=auto"]), 16)
