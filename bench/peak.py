"""This machine's measured ceilings: f32 matmul rate and memory bandwidth.

Benchmarks divide their work by these to report a floor (the time the work could
take at best here) and how far above it they run. Run alone to print both:
    python bench/peak.py
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp


def _best_time(fn, *args, repeats: int = 5) -> float:
    jax.block_until_ready(fn(*args))  # compile
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t)
    return best


def matmul_flops_per_s(n: int = 2048, dtype=jnp.float32) -> float:
    """Best-of-5 rate of a jitted [n, n] @ [n, n] product (2 n^3 FLOPs)."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
    return 2 * n**3 / _best_time(jax.jit(jnp.matmul), a, b)


def memory_bytes_per_s(mbytes: int = 512) -> float:
    """Best-of-5 rate of reading a large f32 array once (a reduction; read traffic only)."""
    x = jnp.ones((mbytes * 2**20 // 4,), jnp.float32)
    return x.nbytes / _best_time(jax.jit(jnp.sum), x)


def measure() -> dict:
    return {
        "device": str(jax.devices()[0].device_kind),
        "matmul_f32_gflops": matmul_flops_per_s() / 1e9,
        "memory_read_gbytes_per_s": memory_bytes_per_s() / 1e9,
    }


if __name__ == "__main__":
    print(json.dumps(measure(), indent=2))
