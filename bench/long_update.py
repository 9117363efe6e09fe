"""The `long` workload: the update step on R1-style completion lengths, padded vs packed, dense vs blockwise.

SmolLM2-135M's shape (random weights, float32; `--layers` of its 30), 8 prompts x G=4 = 32 rows,
64-token prompts, completion lengths drawn from a long-tailed log-normal distribution (median 160
tokens, one at the cap) capped at 1,024, the same lengths for every variant. Only the update
step (one AdamW step, beta 0, grpo loss, model.remat=full by default) is timed: rollouts of 1,024
tokens are minutes on a CPU and not what packing changes.

  padded     one sequence per row, [32, 64 + 1024], attention_impl=auto (dense at this length on CPU)
  packed     grpo.pack_sequences: the same sequences end to end in rows of 1,088 tokens
  blockwise  padded, attention_impl=blockwise (flash-style, O(T) memory)

Each (variant, round) runs in its own process, so its peak RSS is its own; rounds interleave the
variants so a machine that drifts lands on all of them.

    .venv/bin/python bench/long_update.py [--rounds 2] [--steps 2] [--layers 8] [--remat full] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ROWS, GROUP, PROMPT, MAX_COMPLETION = 32, 4, 64, 1024
VARIANTS = ("padded", "packed", "blockwise")


def completion_lengths(seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(160), 0.9, ROWS), 16, MAX_COMPLETION).astype(int)
    lengths[0] = MAX_COMPLETION  # the tail: one completion runs to the limit, as some do in R1-style runs
    return lengths


def run_variant(variant: str, steps: int, layers: int, remat: str) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from grpo_jax import packing
    from grpo_jax.config import load_config
    from grpo_jax.models import transformer
    from grpo_jax.optim import make_optimizer
    from grpo_jax.trainer import assemble_batch, init_train_state, make_steps, packed_batch

    config = transformer.TransformerConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=layers,
                                  num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=100_000.0,
                                  tie_word_embeddings=True, max_position_embeddings=4096, remat_policy=remat,
                                  attention_impl="blockwise" if variant == "blockwise" else "auto")
    cfg = load_config(None, [f"--data.batch_size={ROWS // GROUP}", f"--rollout.group_size={GROUP}",
                             f"--rollout.max_completion_length={MAX_COMPLETION}", "--grpo.beta=0",
                             f"--grpo.pack_sequences={str(variant == 'packed').lower()}"])
    model = transformer.Transformer(config, rngs=nnx.Rngs(0))
    optimizer = make_optimizer(cfg.optim, steps)
    state = init_train_state(nnx.to_pure_dict(nnx.state(model, nnx.Param)), optimizer, jax.random.PRNGKey(0), False)
    update = make_steps(transformer.Decoder(config), optimizer, cfg).update

    rng = np.random.default_rng(1)
    lengths = completion_lengths()
    prompt_ids = rng.integers(1, config.vocab_size, (ROWS, PROMPT))
    prompt_mask = np.ones((ROWS, PROMPT), bool)
    completion_mask = np.arange(MAX_COMPLETION)[None] < lengths[:, None]
    completion_ids = np.where(completion_mask, rng.integers(1, config.vocab_size, (ROWS, MAX_COMPLETION)), 0)
    advantages = rng.normal(size=ROWS).astype(np.float32)
    if variant == "packed":
        width = PROMPT + MAX_COMPLETION
        need = packing.rows_needed(PROMPT + lengths, 1, width)
        rows = packing.pack(prompt_ids, prompt_mask, completion_ids, completion_mask, devices=1, micro_batches=1,
                            length=width, rows_per_unit=packing.bucket_rows(need, ROWS))
        batch = packed_batch(rows, completion_mask[rows.order], advantages[rows.order])
    else:
        batch = assemble_batch(prompt_ids, prompt_mask, completion_ids, completion_mask, advantages)
    batch = jax.tree.map(jnp.asarray, batch)

    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = update(state, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
    return {"variant": variant, "update_s": min(times[1:] or times), "first_s": times[0],
            "model_rows": int(batch.tokens.shape[0]), "row_tokens": int(batch.tokens.shape[1]),
            "completion_tokens": int(lengths.sum()), "loss": float(metrics["loss"]),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2, help="updates per process (the first compiles)")
    ap.add_argument("--layers", type=int, default=8, help="decoder layers (SmolLM2-135M has 30)")
    ap.add_argument("--remat", default="full", help="model.remat of every variant (full: what long traces use)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(run_variant(args.child, args.steps, args.layers, args.remat)), flush=True)
        return 0
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variant {', '.join(sorted(unknown))}; choose from {', '.join(VARIANTS)}")
    rows = []
    for r in range(args.rounds):
        for v in variants:
            cmd = [sys.executable, os.path.abspath(__file__), "--child", v, "--steps", str(args.steps),
                   "--layers", str(args.layers), "--remat", args.remat]
            out = subprocess.run(cmd, capture_output=True, text=True)
            line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                raise SystemExit(f"{v} failed: {out.stderr.strip().splitlines()[-1:]}")
            rows.append(dict(json.loads(line[7:]), round=r))
            print(json.dumps(rows[-1]), flush=True)
    summary = {v: {"update_s": statistics.median(x["update_s"] for x in rows if x["variant"] == v),
                   "peak_rss_mb": max(x["peak_rss_mb"] for x in rows if x["variant"] == v)} for v in variants}
    print(f"{'variant':<11}{'update s':>10}{'peak RSS MB':>13}")
    for v, s in summary.items():
        print(f"{v:<11}{s['update_s']:>10.2f}{s['peak_rss_mb']:>13.0f}")
    if "padded" in summary:
        base = summary["padded"]
        for v in summary:
            if v != "padded":
                print(f"{v} / padded: update {summary[v]['update_s'] / base['update_s']:.2f}x, "
                      f"peak RSS {summary[v]['peak_rss_mb'] / base['peak_rss_mb']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"lengths": completion_lengths().tolist(), "layers": args.layers, "remat": args.remat,
                       "rows": rows, "summary": summary}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
