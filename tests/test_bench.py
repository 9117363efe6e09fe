"""bench/grpo_step.py end to end on the tiny workload: it runs, and its JSON has the shared schema."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("rollout", "reward", "logps", "update")


def finite_positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_grpo_step_tiny_json(tmp_path):
    out = tmp_path / "out.json"
    # one device, as a user runs it (conftest's 8 fake devices would make a different program)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    p = subprocess.run([sys.executable, "bench/grpo_step.py", "--workload", "tiny", "--steps", "2",
                        "--matmul-gflops", "100", "--json", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["framework"] == "grpo_jax" and doc["matmul_gflops"] == 100
    assert set(doc["versions"]) >= {"jax", "flax"}
    (row,) = doc["results"]
    assert row["workload"] == "tiny" and row["steps"] == 2 and "error" not in row
    assert len(row["step_times_s"]) == 2 and all(finite_positive(t) for t in row["step_times_s"])
    for key in ("first_step_s", "step_s", "floor_s", "over_floor", "peak_rss_mb"):
        assert finite_positive(row[key]), (key, row[key])
    assert set(row["split_s"]) == set(PHASES)
    assert all(finite_positive(row["split_s"][p]) for p in ("rollout", "reward", "update"))
    assert row["split_s"]["logps"] >= 0
    assert finite_positive(row["floor_gflop"]["total"]) and row["floor_gflop"]["reference"] == 0  # beta 0
    assert row["recompiles_after_step2"] == 0  # with 2 steps there is no step after the second
    assert "tiny" in p.stdout and "x floor" in p.stdout  # the table


def test_completion_logprobs_from_hidden_states_match_full_logits():
    """trainer.completion_logprobs unembeds chunk by chunk for the library's decoder (issue 9's memory
    change); values and gradients equal the full-logits path (130 completion tokens: chunks + a tail)."""
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from grpo_jax.models import transformer
    from grpo_jax.trainer import assemble_batch, completion_logprobs

    config = transformer.TransformerConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=2,
                                           num_heads=4, num_kv_heads=2, head_dim=8, tie_word_embeddings=True,
                                           final_logit_softcap=5.0)
    params = nnx.to_pure_dict(nnx.state(transformer.Transformer(config, rngs=nnx.Rngs(0)), nnx.Param))
    rng = np.random.default_rng(0)
    prompt_mask = np.array([[False, True, True], [True, True, True]])
    batch = assemble_batch(rng.integers(0, 50, (2, 3)), prompt_mask, rng.integers(0, 50, (2, 130)),
                           np.ones((2, 130), bool), jnp.zeros(2))
    chunked = transformer.Decoder(config)
    full = lambda *args: transformer.apply(config, *args)  # noqa: E731 - not a partial: the full-logits path

    def total(forward, p):
        return jnp.sum(completion_logprobs(forward, p, batch, 0.7))

    np.testing.assert_allclose(completion_logprobs(chunked, params, batch, 0.7),
                               completion_logprobs(full, params, batch, 0.7), rtol=1e-5, atol=1e-5)
    g_chunked, g_full = (jax.grad(functools.partial(total, f))(params) for f in (chunked, full))
    for a, b in zip(jax.tree.leaves(g_chunked), jax.tree.leaves(g_full)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_update_profile_times_and_breaks_down_the_update(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    p = subprocess.run([sys.executable, "bench/update_profile.py", "--workload", "tiny", "--steps", "1", "--top", "3"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    lines = p.stdout.splitlines()
    assert lines[0].startswith("tiny update step: first ")
    total = float(lines[1].split("(")[1].split(" ms")[0])
    kinds = [float(line.split()[0]) for line in lines[2:]]
    assert total > 0 and len(kinds) == 3 and kinds == sorted(kinds, reverse=True) and kinds[0] <= total


def test_peak_shapes_parse_and_time():
    """bench/peak.py --shapes: MxKxN products timed alone; a malformed shape is a clear error."""
    import argparse

    import pytest

    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import peak
    finally:
        sys.path.remove(str(ROOT / "bench"))
    assert peak.parse_shapes("64x32x16,8X8x8") == [(64, 32, 16), (8, 8, 8)]
    for bad in ("64x32", "64x0x16", "ax2x3"):
        with pytest.raises(argparse.ArgumentTypeError, match="MxKxN"):
            peak.parse_shapes(bad)
    (row,) = peak.matmul_shape_rates([(64, 32, 16)])
    assert row["shape"] == "64x32x16" and finite_positive(row["ms"]) and finite_positive(row["gflops"])
    assert math.isclose(row["gflops"], 2 * 64 * 32 * 16 / (row["ms"] / 1e3) / 1e9)


def test_floor_matmuls_add_up_to_floor_flops():
    """bench/kernel_floor.py times the shapes `common.floor_matmuls` lists; with attention they are the FLOP floor."""
    sys.path.insert(0, str(ROOT))
    try:
        from bench.peers import common
    finally:
        sys.path.remove(str(ROOT))
    for w in common.WORKLOADS.values():
        for old_logps in (False, True):
            plan, flops = common.floor_matmuls(w, old_logps), common.floor_flops(w, old_logps)
            for phase in ("rollout", "update", "reference", "old_logps"):
                matmul = sum(2.0 * m * k * n * c for (m, k, n), c in plan["matmuls"][phase].items())
                assert math.isclose(matmul + plan["attention"][phase], flops[phase], rel_tol=1e-12), (w.name, phase)
    small = common.floor_matmuls(common.WORKLOADS["small"])["matmuls"]
    # decode: each of the 64 rows x 64 tokens x 4 layers goes through gate and up ([64, 256] @ [256, 512])
    assert small["rollout"][(64, 256, 512)] == 64 * 4 * 2
    # the update: forward, input gradient and weight gradient of the lm head over 64 x 96 tokens
    tokens = 64 * 96
    assert small["update"][(tokens, 256, 1024)] == small["update"][(tokens, 1024, 256)] == 1
    assert small["update"][(256, tokens, 1024)] == 1


def test_ab_rollout_runs_two_checkouts_in_turns(tmp_path):
    """bench/ab_rollout.py on this checkout against itself: both sides start, take turns, sample the same tokens."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    p = subprocess.run([sys.executable, "bench/ab_rollout.py", "--base", str(ROOT), "--new", str(ROOT),
                        "--workload", "tiny", "--rounds", "2"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "sampled tokens same" in p.stdout and "paired ratios" in p.stdout
    assert len([ln for ln in p.stdout.splitlines() if "median" in ln and "min" in ln]) == 2
    bad = subprocess.run([sys.executable, "bench/ab_rollout.py", "--base", str(tmp_path)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "not a grpo_jax checkout" in bad.stderr
