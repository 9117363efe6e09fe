"""This machine's measured ceilings: f32 matmul rate and memory bandwidth.

Benchmarks divide their work by these to report a floor (the time the work could
take at best here) and how far above it they run. Run alone to print both:
    python bench/peak.py

The floor uses the rate of one large square product. The products inside a step are
smaller and thinner, and XLA:CPU runs them slower; `--shapes` times given ones alone
(M x K x N: an [M, K] @ [K, N] product), which tells how much of a step's distance from
the floor is the matmul kernel at those shapes rather than the code around it:
    python bench/peak.py --shapes 6144x256x512,64x256x512
"""

from __future__ import annotations

import argparse
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


def matmul_shape_rates(shapes: list[tuple[int, int, int]]) -> list[dict]:
    """Best-of-10 time and rate of each jitted [M, K] @ [K, N] float32 product, alone."""
    rows = []
    for m, k, n in shapes:
        a = jax.random.normal(jax.random.PRNGKey(0), (m, k), jnp.float32)
        b = jax.random.normal(jax.random.PRNGKey(1), (k, n), jnp.float32)
        seconds = _best_time(jax.jit(jnp.matmul), a, b, repeats=10)
        rows.append({"shape": f"{m}x{k}x{n}", "ms": seconds * 1e3, "gflops": 2 * m * k * n / seconds / 1e9})
    return rows


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    shapes = []
    for item in filter(None, text.split(",")):
        dims = item.lower().split("x")
        if len(dims) != 3 or not all(d.strip().isdigit() and int(d) > 0 for d in dims):
            raise argparse.ArgumentTypeError(f"shape {item!r} is not MxKxN with positive integers, e.g. 6144x256x512")
        shapes.append(tuple(int(d) for d in dims))
    return shapes


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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", type=parse_shapes, default=[],
                        help="comma list of MxKxN products to time alone, besides the ceilings")
    args = parser.parse_args(argv)
    result = measure()
    if args.shapes:
        result["matmul_shapes"] = matmul_shape_rates(args.shapes)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
