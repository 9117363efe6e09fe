"""Train-step memory of the log-probs: chunked vs full logits, for Qwen2.5-0.5B / 7B shapes at 64 x 1024 tokens.

Nothing runs and no weight is allocated: the planner (grpo_jax.planner) compiles each
program against abstract arrays and reads XLA's buffer assignment. Per device, on
8 fake CPU devices with the mesh fsdp=8, B*G = 64 sequences of 512 prompt + 512
completion tokens, param float32, compute bfloat16, remat dots_saveable (as
configs/qwen2.5-0.5b-gsm8k.yaml), beta 0:

  update step            the whole compiled `trainer.make_steps` update (plan's "update" program)
  current                value_and_grad of the log-probs as `trainer.completion_logprobs` computes them
                         (traced, as in the train step, with activation rows split over the devices)
  naive                  full [R, T, V] logits, one float32 log_softmax over all of them
  hidden_chunked         hidden states, then unembedding + log-softmax 128 positions at a time

(planner.compare_logprob_variants; temp bytes come from the CPU compiler, see planner's caveat.)

    .venv/bin/python bench/memory.py [--presets qwen2.5-0.5b,qwen2.5-7b] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

DEVICES = 8
os.environ["XLA_FLAGS"] = " ".join(
    [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    + [f"--xla_force_host_platform_device_count={DEVICES}"])
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from grpo_jax import planner, sharding  # noqa: E402
from grpo_jax.config import load_config  # noqa: E402
from grpo_jax.models import transformer  # noqa: E402

OVERRIDES = ["--data.batch_size=8", "--rollout.group_size=8", "--rollout.max_prompt_length=512",
             "--rollout.max_completion_length=512", "--rollout.prompt_length_buckets=[512]", "--grpo.beta=0.0",
             "--model.param_dtype=float32", "--model.compute_dtype=bfloat16", "--model.remat=dots_saveable",
             f"--mesh.fsdp={DEVICES}", "--mesh.data=1"]


def measure(preset: str) -> dict:
    cfg = load_config(None, [f"--model.path={preset}", *OVERRIDES])
    model_config, _ = planner.model_config_for(cfg, preset)
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:DEVICES])
    t0 = time.perf_counter()
    progress = lambda msg: print(f"  {preset}: {msg}", file=sys.stderr, flush=True)  # noqa: E731
    report = planner.plan(cfg, model_config, mesh, programs=("update",), progress=progress)
    # the variants traced as the train step traces the model: activation rows split over the devices
    # (without it XLA may follow the fsdp-sharded weights and compute every row on every device)
    with transformer.shard_activations(mesh):
        progress("compiling log-prob variants")
        variants = {k: v["temp"] for k, v in planner.compare_logprob_variants(model_config, cfg, mesh).items()}
    return {"preset": preset, "rows": 64, "tokens": 1024, "devices": DEVICES,
            "update_step_temp": report["programs"]["update"]["temp"],
            "update_step_peak": report["programs"]["update"]["peak"],
            "logprob_temp": variants, "compile_s": round(time.perf_counter() - t0, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="qwen2.5-0.5b,qwen2.5-7b")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    rows = []
    for preset in args.presets.split(","):
        rows.append(measure(preset))
        print(json.dumps(rows[-1]), flush=True)
    gib = planner._gib
    print(f"\nper-device temp bytes, 64 x 1024 tokens, {DEVICES} devices (fsdp), param f32, compute bf16, remat dots")
    print(f"{'model':<14}{'update step':>13}{'current':>12}{'naive':>12}{'hidden-chunked':>16}{'naive/chunked':>15}")
    for r in rows:
        v = r["logprob_temp"]
        print(f"{r['preset']:<14}{gib(r['update_step_temp']):>13}{gib(v['current']):>12}{gib(v['naive']):>12}"
              f"{gib(v['hidden_chunked']):>16}{v['naive'] / v['hidden_chunked']:>14.1f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
