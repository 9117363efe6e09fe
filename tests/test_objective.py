"""The GRPO objective against the worked numbers and an independent NumPy reference."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grpo_jax import group_advantages, policy_loss, token_entropy, token_logprobs
from grpo_jax.config import GRPOConfig

# ------------------------------------------------------------------ reference (NumPy, written from the papers / TRL)


def np_advantages(r, G, scale, eps):
    r = np.asarray(r, np.float64).reshape(-1, G)
    out = []
    for g in r:
        mean = g.mean()
        if scale == "rloo":
            a = np.array([g[i] - (g.sum() - g[i]) / (G - 1) for i in range(G)])
        elif scale == "none":
            a = g - mean
        else:
            std = np.std(r.reshape(-1), ddof=1) if scale == "batch" else np.std(g, ddof=1)
            a = (g - mean) / (std + eps)
        if np.all(g == g[0]):
            a = np.zeros(G)
        out.append(a)
    return np.concatenate(out)


def np_policy_loss(logp, old, ref, adv, mask, cfg, num_items=None, max_len=None, sampler=None):
    """TRL 1.16 GRPOTrainer._compute_loss, one token at a time; adv [B] or [B, N] (PPO's per-token)."""
    logp, old, adv, mask = (np.asarray(x, np.float64) for x in (logp, old, adv, mask))
    B, N = logp.shape
    adv = np.broadcast_to(adv[:, None] if adv.ndim == 1 else adv, (B, N))
    eps_lo, eps_hi = cfg.epsilon, cfg.epsilon_upper
    losses = np.zeros((B, N))
    ratios = np.zeros((B, N))
    for b in range(B):
        n_tok = max(mask[b].sum(), 1.0)
        seq_log_ratio = sum((logp[b, t] - old[b, t]) for t in range(N) if mask[b, t]) / n_tok
        seq_sampler_diff = 0.0 if sampler is None else sum(old[b, t] - sampler[b, t] for t in range(N) if mask[b, t])
        for t in range(N):
            lr = seq_log_ratio if cfg.importance_sampling_level == "sequence" else logp[b, t] - old[b, t]
            r = np.exp(lr)
            ratios[b, t] = r
            if cfg.loss_type == "cispo":
                weight = min(r, cfg.cispo_epsilon_high)
                if cfg.cispo_epsilon_low is not None:
                    weight = max(weight, 1 - cfg.cispo_epsilon_low)
                loss = -weight * adv[b, t] * logp[b, t]
            else:
                clipped = min(max(r, 1 - eps_lo), 1 + eps_hi)
                unclipped = r if cfg.delta is None else min(r, cfg.delta)
                loss = -min(unclipped * adv[b, t], clipped * adv[b, t])
            if cfg.tis_cap is not None:
                diff = seq_sampler_diff if cfg.tis_level == "sequence" else old[b, t] - sampler[b, t]
                loss *= min(np.exp(diff), cfg.tis_cap)
            if cfg.beta:
                d = ref[b, t] - logp[b, t]
                kl = np.exp(d) - d - 1
                loss += cfg.beta * kl * (r if cfg.use_bias_correction_kl else 1.0)
            losses[b, t] = loss * mask[b, t]
    if cfg.loss_type == "grpo":
        return np.mean([losses[b].sum() / max(mask[b].sum(), 1) for b in range(B)]), ratios
    if cfg.loss_type == "bnpo":
        return losses.sum() / max(mask.sum(), 1), ratios
    if cfg.loss_type == "dr_grpo":
        return losses.sum() / (B * (max_len or N)), ratios
    return losses.sum() / max(num_items if num_items is not None else mask.sum(), 1), ratios


def random_batch(seed, B=6, N=7):
    rng = np.random.default_rng(seed)
    old = -rng.uniform(0.1, 3.0, (B, N))
    logp = old + 0.3 * rng.standard_normal((B, N))
    ref = old + 0.2 * rng.standard_normal((B, N))
    adv = rng.standard_normal(B)
    lengths = rng.integers(1, N + 1, B)
    mask = (np.arange(N)[None] < lengths[:, None]).astype(np.float32)
    return [x.astype(np.float32) for x in (logp, old, ref, adv)] + [mask]


# ------------------------------------------------------------------ advantages


def test_worked_example_from_the_design_notes():
    r = jnp.array([1.0, 0.9, 0.0, 1.0])
    assert float(r.mean()) == pytest.approx(0.725)
    assert float(jnp.std(r, ddof=1)) == pytest.approx(0.485627, abs=1e-6)
    np.testing.assert_allclose(group_advantages(r, 4, "group", 1e-4), [0.56616, 0.36028, -1.49261, 0.56616], atol=1e-5)
    np.testing.assert_allclose(group_advantages(r, 4, "none"), [0.275, 0.175, -0.725, 0.275], atol=1e-6)


@pytest.mark.parametrize("scale", ["group", "batch", "none", "rloo"])
@pytest.mark.parametrize("G", [2, 4, 8])
def test_advantages_match_numpy_reference(scale, G):
    rng = np.random.default_rng(G)
    r = rng.standard_normal(G * 5).astype(np.float32)
    r[:G] = 0.5  # one flat group
    got = group_advantages(jnp.asarray(r), G, scale, 1e-4)
    np.testing.assert_allclose(got, np_advantages(r, G, scale, 1e-4), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scale", ["group", "batch", "none", "rloo"])
def test_equal_rewards_give_zero_never_nan(scale):
    for value in (0.0, 0.1, 1.0, 7.3):
        r = jnp.full((12,), value)
        adv = group_advantages(r, 4, scale, eps=0.0)
        assert np.all(np.asarray(adv) == 0.0), (scale, value, adv)


def test_rloo_is_leave_one_out():
    r = jnp.array([3.0, 1.0, 0.0, 2.0])
    np.testing.assert_allclose(group_advantages(r, 4, "rloo"), [3 - 1, 1 - 5 / 3, 0 - 2, 2 - 4 / 3], rtol=1e-6)


def test_advantage_input_errors():
    with pytest.raises(ValueError, match="at least 2"):
        group_advantages(jnp.ones(4), 1)
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(jnp.ones(4), 3)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(jnp.ones(4), 2, "zscore")


def test_advantages_jit():
    f = jax.jit(group_advantages, static_argnums=(1, 2))
    np.testing.assert_allclose(f(jnp.array([1.0, 0.9, 0.0, 1.0]), 4, "group"), [0.56616, 0.36028, -1.49261, 0.56616],
                               atol=1e-5)


# ------------------------------------------------------------------ token log-probs


def np_logprobs(logits, targets, temperature):
    x = np.asarray(logits, np.float64) / temperature
    x = x - x.max(-1, keepdims=True)
    lsm = x - np.log(np.exp(x).sum(-1, keepdims=True))
    p = np.exp(lsm)
    return np.take_along_axis(lsm, targets[..., None], -1)[..., 0], -(p * lsm).sum(-1)


@pytest.mark.parametrize("chunk_size", [1, 3, 5, 16, 1024])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_chunked_matches_reference(chunk_size, temperature):
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((3, 7, 50)).astype(np.float32) * 3
    targets = rng.integers(0, 50, (3, 7))
    want, want_ent = np_logprobs(logits, targets, temperature)
    lp, ent = token_logprobs(jnp.asarray(logits), jnp.asarray(targets), temperature, chunk_size, return_entropy=True)
    assert lp.dtype == jnp.float32 and lp.shape == (3, 7)
    np.testing.assert_allclose(lp, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ent, want_ent, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(token_entropy(jnp.asarray(logits), temperature, chunk_size), want_ent,
                               rtol=1e-5, atol=1e-5)


def test_token_logprobs_bf16_input_and_gradient_through_chunks():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.standard_normal((2, 9, 33)), jnp.bfloat16)
    targets = jnp.asarray(rng.integers(0, 33, (2, 9)))
    lp = token_logprobs(logits, targets, chunk_size=4)
    assert lp.dtype == jnp.float32
    want, _ = np_logprobs(np.asarray(logits.astype(jnp.float32)), np.asarray(targets), 1.0)
    np.testing.assert_allclose(lp, want, atol=1e-5)
    f32 = logits.astype(jnp.float32)
    g_chunked = jax.grad(lambda x: token_logprobs(x, targets, chunk_size=4).sum())(f32)
    g_plain = jax.grad(lambda x: jnp.take_along_axis(jax.nn.log_softmax(x), targets[..., None], -1).sum())(f32)
    np.testing.assert_allclose(g_chunked, g_plain, atol=1e-6)


# ------------------------------------------------------------------ policy loss

CASES = [
    dict(loss_type=lt, beta=beta, importance_sampling_level=lvl, epsilon_high=eh, delta=delta)
    for lt in ("grpo", "bnpo", "dr_grpo", "dapo")
    for beta, lvl, eh, delta in [(0.0, "token", None, None), (0.04, "token", 0.28, None),
                                 (0.04, "sequence", None, None), (0.1, "token", None, 1.5)]
] + [  # CISPO, the KL's bias correction, truncated importance sampling, PPO's per-token advantages
    dict(loss_type="cispo", beta=0.0, cispo_epsilon_high=1.1),
    dict(loss_type="cispo", beta=0.04, importance_sampling_level="sequence", cispo_epsilon_high=1.05,
         cispo_epsilon_low=0.1),
    dict(loss_type="bnpo", beta=0.1, use_bias_correction_kl=True),
    dict(loss_type="grpo", beta=0.04, importance_sampling_level="sequence", use_bias_correction_kl=True),
    dict(loss_type="dapo", beta=0.04, tis_cap=1.2),
    dict(loss_type="cispo", beta=0.0, tis_cap=1.5, tis_level="sequence"),
    dict(loss_type="bnpo", beta=0.0, token_advantages=True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_policy_loss_matches_numpy_reference(case):
    case = dict(case)
    token_advantages = case.pop("token_advantages", False)
    cfg = dataclasses.replace(GRPOConfig(), **case)
    logp, old, ref, adv, mask = random_batch(sum(map(ord, str(case))) % 1000)
    rng = np.random.default_rng(len(str(case)))
    if token_advantages:
        adv = rng.standard_normal(mask.shape).astype(np.float32)
    sampler = (old + 0.1 * rng.standard_normal(old.shape)).astype(np.float32)
    kwargs = {"sampler_logp": sampler}
    if cfg.loss_type in ("dapo", "cispo"):
        kwargs["num_items_in_batch"] = float(mask.sum() * 3)  # as if two more minibatches
    if cfg.loss_type == "dr_grpo":
        kwargs["max_completion_length"] = 10
    loss, metrics = jax.jit(lambda *a: policy_loss(*a, cfg, **kwargs))(logp, old, ref, adv, mask)
    want, ratios = np_policy_loss(logp, old, ref, adv, mask, cfg, kwargs.get("num_items_in_batch"),
                                  kwargs.get("max_completion_length"), sampler)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5, atol=1e-7)
    # clip metrics
    m = mask.astype(bool)
    a = adv[:, None] if adv.ndim == 1 else adv
    if cfg.loss_type == "cispo":
        np.testing.assert_allclose(float(metrics["clip_ratio/cispo"]),
                                   ((ratios > cfg.cispo_epsilon_high) & (a > 0))[m].mean(), rtol=1e-5)
    else:
        low = (ratios < 1 - cfg.epsilon) & (a < 0)
        high = (ratios > 1 + cfg.epsilon_upper) & (a > 0)
        np.testing.assert_allclose(float(metrics["clip_ratio/low"]), low[m].mean(), rtol=1e-5)
        np.testing.assert_allclose(float(metrics["clip_ratio/high"]), high[m].mean(), rtol=1e-5)
        np.testing.assert_allclose(float(metrics["clip_ratio/region"]), (low | high)[m].mean(), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["ratio"]), ratios[m].mean(), rtol=1e-5)
    # the sampler-trainer drift (old against the sampler's log-probs), as TRL's sampling/* metrics
    diff = (old - sampler).astype(np.float64)[m]
    np.testing.assert_allclose(float(metrics["sampling/logp_difference/mean"]), np.abs(diff).mean(), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["sampling/logp_difference/max"]), np.abs(diff).max(), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["sampling/ratio/max"]), np.exp(diff).max(), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["sampling/kl"]), (np.exp(diff) - diff - 1).mean(), rtol=1e-4)
    if cfg.beta:
        d = (ref - logp).astype(np.float64)
        kl = (np.exp(d) - d - 1) * (ratios if cfg.use_bias_correction_kl else 1.0)
        np.testing.assert_allclose(float(metrics["kl"]), kl[m].mean(), rtol=1e-5)
    else:
        assert "kl" not in metrics


