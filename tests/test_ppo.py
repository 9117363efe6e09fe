"""run.algorithm=ppo: GAE, the value loss and PPO's policy loss against a NumPy float64 reference of TRL's
PPOTrainer (1.12, trl/experimental/ppo/ppo_trainer.py), then a PPO run with a critic that learns and resumes
bit for bit."""

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from runs import final_state
from tiny import target_config

from grpo_jax import ppo
from grpo_jax.config import ConfigError, GRPOConfig, load_config
from grpo_jax.loop import train
from grpo_jax.objective import policy_loss

# ------------------------------------------------------------------ reference (NumPy, TRL's code line by line)


def np_masked_mean(x, mask):
    return (x * mask).sum() / mask.sum()


def np_masked_whiten(x, mask, shift_mean=True):
    mean = np_masked_mean(x, mask)
    var = np_masked_mean((x - mean) ** 2, mask) * mask.sum() / (mask.sum() - 1)
    whitened = (x - mean) / np.sqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


def np_ppo_advantages(scores, logprobs, ref_logprobs, values, mask, kl_coef, estimator, gamma, lam, whiten_rewards):
    """TRL's PPOTrainer.train steps 3-6, with the score at the last completion token (TRL: one past it)."""
    scores, logprobs, ref_logprobs, values, mask = (np.asarray(x, np.float64) for x in
                                                    (scores, logprobs, ref_logprobs, values, mask))
    B, N = mask.shape
    values = values * mask
    logr = ref_logprobs - logprobs
    kl = -logr if estimator == "k1" else (np.exp(logr) - 1) - logr
    rewards = -kl_coef * kl * mask
    last = mask.sum(1).astype(int) - 1
    rewards[np.arange(B), last] += scores
    if whiten_rewards:
        rewards = np_masked_whiten(rewards, mask, shift_mean=False) * mask
    lastgaelam = 0
    reversed_ = []
    for t in reversed(range(N)):
        nextvalues = values[:, t + 1] if t < N - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        reversed_.append(lastgaelam)
    advantages = np.stack(reversed_[::-1], axis=1)
    returns = advantages + values
    advantages = np_masked_whiten(advantages, mask) * mask
    return rewards, advantages, returns * mask


def random_ppo_batch(seed, B=6, N=9):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, N + 1, B)
    lengths[0] = N
    mask = (np.arange(N)[None] < lengths[:, None]).astype(np.float32)
    logp = -rng.uniform(0.1, 3.0, (B, N))
    ref = logp + 0.3 * rng.standard_normal((B, N))
    values = rng.standard_normal((B, N))
    scores = rng.standard_normal(B)
    return [x.astype(np.float32) for x in (scores, logp, ref, values)] + [mask]


@pytest.mark.parametrize("estimator,kl_coef,gamma,lam,whiten_rewards",
                         [("k1", 0.05, 1.0, 0.95, False), ("k3", 0.2, 0.9, 0.8, True), ("k1", 0.0, 0.99, 1.0, False)])
def test_gae_rewards_and_whitening_match_trl(estimator, kl_coef, gamma, lam, whiten_rewards):
    scores, logp, ref, values, mask = random_ppo_batch(int(gamma * 100))
    settings = ppo.AdvantageSettings(kl_coef, estimator, gamma, lam, whiten_rewards, True)
    got = jax.jit(ppo.ppo_advantages, static_argnums=5)(scores, logp, ref, values, mask, settings)
    rewards, advantages, returns = np_ppo_advantages(scores, logp, ref, values, mask, kl_coef, estimator, gamma, lam,
                                                     whiten_rewards)
    np.testing.assert_allclose(got.rewards, rewards, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.returns, returns, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got.advantages, advantages, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(got.advantages)[mask == 0] == 0)


