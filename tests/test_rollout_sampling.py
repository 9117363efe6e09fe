"""Sampler statistics and bookkeeping on small hand-built models (no transformer needed).

A "bigram" model: logits of the next token = table[last token]. Its KV cache is a
real pytree with the layout of the transformer's ([layers, batch, slots, ...] plus
per-row slot masks and a scalar write index), so the sampler's cache handling runs.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from grpo_jax import token_logprobs
from grpo_jax.rollout import SamplingParams, filter_logits, generate, row_keys

V = 12


def bigram_table(seed=0, scale=2.0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((V, V)) * scale, jnp.float32)


def init_cache(batch, max_len):
    return {"k": jnp.zeros((1, batch, max_len, 1, 1)), "slot_mask": jnp.zeros((batch, max_len), bool),
            "index": jnp.int32(0)}


def forward(table, tokens, positions, mask, cache):
    T = tokens.shape[1]
    cache = dict(cache)
    cache["slot_mask"] = jax.lax.dynamic_update_slice(cache["slot_mask"], mask.astype(bool), (0, cache["index"]))
    cache["index"] = cache["index"] + T
    return table[tokens], cache


def run(table, prompts, mask, key, sp, **kw):
    return generate(forward, init_cache, table, prompts, mask, key, sp, buckets=(4, 8), **kw)


def reference_probs(logits, sp):
    """NumPy: temperature, top-k, top-p (renormalised), min-p, as transformers' warpers."""
    x = np.asarray(logits, np.float64) / sp.temperature
    if sp.top_k:
        kth = np.sort(x)[::-1][sp.top_k - 1]
        x = np.where(x < kth, -np.inf, x)
    if sp.top_p < 1:
        order = np.argsort(x, kind="stable")  # ascending, as HF
        p = np.exp(x[order] - x.max())
        p /= p.sum()
        remove = np.cumsum(p) <= 1 - sp.top_p
        remove[-1] = False
        x[order[remove]] = -np.inf
    if sp.min_p:
        p = np.exp(x - x.max())
        p /= p.sum()
        x = np.where(p < sp.min_p * p.max(), -np.inf, x)
    p = np.exp(x - x.max())
    return p / p.sum()


@pytest.mark.parametrize(
    "sp",
    [
        SamplingParams(1, temperature=1.0),
        SamplingParams(1, temperature=0.7, top_k=4),
        SamplingParams(1, temperature=1.3, top_p=0.8),
        SamplingParams(1, temperature=1.0, min_p=0.1),
        SamplingParams(1, temperature=0.9, top_k=6, top_p=0.9, min_p=0.05),
    ],
    ids=["plain", "top_k", "top_p", "min_p", "all"],
)
def test_empirical_frequencies_match_filtered_distribution(sp):
    table = bigram_table(1)
    prompts = np.full((1, 1), 3)
    draws = 20000
    out = run(table, prompts, np.ones((1, 1), bool), jax.random.PRNGKey(0), sp, group_size=draws)
    counts = np.bincount(np.asarray(out.tokens[:, 0]), minlength=V)
    p = reference_probs(table[3], sp)
    assert np.all(counts[p == 0] == 0), "a filtered-out token was sampled"
    support = p > 0
    chi2, pvalue = stats.chisquare(counts[support], draws * p[support])
    assert pvalue > 1e-3, (counts, draws * p)


def test_filter_logits_matches_reference_on_random_rows():
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((20, 30)).astype(np.float32) * 3
    for sp in [SamplingParams(1, top_k=5), SamplingParams(1, top_p=0.5), SamplingParams(1, min_p=0.2),
               SamplingParams(1, top_k=10, top_p=0.7, min_p=0.1)]:
        got = np.asarray(jax.nn.softmax(filter_logits(jnp.asarray(logits), sp.top_k, sp.top_p, sp.min_p)))
        for row, g in zip(logits, got):
            np.testing.assert_allclose(g, reference_probs(row, sp), atol=1e-6)


