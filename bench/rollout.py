"""Rollout throughput: grpo_jax's sampler vs transformers `generate`, side by side, and the floor.

Model: SmolLM2-135M shape (hidden 576, 30 layers, 9 / 3 heads, head_dim 64, MLP 1536,
vocab 49152, tied), random weights, float32. Prompts of 64 tokens, N = 128 new tokens
forced (no stop token), temperature 1 with top-k 50 for both. Two cases: B*G = 16 rows
(4 prompts x 4 samples) and 64 rows (8 x 8); transformers gets the prompts repeated G
times, as TRL feeds it.

Floor of a case = max(FLOPs / measured matmul rate, bytes read / measured bandwidth),
where the bytes are the weights plus the KV cache read at each decode step.

    .venv/bin/python bench/rollout.py [--rounds 2] [--cases 16,64] [--no-torch] [--json out.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from bench.peak import matmul_flops_per_s, memory_bytes_per_s  # noqa: E402
from grpo_jax.models import transformer  # noqa: E402
from grpo_jax.rollout import SamplingParams, generate  # noqa: E402

SMOLLM2 = transformer.TransformerConfig(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3,
    head_dim=64, rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, max_position_embeddings=8192)
PROMPT, NEW, TOP_K = 64, 128, 50
CASES = {16: (4, 4), 64: (8, 8)}


def floor_seconds(cfg: transformer.TransformerConfig, prompts: int, group: int, flops_per_s: float, bytes_per_s: float):
    """(compute floor, bandwidth floor) of prefilling `prompts` once and decoding NEW tokens for prompts*group rows."""
    D, F, H, K, Dh, V, L = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                            cfg.vocab_size, cfg.num_layers)
    proj = D * H * Dh * 2 + 2 * D * K * Dh + 3 * D * F
    rows = prompts * group
    prefill = prompts * PROMPT * 2 * (L * (proj + H * Dh * PROMPT) + D * V)
    decode = sum(rows * 2 * (L * (proj + 2 * H * Dh * (PROMPT + t)) + D * V) for t in range(NEW))
    weight_bytes = 4 * cfg.num_params()
    kv_bytes = sum(4 * 2 * L * rows * (PROMPT + t) * K * Dh for t in range(NEW))
    return (prefill + decode) / flops_per_s, (NEW * weight_bytes + kv_bytes) / bytes_per_s


def prompts_for(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(10, SMOLLM2.vocab_size, (n, PROMPT)).astype(np.int32)


def make_ours(prompts: np.ndarray, group: int):
    model = transformer.Transformer(SMOLLM2, rngs=nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    forward = functools.partial(transformer.apply, SMOLLM2)
    init_cache = functools.partial(transformer.init_cache, SMOLLM2)
    sp = SamplingParams(NEW, temperature=1.0, top_k=TOP_K, pad_token_id=0)
    mask = np.ones(prompts.shape, bool)

    def run(seed):
        out = generate(forward, init_cache, params, prompts, mask, jax.random.PRNGKey(seed), sp, group_size=group,
                       buckets=(PROMPT,))
        jax.block_until_ready(out)
        assert int(out.num_tokens) == prompts.shape[0] * group * NEW
        return out

    return run


def make_torch(prompts: np.ndarray, group: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    c = SMOLLM2
    hf = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                     num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                     num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim, rope_theta=c.rope_theta,
                     rms_norm_eps=c.rms_norm_eps, tie_word_embeddings=True, max_position_embeddings=8192,
                     pad_token_id=0, eos_token_id=None, bos_token_id=None)
    torch.manual_seed(0)
    model = LlamaForCausalLM(hf).eval()
    ids = torch.tensor(np.repeat(prompts, group, axis=0), dtype=torch.long)

    def run(seed):
        torch.manual_seed(seed)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                                 top_k=TOP_K, top_p=1.0, max_new_tokens=NEW, min_new_tokens=NEW, pad_token_id=0)
        assert out.shape[1] == PROMPT + NEW
        return out

    return run


def timed(fn, seed) -> float:
    t = time.perf_counter()
    fn(seed)
    return time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--cases", default="16,64")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    flops_per_s, bytes_per_s = matmul_flops_per_s(), memory_bytes_per_s()
    results = []
    for rows in (int(x) for x in args.cases.split(",")):
        prompts_n, group = CASES[rows]
        prompts = prompts_for(prompts_n)
        ours = make_ours(prompts, group)
        t0 = time.perf_counter()
        ours(0)
        compile_s = time.perf_counter() - t0
        theirs = None if args.no_torch else make_torch(prompts, group)
        ours_t, torch_t = [], []
        for r in range(args.rounds):  # interleaved, so drifts of a shared machine hit both
            ours_t.append(timed(ours, r + 1))
            if theirs:
                torch_t.append(timed(theirs, r + 1))
        compute_floor, bandwidth_floor = floor_seconds(SMOLLM2, prompts_n, group, flops_per_s, bytes_per_s)
        floor = max(compute_floor, bandwidth_floor)
        tokens = rows * NEW
        res = {"rows": rows, "prompts": prompts_n, "group": group, "new_tokens": NEW,
               "ours_s": min(ours_t), "ours_tokens_per_s": tokens / min(ours_t), "ours_compile_s": compile_s,
               "compute_floor_s": compute_floor, "bandwidth_floor_s": bandwidth_floor, "floor_s": floor,
               "ours_over_floor": min(ours_t) / floor}
        if torch_t:
            res.update(torch_s=min(torch_t), torch_tokens_per_s=tokens / min(torch_t),
                       torch_over_ours=min(torch_t) / min(ours_t))
        results.append(res)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in res.items()}), flush=True)
    print(f"\nrollout, SmolLM2-135M shape, f32, prompt {PROMPT}, {NEW} new tokens forced; "
          f"matmul {flops_per_s / 1e9:.0f} GFLOP/s, memory {bytes_per_s / 1e9:.1f} GB/s, "
          f"{jax.devices()[0].device_kind}")
    print(f"{'rows':>5} {'floor s':>8} {'ours s':>8} {'ours tok/s':>11} {'x floor':>8} {'torch s':>8} "
          f"{'torch tok/s':>12} {'torch/ours':>10}")
    for r in results:
        print(f"{r['rows']:>5} {r['floor_s']:8.2f} {r['ours_s']:8.2f} {r['ours_tokens_per_s']:11.1f} "
              f"{r['ours_over_floor']:8.2f} {r.get('torch_s', float('nan')):8.2f} "
              f"{r.get('torch_tokens_per_s', float('nan')):12.1f} {r.get('torch_over_ours', float('nan')):10.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"flops_per_s": flops_per_s, "bytes_per_s": bytes_per_s, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
