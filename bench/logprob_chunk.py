"""One log-prob chunk of the update, forward + backward under jax.checkpoint, four ways (issue 16).

The trainer unembeds `chunk` positions at a time and takes log softmax at the sampled token; the
`entropy` metric comes out of the same chunk. Variants, timed in turns (median of --rounds):
  logsumexp          log-probs through jax.nn.logsumexp, no entropy (the code before issue 16)
  second_exp         + entropy as lse - sum(exp(x - lse) x): a second pass of exponentials
  logsumexp_reuse    + entropy from exp(x - max) next to jax.nn.logsumexp (left to XLA to share)
  fused              the kept one (objective.token_logprobs): its own log-sum-exp, whose
                     exponentials the entropy reuses

    .venv/bin/python bench/logprob_chunk.py [--rows 16 --chunk 128 --hidden 576 --vocab 49152 --rounds 5]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np


def chunk_fn(variant: str):
    @jax.checkpoint
    def chunk(h, w, targets):
        x = (h @ w).astype(jnp.float32) / 0.7
        picked = jnp.take_along_axis(x, targets[..., None], -1)[..., 0]
        peak = jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True))
        peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
        if variant == "fused":
            e = jnp.exp(x - peak)
            total = jnp.sum(e, -1)
            lse = jnp.log(total) + peak[..., 0]
            return picked - lse, lse - jnp.sum(jnp.where(e > 0, e * x, 0.0), -1) / total
        lse = jax.nn.logsumexp(x, axis=-1)
        if variant == "logsumexp":
            return picked - lse, jnp.zeros_like(lse)
        if variant == "second_exp":
            return picked - lse, lse - jnp.sum(jnp.exp(x - lse[..., None]) * x, -1)
        e = jnp.exp(x - peak)
        return picked - lse, lse - jnp.sum(jnp.where(e > 0, e * x, 0.0), -1) / jnp.sum(e, -1)

    def loss(w, h, targets):
        logp, entropy = chunk(h, w, targets)
        return jnp.sum(logp), jnp.mean(jax.lax.stop_gradient(entropy))

    return jax.jit(jax.value_and_grad(loss, has_aux=True))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    h = jax.random.normal(keys[0], (args.rows, args.chunk, args.hidden))
    w = jax.random.normal(keys[1], (args.hidden, args.vocab)) * 0.05
    targets = jax.random.randint(keys[2], (args.rows, args.chunk), 0, args.vocab)
    fns = {v: chunk_fn(v) for v in ("logsumexp", "second_exp", "logsumexp_reuse", "fused")}
    for fn in fns.values():
        jax.block_until_ready(fn(w, h, targets))
    times = {v: [] for v in fns}
    for _ in range(args.rounds):
        for v, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(w, h, targets))
            times[v].append(time.perf_counter() - t0)
    for v, ts in times.items():
        print(f"{v:<16} {np.median(ts):.3f} s (median of {args.rounds})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
