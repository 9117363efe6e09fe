"""Forward-pass throughput: grpo_jax decoder vs transformers + torch on the same CPU, and the FLOP floor.

Model: SmolLM2-135M shape (hidden 576, 30 layers, 9 heads / 3 kv heads, head_dim 64,
MLP 1536, vocab 49152, tied), random weights, float32; batch 16 x 128 tokens, full
float32 logits out (as the HF model returns them).

The floor is (model matmul FLOPs) / (measured rate of a jitted 2048^3 float32 matmul).

    .venv/bin/python bench/forward.py [--batch 16] [--seq 128] [--iters 5] [--no-torch]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from grpo_jax.models import Transformer, TransformerConfig, forward, positions_from_mask  # noqa: E402

SMOLLM2_135M = TransformerConfig(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3,
    head_dim=64, rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, max_position_embeddings=8192)


def make_ours(cfg, tokens, mask):
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    g, s = nnx.split(model)
    pos = positions_from_mask(mask)
    f = jax.jit(lambda s, t, p, m: forward(g, s, t, p, m)[0])
    t0 = time.perf_counter()
    f(s, tokens, pos, mask).block_until_ready()
    compile_s = time.perf_counter() - t0
    return (lambda: f(s, tokens, pos, mask).block_until_ready()), compile_s


def make_torch(cfg, tokens, mask):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                     num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                     num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rope_theta=cfg.rope_theta,
                     rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=True, max_position_embeddings=8192)
    torch.manual_seed(0)
    model = LlamaForCausalLM(hf).eval()
    ids = torch.tensor(np.asarray(tokens), dtype=torch.long)
    am = torch.tensor(np.asarray(mask), dtype=torch.long)
    pos = torch.tensor(np.asarray(positions_from_mask(mask)), dtype=torch.long)

    def run():
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=am, position_ids=pos, use_cache=False)

    run()  # warm-up
    return run, torch.get_num_threads(), hf._attn_implementation


def make_matmul(n: int = 2048):
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    f = jax.jit(lambda a, b: a @ b)
    f(a, b).block_until_ready()
    return (lambda: f(a, b).block_until_ready()), 2 * n**3


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args(argv)

    cfg = SMOLLM2_135M
    B, T = args.batch, args.seq
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, T)), jnp.int32)
    mask = jnp.ones((B, T), jnp.int32)
    n_tok = B * T

    # Rounds interleave matmul / ours / torch so slow drifts of a shared machine hit all three alike.
    mm, mm_flops = make_matmul()
    ours_fn, compile_s = make_ours(cfg, tokens, mask)
    ours_fn()  # warm-up
    torch_fn = None
    if not args.no_torch:
        import torch
        import transformers

        torch_fn, threads, attn = make_torch(cfg, tokens, mask)
    t_mm, t_ours, t_torch = [], [], []
    for _ in range(args.iters):
        t_mm.append(min(_time(mm) for _ in range(3)))
        t_ours.append(_time(ours_fn))
        if torch_fn is not None:
            t_torch.append(_time(torch_fn))
    rate = mm_flops / statistics.median(t_mm)
    flops = cfg.forward_flops_per_token(T) * n_tok
    floor = flops / rate
    ours = statistics.median(t_ours)
    res = {
        "device": str(jax.devices()[0].device_kind),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "shape": {"batch": B, "seq": T, "params_M": round(cfg.num_params() / 1e6, 1)},
        "rounds": args.iters,
        "matmul_gflops": round(rate / 1e9, 1),
        "model_gflop": round(flops / 1e9, 1),
        "floor_s": round(floor, 4),
        "ours_s": round(ours, 4),
        "ours_times_s": [round(t, 3) for t in t_ours],
        "ours_tok_s": round(n_tok / ours, 1),
        "ours_compile_s": round(compile_s, 2),
        "ours_over_floor": round(ours / floor, 3),
    }
    if torch_fn is not None:
        t_t = statistics.median(t_torch)
        res.update({"torch": torch.__version__, "transformers": transformers.__version__, "torch_threads": threads,
                    "torch_attn": attn, "torch_s": round(t_t, 4), "torch_times_s": [round(t, 3) for t in t_torch],
                    "torch_tok_s": round(n_tok / t_t, 1), "torch_over_ours": round(t_t / ours, 3)})

    print(f"forward, SmolLM2-135M shape, f32, batch {B} x {T} tokens ({res['model_gflop']} GFLOP), "
          f"matmul rate {res['matmul_gflops']} GFLOP/s")
    print(f"{'':24s}{'seconds':>10s}{'tokens/s':>12s}{'x floor':>10s}")
    print(f"{'floor (FLOPs / matmul)':24s}{floor:10.4f}{n_tok / floor:12.1f}{1.0:10.2f}")
    print(f"{'grpo_jax (jit)':24s}{ours:10.4f}{n_tok / ours:12.1f}{ours / floor:10.2f}")
    if "torch_s" in res:
        print(f"{'transformers + torch':24s}{res['torch_s']:10.4f}{res['torch_tok_s']:12.1f}"
              f"{res['torch_s'] / floor:10.2f}")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