def test_beta_zero_accepts_no_reference_and_nonzero_requires_it():
    logp, old, ref, adv, mask = random_batch(3)
    cfg = GRPOConfig(beta=0.0)
    loss_none, _ = policy_loss(logp, old, None, adv, mask, cfg)
    loss_ref, _ = policy_loss(logp, old, ref, adv, mask, cfg)
    assert float(loss_none) == float(loss_ref)
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(logp, old, None, adv, mask, GRPOConfig(beta=0.04))


def test_entropy_metric_from_logits():
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((2, 3, 11)).astype(np.float32)
    targets = rng.integers(0, 11, (2, 3))
    logp, ent = np_logprobs(logits, targets, 1.0)
    mask = np.array([[1, 1, 0], [1, 0, 0]], np.float32)
    _, m = policy_loss(jnp.asarray(logp, jnp.float32), None, None, jnp.ones(2), mask, GRPOConfig(beta=0),
                       logits=jnp.asarray(logits))
    np.testing.assert_allclose(float(m["entropy"]), ent[mask.astype(bool)].mean(), rtol=1e-5)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_on_policy_gradient_is_reinforce(loss_type):
    """old = logp (stop-gradient), beta = 0: d loss / d logp = -A * d agg(logp)."""
    logp, _, _, adv, mask = random_batch(11)
    cfg = GRPOConfig(beta=0.0, loss_type=loss_type)
    grad = jax.grad(lambda lp: policy_loss(lp, None, None, adv, mask, cfg)[0])(jnp.asarray(logp))
    B, N = mask.shape
    if loss_type == "grpo":
        weights = mask / np.maximum(mask.sum(1, keepdims=True), 1) / B
    elif loss_type == "dr_grpo":
        weights = mask / (B * N)
    else:
        weights = mask / mask.sum()
    reinforce = -adv[:, None] * weights
    np.testing.assert_allclose(grad, reinforce, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("case", [CASES[i] for i in (1, 2, 3, 6, 14, 18, 19, 20)], ids=str)
def test_gradient_matches_finite_differences_float64(case):
    with jax.enable_x64(True):
        cfg = dataclasses.replace(GRPOConfig(), **case)
        logp, old, ref, adv, mask = (jnp.asarray(x, jnp.float64) for x in random_batch(21, B=3, N=4))
        sampler = old + 0.1 * jnp.asarray(np.random.default_rng(2).standard_normal(old.shape))
        f = lambda lp: policy_loss(lp, old, ref, adv, mask, cfg, sampler_logp=sampler)[0]
        g = np.asarray(jax.grad(f)(logp), np.float64)
        assert f(logp).dtype == jnp.float64
        h = 1e-6
        fd = np.zeros_like(g)
        for idx in np.ndindex(*logp.shape):
            e = np.zeros(logp.shape)
            e[idx] = h
            fd[idx] = (float(f(logp + e)) - float(f(logp - e))) / (2 * h)
        np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-9)


