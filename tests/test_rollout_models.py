"""The sampler on real decoders: greedy equals transformers' generate; sampled log-probs
equal a full forward's; shared prefill equals the plain path."""


import jax
import numpy as np
import pytest
from flax import nnx
from model_fixtures import PAD, left_padded_batch, make_hf_model, torch_greedy

from grpo_jax.models import transformer
from grpo_jax.models.hf import load_hf
from grpo_jax.rollout import SamplingParams, generate, row_keys
from grpo_jax.trainer import assemble_batch, completion_logprobs


def policy(folder):
    model, config = load_hf(folder)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    decoder = transformer.Decoder(config)
    return params, decoder, decoder.init_cache


@pytest.fixture(scope="module", params=["llama3", "qwen2", "gemma2"])
def family_model(request, tmp_path_factory):
    folder, torch_model = make_hf_model(request.param, tmp_path_factory.mktemp(request.param))
    return (folder, torch_model, *policy(folder))


def test_greedy_equals_transformers_generate_with_rows_stopping_at_different_steps(family_model):
    folder, torch_model, params, forward, init_cache = family_model
    tokens, mask = left_padded_batch((7, 3, 9), seed=1)
    n = 16
    free = torch_greedy(torch_model, tokens, mask, n)
    # a stop token that some row first emits at step k >= 1 (rows stop at different steps, or not at all)
    r0, k0 = next((r, k) for r in range(len(free)) for k in range(1, n) if free[r, k] not in free[r, :k])
    eos = int(free[r0, k0])
    torch_model.generation_config.eos_token_id = eos
    import torch

    with torch.no_grad():
        hf = torch_model.generate(input_ids=torch.tensor(tokens, dtype=torch.long),
                                  attention_mask=torch.tensor(mask, dtype=torch.long), do_sample=False,
                                  max_new_tokens=n, pad_token_id=PAD, eos_token_id=eos)[:, tokens.shape[1]:].numpy()
    sp = SamplingParams(n, temperature=0.0, stop_token_ids=(eos,), pad_token_id=PAD)
    out = generate(forward, init_cache, params, tokens, mask.astype(bool), jax.random.PRNGKey(0), sp, buckets=(16,))
    ours = np.asarray(out.tokens)
    ours_mask = np.asarray(out.mask)
    for row in range(len(tokens)):
        k = int(ours_mask[row].sum())
        np.testing.assert_array_equal(ours[row, :k], hf[row, :k], err_msg=f"row {row}")
        stopped = eos in hf[row]
        assert bool(out.truncated[row]) == (not stopped)
        if stopped:
            assert ours[row, k - 1] == eos and np.all(hf[row, k:] == PAD)
    assert ours_mask[r0].sum() == k0 + 1


@pytest.mark.parametrize("sp", [SamplingParams(12, temperature=0.9, top_k=20, pad_token_id=PAD),
                                SamplingParams(12, temperature=1.2, top_p=0.9, min_p=0.02, pad_token_id=PAD)],
                         ids=["top_k", "top_p_min_p"])
def test_sampled_logprobs_equal_a_full_forward(family_model, sp):
    _, _, params, forward, init_cache = family_model
    tokens, mask = left_padded_batch((5, 8), seed=2)
    G = 3
    out = generate(forward, init_cache, params, tokens, mask.astype(bool), jax.random.PRNGKey(3), sp,
                   group_size=G, buckets=(8,))
    batch = assemble_batch(np.repeat(tokens, G, 0), np.repeat(mask, G, 0).astype(bool), out.tokens, out.mask,
                           np.zeros(len(out.tokens)))
    lp = completion_logprobs(forward, params, batch, sp.temperature)
    m = np.asarray(out.mask)
    np.testing.assert_allclose(np.asarray(lp)[m], np.asarray(out.logprobs)[m], atol=1e-5)


def test_shared_prefill_equals_plain_path_and_same_key_same_output(family_model):
    _, _, params, forward, init_cache = family_model
    tokens, mask = left_padded_batch((6, 2, 8), seed=4)
    sp = SamplingParams(10, temperature=1.0, top_p=0.95, pad_token_id=PAD)
    keys = row_keys(jax.random.PRNGKey(5), 3 * 4)
    run = lambda share: generate(forward, init_cache, params, tokens, mask.astype(bool), keys, sp, group_size=4,
                                 share_prefill=share, buckets=(8,))
    shared, plain, again = run(True), run(False), run(True)
    np.testing.assert_array_equal(shared.tokens, plain.tokens)
    np.testing.assert_array_equal(shared.tokens, again.tokens)
    np.testing.assert_allclose(shared.logprobs, plain.logprobs, atol=1e-5)


def test_rollout_under_a_mesh_shards_and_matches():
    """8 fake devices: params sharded by the logical rules, prompts over data; same tokens as one device."""
    import os
    import subprocess
    import sys
    import textwrap

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = textwrap.dedent(
        """
        import os, sys, tempfile, functools
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
        sys.path[:0] = [%r, %r]
        import jax, numpy as np
        from flax import nnx
        from grpo_jax import sharding
        from grpo_jax.config import MeshConfig
        from grpo_jax.models import transformer
        from grpo_jax.models.hf import load_hf
        from grpo_jax.rollout import SamplingParams, generate
        from model_fixtures import make_hf_model, left_padded_batch
        folder, _ = make_hf_model("qwen2", tempfile.mkdtemp())
        mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
        outs = []
        for shard in (False, True):
            sh = (lambda c, m: transformer.param_shardings(m, mesh, sharding.DEFAULT_RULES)) if shard else None
            model, config = load_hf(folder, shardings=sh)
            params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
            if shard:
                assert len(params["layers"]["wq"].sharding.device_set) == 8, params["layers"]["wq"].sharding
            tokens, mask = left_padded_batch((5, 8, 3, 7), seed=2)
            if shard:
                tokens = jax.device_put(tokens, sharding.batch_sharding(mesh))
                mask = jax.device_put(mask.astype(bool), sharding.batch_sharding(mesh))
            sp = SamplingParams(8, temperature=1.0, top_k=30, pad_token_id=0)
            decoder = transformer.Decoder(config)
            out = generate(decoder, decoder.init_cache, params, np.asarray(tokens), np.asarray(mask).astype(bool),
                           jax.random.PRNGKey(1), sp, group_size=2, buckets=(8,))
            outs.append(np.asarray(out.tokens))
        np.testing.assert_array_equal(outs[0], outs[1])
        print("ok")
        """ % (root, os.path.join(root, "tests"))
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-4000:]