def test_gae_is_the_discounted_sum_of_td_errors():
    """A_t = sum_k (gamma lam)^k delta_{t+k}: with lam = 1 and V = 0 it is the discounted return."""
    rewards = jnp.array([[1.0, 2.0, 3.0, 0.0]])
    mask = jnp.array([[1, 1, 1, 0]], bool)
    adv, ret = ppo.gae(rewards, jnp.zeros((1, 4)), mask, gamma=0.5, lam=1.0)
    np.testing.assert_allclose(adv, [[1 + 0.5 * 2 + 0.25 * 3, 2 + 0.5 * 3, 3, 0]], rtol=1e-6)
    np.testing.assert_allclose(ret, adv)


@pytest.mark.parametrize("cliprange_value", [0.05, 0.2])
def test_value_loss_matches_trl(cliprange_value):
    rng = np.random.default_rng(3)
    _, _, _, old, mask = random_ppo_batch(4)
    new = (old + 0.3 * rng.standard_normal(old.shape)).astype(np.float32)
    returns = (old + rng.standard_normal(old.shape)).astype(np.float32)
    loss, metrics = ppo.value_loss(new, old, returns, mask, cliprange_value)
    n, o, r, m = (np.asarray(x, np.float64) for x in (new, old, returns, mask))
    clipped = np.clip(n, o - cliprange_value, o + cliprange_value)
    losses1, losses2 = (n - r) ** 2, (clipped - r) ** 2
    np.testing.assert_allclose(float(loss), 0.5 * np_masked_mean(np.maximum(losses1, losses2), m), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["value/clip_fraction"]), np_masked_mean(losses2 > losses1, m), rtol=1e-5)
    grad = jax.grad(lambda v: ppo.value_loss(v, old, returns, mask, cliprange_value)[0])(jnp.asarray(new))
    assert np.all(np.asarray(grad)[mask == 0] == 0) and np.any(np.asarray(grad) != 0)


def test_ppo_policy_loss_matches_trl():
    """policy_loss with per-token advantages, bnpo, beta 0 = TRL's pg_loss: masked_mean(max(-A r, -A clip(r)))."""
    scores, logp, ref, values, mask = random_ppo_batch(5)
    rng = np.random.default_rng(6)
    old = (logp + 0.2 * rng.standard_normal(logp.shape)).astype(np.float32)
    adv = rng.standard_normal(logp.shape).astype(np.float32)
    loss, _ = policy_loss(logp, old, None, adv, mask, GRPOConfig(beta=0.0, loss_type="bnpo", epsilon=0.2))
    ratio = np.exp(logp.astype(np.float64) - old)
    pg = np.maximum(-adv * ratio, -adv * np.clip(ratio, 0.8, 1.2))
    np.testing.assert_allclose(float(loss), np_masked_mean(pg, mask), rtol=1e-5)


def test_ppo_config_defaults_and_refusals(tmp_path):
    cfg = load_config(None, ["--run.algorithm=ppo"])
    assert cfg.rollout.group_size == 1 and cfg.grpo.loss_type == "bnpo"  # TRL's PPO, unless set
    assert load_config(None, ["--run.algorithm=ppo", "--rollout.group_size=4"]).rollout.group_size == 4
    for flag, needle in [("--grpo.filter_zero_std_groups=true", "no groups"), ("--model.lora_rank=4", "critic"),
                         ("--grpo.pack_sequences=true", "padded"), ("--ppo.cliprange_value=0", "cliprange_value")]:
        with pytest.raises(ConfigError, match=needle):
            load_config(None, ["--run.algorithm=ppo", flag])
    with pytest.raises(ConfigError, match="at least 2"):
        load_config(None, ["--rollout.group_size=1"])  # GRPO still needs a group


# ------------------------------------------------------------------ a PPO run