def test_padding_changes_nothing_even_when_garbage():
    logp, old, ref, adv, mask = random_batch(7)
    cfg = GRPOConfig(beta=0.04, loss_type="grpo")
    loss, metrics = policy_loss(logp, old, ref, adv, mask, cfg)
    pad = mask == 0
    junk = lambda x, v: np.where(pad, v, x).astype(np.float32)
    loss2, metrics2 = policy_loss(junk(logp, np.nan), junk(old, -np.inf), junk(ref, 1e9), adv, mask, cfg)
    assert float(loss) == float(loss2)
    for k in metrics:
        assert float(metrics[k]) == float(metrics2[k]), k
    loss = lambda lp: policy_loss(lp, junk(old, -np.inf), ref, adv, mask, cfg)[0]
    grad = jax.grad(loss)(jnp.asarray(junk(logp, np.nan)))
    assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[pad] == 0)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_empty_masks_and_flat_groups_never_nan(loss_type, level):
    cfg = GRPOConfig(beta=0.04, loss_type=loss_type, importance_sampling_level=level)
    logp, old, ref, _, mask = random_batch(9, B=4)
    adv = group_advantages(jnp.ones(4), 4, "group", eps=0.0)  # flat group
    mask[1] = 0  # one empty completion
    loss, metrics = policy_loss(logp, old, ref, adv, mask, cfg)
    assert np.isfinite(float(loss))
    assert all(np.isfinite(float(v)) for v in metrics.values())
    empty = np.zeros_like(mask)
    loss, metrics = policy_loss(logp, old, ref, adv, empty, cfg)
    assert float(loss) == 0.0 and all(np.isfinite(float(v)) for v in metrics.values())
    g = jax.grad(lambda lp: policy_loss(lp, old, ref, adv, mask, cfg)[0])(jnp.asarray(logp))
    assert np.all(np.isfinite(g))


def test_clipping_stops_the_gradient_outside_the_trust_region():
    """A ratio above 1 + epsilon with A > 0 contributes no gradient (the min picks the clipped term)."""
    cfg = GRPOConfig(beta=0.0, loss_type="bnpo", epsilon=0.2)
    old = jnp.zeros((1, 2))
    logp = jnp.array([[0.5, 0.0]])  # ratio e^0.5 = 1.65 > 1.2 for token 0
    g = jax.grad(lambda lp: policy_loss(lp, old, None, jnp.array([1.0]), jnp.ones((1, 2)), cfg)[0])(logp)
    assert float(g[0, 0]) == 0.0 and float(g[0, 1]) == pytest.approx(-0.5)
