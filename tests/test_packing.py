"""Sequence packing (grpo.pack_sequences): the packed update computes what the padded one does.

The same sequences are run padded (one per row) and packed (several per row, segment ids),
through the real reference / old log-prob pass and update step: completion log-probs, loss,
metrics and gradients agree to float32 rounding, with gradient accumulation and on a mesh.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from grpo_jax import packing, sharding
from grpo_jax.config import load_config
from grpo_jax.models import Transformer, transformer
from grpo_jax.trainer import assemble_batch, init_train_state, make_steps, packed_batch

# Gemma-2-like: soft-caps and a sliding window shorter than the sequences, so segments must not leak
CONFIG = transformer.TransformerConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=4,
                              num_kv_heads=2, head_dim=4, attn_logit_softcap=20.0, sliding_window=5,
                              layer_types=("sliding_attention", "full_attention"), attention_impl="dense")
ROWS, PROMPT, COMPLETION = 8, 6, 12


def sequences(seed=0):
    rng = np.random.default_rng(seed)
    prompt_len = rng.integers(2, PROMPT + 1, ROWS)
    prompt_mask = np.arange(PROMPT)[None] >= (PROMPT - prompt_len)[:, None]
    completion_len = rng.integers(1, COMPLETION + 1, ROWS)
    completion_len[:2] = (COMPLETION, 0)  # one full, one empty (as a masked truncated completion is)
    completion_mask = np.arange(COMPLETION)[None] < completion_len[:, None]
    prompt_ids = np.where(prompt_mask, rng.integers(1, 64, (ROWS, PROMPT)), 0)
    completion_ids = np.where(completion_mask, rng.integers(1, 64, (ROWS, COMPLETION)), 0)
    return prompt_ids, prompt_mask, completion_ids, completion_mask, rng.normal(size=ROWS).astype(np.float32)


def test_pack_layout():
    prompt_ids, prompt_mask, completion_ids, completion_mask, _ = sequences()
    lengths = prompt_mask.sum(1) + completion_mask.sum(1)
    length = 2 * (PROMPT + COMPLETION)  # room for two sequences a row
    need = packing.rows_needed(lengths, units=4, length=length)
    packed = packing.pack(prompt_ids, prompt_mask, completion_ids, completion_mask, devices=2, micro_batches=2,
                          length=length, rows_per_unit=packing.bucket_rows(need, ROWS // 4))
    assert sorted(packed.order) == list(range(ROWS))
    assert packed.tokens.shape[0] < ROWS  # fewer rows than padding
    per_device = packed.tokens.shape[0] // 2
    for k, seq in enumerate(packed.order):
        row, start = packed.source_row[k], packed.source_start[k]
        p, c = prompt_mask[seq].sum(), completion_mask[seq].sum()
        np.testing.assert_array_equal(packed.tokens[row, start - p:start + c],
                                      np.concatenate([prompt_ids[seq][prompt_mask[seq]], completion_ids[seq, :c]]))
        np.testing.assert_array_equal(packed.positions[row, start - p:start + c], np.arange(p + c))
        assert len(set(packed.segment_ids[row, start - p:start + c])) == 1 and packed.segment_ids[row, start - 1] > 0
        # device and micro-batch of the loss row match those of its packed row (strided, in device blocks)
        assert k // (ROWS // 2) == row // per_device and k % 2 == row % 2
    assert (packed.attention_mask == (packed.segment_ids > 0)).all()
    with pytest.raises(ValueError, match="does not fit"):
        packing.pack(prompt_ids, prompt_mask, completion_ids, completion_mask, devices=1, micro_batches=1, length=8,
                     rows_per_unit=ROWS)


def record_gradients():
    return optax.GradientTransformation(lambda p: jax.tree.map(jnp.zeros_like, p), lambda g, s, p=None: (g, g))


def run(packed: bool, micro: int = 0, mesh=None, config=CONFIG):
    cfg = load_config(None, ["--grpo.num_iterations=2", "--grpo.beta=0.04", "--grpo.loss_type=grpo",
                             "--grpo.epsilon=0.1", f"--data.batch_size={ROWS // 2}",
                             "--rollout.group_size=2", f"--rollout.max_completion_length={COMPLETION}",
                             f"--grpo.micro_batch_size={micro}"])
    optimizer = optax.chain(record_gradients(), optax.sgd(0.1))
    model = Transformer(config, rngs=nnx.Rngs(0))
    params = jax.tree.map(lambda x: x * 3.0, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    state = init_train_state(params, optimizer, jax.random.PRNGKey(0), keep_reference=True)
    shardings = None
    if mesh is not None:
        shardings = sharding.train_state_shardings(
            state, optimizer,
            transformer.param_shardings(transformer.abstract_model(config), mesh, sharding.DEFAULT_RULES), mesh)
        state = jax.device_put(state, shardings)
    logps, update = make_steps(transformer.Decoder(config), optimizer, cfg, shardings)
    prompt_ids, prompt_mask, completion_ids, completion_mask, adv = sequences()
    order = np.arange(ROWS)
    if packed:
        devices = 1 if mesh is None else sharding.data_parallel_size(mesh)
        count = ROWS // micro if micro else 1
        lengths = prompt_mask.sum(1) + completion_mask.sum(1)
        need = packing.rows_needed(lengths, devices * count, PROMPT + COMPLETION)
        rows = packing.pack(prompt_ids, prompt_mask, completion_ids, completion_mask, devices=devices,
                            micro_batches=count, length=PROMPT + COMPLETION,
                            rows_per_unit=packing.bucket_rows(need, ROWS // (devices * count)))
        order = rows.order
        batch = packed_batch(rows, completion_mask[order], adv[order])
    else:
        batch = assemble_batch(prompt_ids, prompt_mask, completion_ids, completion_mask, adv)
    if mesh is not None:
        batch = sharding.shard_rows(batch, mesh)
    batch = logps(state, batch)
    back = np.argsort(order)  # loss rows -> the padded batch's row order
    logp = np.asarray(batch.old_logp)[back] * completion_mask
    rng = np.random.default_rng(3)
    shift = rng.normal(scale=0.3, size=(ROWS, COMPLETION)).astype(np.float32)[order]
    batch = batch._replace(old_logp=batch.old_logp + shift, ref_logp=batch.ref_logp - shift)
    new_state, metrics = update(state, batch)
    return logp, jax.tree.map(np.asarray, new_state.opt_state[0]), {k: float(v) for k, v in metrics.items()}


@pytest.mark.parametrize("micro,mesh_axes", [(0, None), (4, None), (4, (1, 2))], ids=["one-pass", "micro", "mesh"])
def test_packed_update_equals_padded(micro, mesh_axes):
    mesh = None
    if mesh_axes:
        axes = [f"--mesh.data={mesh_axes[0]}", f"--mesh.fsdp={mesh_axes[1]}"]
        mesh = sharding.make_mesh(load_config(None, axes).mesh, jax.devices()[:mesh_axes[0] * mesh_axes[1]])
    logp0, grads0, m0 = run(False)
    logp, grads, m = run(True, micro, mesh)
    np.testing.assert_allclose(logp, logp0, rtol=1e-5, atol=1e-5)
    for (path, g0), g in zip(jax.tree_util.tree_flatten_with_path(grads0)[0], jax.tree.leaves(grads)):
        err, scale = np.linalg.norm(g - g0), np.linalg.norm(g0)
        assert err <= 1e-5 * scale + 1e-7, (jax.tree_util.keystr(path), float(err), float(scale))
    for key in m0:
        assert m[key] == pytest.approx(m0[key], rel=1e-5, abs=1e-7), key
    assert m0["kl"] > 0 and m0["clip_ratio/region"] > 0


def test_blockwise_attention_packed_equals_dense():
    """Packed rows through the blockwise backend (segments inside blocks) give the dense log-probs."""
    blockwise = dataclasses.replace(CONFIG, attention_impl="blockwise", attention_block_q=4, attention_block_kv=4)
    logp_blockwise, *_ = run(True, config=blockwise)
    logp_dense, *_ = run(True)
    np.testing.assert_allclose(logp_blockwise, logp_dense, rtol=1e-5, atol=1e-5)