def test_ppo_learns_with_a_critic_and_resumes_bitwise(tiny_model, tmp_path):
    """PPO (G = 1, a critic from the policy's weights, 2 epochs x 2 minibatches, micro-batches) raises the reward;
    a run that lost its last checkpoint resumes from the one before and ends bit for bit where it did
    (policy, critic and both optimizer states), logging the same numbers."""
    args = target_config(tiny_model, tmp_path / "a", "--run.algorithm=ppo", "--rollout.group_size=1",
                         "--data.batch_size=32", "--run.steps=16", "--data.eval_split=null",
                         "--grpo.num_iterations=2", "--grpo.num_minibatches=2", "--grpo.micro_batch_size=8",
                         "--grpo.beta=0.01", "--ppo.critic_learning_rate=0.01", "--checkpoint.every_steps=8",
                         "--checkpoint.async_save=false")
    straight = train(load_config(None, args))
    rewards = [h["reward/mean"] for h in straight["history"]]
    assert np.mean(rewards[:3]) < 0.3 and np.mean(rewards[-3:]) > 0.6, rewards
    rows = [r for r in map(json.loads, (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert all(abs(r["sampling/logp_difference/mean"]) < 1e-4 for r in rows)  # float32: one graph samples and trains
    assert all(np.isfinite(r["value/loss"]) and "value/explained_variance" in r for r in rows)

    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "16")  # as if killed before the end was saved
    resumed = train(load_config(None, [a.replace(str(tmp_path / "a"), str(tmp_path / "b")) for a in args]))
    untimed = lambda h: [{k: v for k, v in row.items() if not k.startswith("time/")} for row in h]  # noqa: E731
    assert untimed(resumed["history"]) == untimed(straight["history"])
    (step_a, a), (step_b, b) = final_state(tmp_path / "a"), final_state(tmp_path / "b")
    assert step_a == step_b == 16 and len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    check_exported_critic(tmp_path / "a", tmp_path / "critic")


def check_exported_critic(run_dir, out):
    """`export --critic` writes a value model transformers loads, whose per-token scores are our critic's values;
    a new run's critic starts from it (ppo.critic_path), head included."""
    import torch
    import transformers
    from runs import launch

    from grpo_jax.checkpoint import checkpoint_params
    from grpo_jax.critic import critic_values, load_critic
    from grpo_jax.policy import Policy

    done = launch("export", "--run", run_dir, "--critic", "--out", out)
    assert done.returncode == 0, done.stderr[-2000:]
    model = transformers.AutoModelForSequenceClassification.from_pretrained(str(out), torch_dtype=torch.float32)
    tokens = np.random.default_rng(0).integers(3, 90, (2, 12))
    with torch.no_grad():
        theirs = model.model(torch.as_tensor(tokens)).last_hidden_state @ model.score.weight[0]  # [2, 12]
    cfg = load_config(run_dir / "config.yaml")
    cfg = dataclasses.replace(cfg, ppo=dataclasses.replace(cfg.ppo, critic_path=str(out)))
    critic = load_critic(cfg, Policy.load(cfg))
    saved, _ = checkpoint_params(run_dir, part="critic_params")
    np.testing.assert_array_equal(np.asarray(critic.params["score"]), np.asarray(saved["score"]))
    positions = np.broadcast_to(np.arange(12), tokens.shape)
    ours = critic_values(critic.decoder, critic.params, tokens, positions, np.ones_like(tokens, bool), n=11)
    np.testing.assert_allclose(ours, theirs.numpy()[:, :11], rtol=1e-4, atol=1e-5)


def test_cispo_gradient_is_the_clipped_weight_times_reinforce():
    """CISPO: d loss / d logp = -stop_gradient(min(r, eps_high)) A / tokens (the weight passes no gradient)."""
    scores, logp, ref, values, mask = random_ppo_batch(8)
    old = logp - 0.3
    adv = np.random.default_rng(9).standard_normal(mask.shape[0]).astype(np.float32)
    cfg = dataclasses.replace(GRPOConfig(), beta=0.0, loss_type="cispo", cispo_epsilon_high=1.2)
    grad = jax.grad(lambda lp: policy_loss(lp, old, None, adv, mask, cfg)[0])(jnp.asarray(logp))
    weight = np.minimum(np.exp(0.3), 1.2)
    np.testing.assert_allclose(grad, -weight * adv[:, None] * mask / mask.sum(), rtol=1e-5, atol=1e-7)