def test_same_key_same_output_and_logprobs_match_full_forward():
    table = bigram_table(2)
    prompts = np.array([[0, 0, 5, 7], [1, 2, 3, 4]])
    mask = np.array([[0, 0, 1, 1], [1, 1, 1, 1]], bool)
    sp = SamplingParams(10, temperature=0.8, top_k=8, stop_token_ids=(11,), pad_token_id=0)
    a = run(table, prompts, mask, jax.random.PRNGKey(4), sp, group_size=3)
    b = run(table, prompts, mask, jax.random.PRNGKey(4), sp, group_size=3)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    # recompute with a full forward on prompt + completion
    last = np.repeat(prompts[:, -1:], 3, axis=0)
    inputs = np.concatenate([last, np.asarray(a.tokens[:, :-1])], axis=1)
    lp = token_logprobs(table[inputs], a.tokens, temperature=0.8)
    m = np.asarray(a.mask)
    np.testing.assert_allclose(np.asarray(lp)[m], np.asarray(a.logprobs)[m], atol=1e-5)
    assert np.all(np.asarray(a.logprobs)[~m] == 0)


def test_stop_tokens_mask_truncation_and_padding():
    # a table where token 2 always leads to 9, and 9 to 9 (stop), others go to 1 then 2
    table = jnp.full((V, V), -1e4).at[:, 1].set(0.0).at[1, 1].set(-1e4).at[1, 2].set(0.0) \
        .at[2, :].set(-1e4).at[2, 9].set(0.0).at[9, :].set(-1e4).at[9, 9].set(0.0)
    prompts = np.array([[3, 4], [0, 2], [0, 1]])
    mask = np.array([[1, 1], [0, 1], [0, 1]], bool)
    sp = SamplingParams(6, temperature=0.0, stop_token_ids=(9, 10), pad_token_id=0)
    out = run(table, prompts, mask, jax.random.PRNGKey(0), sp)
    np.testing.assert_array_equal(out.tokens, [[1, 2, 9, 0, 0, 0], [9, 0, 0, 0, 0, 0], [2, 9, 0, 0, 0, 0]])
    np.testing.assert_array_equal(out.mask.sum(1), [3, 1, 2])
    assert not np.any(out.truncated) and int(out.num_tokens) == 6
    sp_short = SamplingParams(2, temperature=0.0, stop_token_ids=(9,), pad_token_id=0)
    out = run(table, prompts, mask, jax.random.PRNGKey(0), sp_short)
    np.testing.assert_array_equal(out.truncated, [True, False, False])


def test_shared_prefill_equals_plain_path_and_rows_are_layout_independent():
    table = bigram_table(5)
    prompts = np.array([[0, 3, 4], [6, 7, 8]])
    mask = np.array([[0, 1, 1], [1, 1, 1]], bool)
    sp = SamplingParams(8, temperature=1.0, top_p=0.95, stop_token_ids=(0,), pad_token_id=0)
    keys = row_keys(jax.random.PRNGKey(7), 8)
    shared = run(table, prompts, mask, keys, sp, group_size=4)
    plain = run(table, prompts, mask, keys, sp, group_size=4, share_prefill=False)
    for x, y in zip(shared, plain):
        np.testing.assert_array_equal(x, y)
    # the second prompt's rows alone, with their own keys, give the same samples
    alone = run(table, prompts[1:], mask[1:], keys[4:], sp, group_size=4)
    np.testing.assert_array_equal(alone.tokens, shared.tokens[4:])


def test_bucketing_reuses_programs_and_rejects_too_long_prompts(caplog):
    table = bigram_table(0)
    sp = SamplingParams(3, temperature=1.0, top_k=7, pad_token_id=0)  # settings no other test uses
    with caplog.at_level("INFO", logger="grpo_jax.rollout"):
        run(table, np.array([[1, 2, 3]]), np.ones((1, 3), bool), jax.random.PRNGKey(0), sp)
        run(table, np.array([[1, 2]]), np.ones((1, 2), bool), jax.random.PRNGKey(1), sp)  # same bucket 4
    assert sum("compiling rollout" in r.message for r in caplog.records) == 1
    with pytest.raises(ValueError, match="exceeds the largest prompt bucket"):
        run(table, np.ones((1, 9), int), np.ones((1, 9), bool), jax.random.PRNGKey(0), sp)
    with pytest.raises(ValueError, match="left-padded"):
        run(table, np.ones((1, 3), int), np.array([[1, 1, 0]], bool), jax.random.PRNGKey(0), sp)
