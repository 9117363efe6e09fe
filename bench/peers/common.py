"""What grpo_jax's GRPO-step benchmark and its peers (TRL, tunix) share: workloads, FLOP floor, JSON, table.

Pure Python (no jax, no torch), so each framework's script imports it from its own venv.
Every script prints one JSON document of the same schema:

    {"framework": str, "versions": {pkg: version}, "matmul_gflops": float, "date": str,
     "host": {"cpus": int, "platform": str},
     "results": [{"workload": str, "steps": int, "first_step_s": float, "step_s": float,
                  "split_s": {"rollout": s, "reward": s, "logps": s, "update": s},
                  "step_times_s": [...], "recompiles_after_step2": int | None, "recompile_source": str,
                  "floor_s": float, "over_floor": float, "floor_gflop": {...}, "peak_rss_mb": float,
                  "error": str (only when the workload failed)}]}

step_s is the median of the steps after the first (the first includes compilation).
The split is of those same steps (per-phase medians, so they need not add up exactly).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
from typing import Callable, Optional

DATE = datetime.date.today().isoformat()
PHASES = ("rollout", "reward", "logps", "update")


@dataclasses.dataclass(frozen=True)
class Workload:
    """A GRPO step's shape. All float32, one optimizer step per generation batch, epsilon 0.2,
    temperature 1, no top-k / top-p, every completion forced to `new_tokens` (no stop token)."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    mlp: int
    vocab: int
    prompts: int
    group: int
    prompt_len: int
    new_tokens: int
    beta: float
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    qkv_bias: bool = True  # Qwen2-style attention biases

    @property
    def rows(self) -> int:
        return self.prompts * self.group


WORKLOADS = {
    "tiny": Workload("tiny", hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, mlp=128, vocab=128,
                     prompts=8, group=8, prompt_len=32, new_tokens=32, beta=0.0),
    "small": Workload("small", hidden=256, layers=4, heads=8, kv_heads=4, head_dim=32, mlp=512, vocab=1024,
                      prompts=8, group=8, prompt_len=32, new_tokens=64, beta=0.04),
    # SmolLM2-135M shape (a Llama: no attention biases)
    "smollm2": Workload("smollm2", hidden=576, layers=30, heads=9, kv_heads=3, head_dim=64, mlp=1536, vocab=49152,
                        prompts=4, group=4, prompt_len=64, new_tokens=64, beta=0.0, rope_theta=100_000.0,
                        rms_norm_eps=1e-5, qkv_bias=False),
}
LEARNING_RATE = 1e-5
EPSILON = 0.2
SEED = 0


def select(name: str) -> list[Workload]:
    if name == "all":
        return list(WORKLOADS.values())
    unknown = [n for n in name.split(",") if n not in WORKLOADS]
    if unknown:
        raise SystemExit(f"unknown workload {', '.join(unknown)}; choose from {', '.join(WORKLOADS)} or all")
    return [WORKLOADS[n] for n in name.split(",")]


def random_prompts(w: Workload, seed: int = SEED) -> list[list[int]]:
    """The same prompts for every framework: `prompts` rows of `prompt_len` ids in [1, vocab)."""
    import random

    rng = random.Random(seed)
    return [[rng.randrange(1, w.vocab) for _ in range(w.prompt_len)] for _ in range(w.prompts)]


def even_fraction(ids) -> float:
    """The reward: fraction of even token ids in a completion (cheap, on the host, and it varies)."""
    ids = list(ids)
    return sum(1 for i in ids if int(i) % 2 == 0) / max(len(ids), 1)


def word(i: int) -> str:
    return f"<{i}>"


def word_tokenizer(vocab: int, eos_id: int):
    """A transformers fast tokenizer whose word "<i>" is token id i, for peers that take text prompts.

    Pad is "<0>" and eos is "<eos_id>" (a word "<vocab>" is added when eos_id == vocab, an id the model
    never samples). No special tokens are added when encoding, so "<5> <9>" encodes to [5, 9].
    The brackets keep special words from matching inside others ("<1>" is not in "<109>").
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({word(i): i for i in range(max(vocab, eos_id + 1))}, unk_token=word(0)))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=word(0), eos_token=word(eos_id), unk_token=word(0))
    fast.padding_side = "left"
    return fast


def prompt_texts(w: Workload) -> list[str]:
    return [" ".join(word(i) for i in row) for row in random_prompts(w)]


def ids_of_text(text: str) -> list[int]:
    """The token ids of a decoded word-tokenizer text ("<5> <9>" -> [5, 9])."""
    import re

    return [int(m) for m in re.findall(r"<(\d+)>", text)]


# ---------------------------------------------------------------- the floor


def forward_flops(w: Workload, tokens: int, keys: float) -> float:
    """Matmul FLOPs (2 x MACs) of a forward over `tokens` tokens, each attending `keys` keys on average."""
    proj = w.hidden * w.heads * w.head_dim * 2 + 2 * w.hidden * w.kv_heads * w.head_dim + 3 * w.hidden * w.mlp
    attn = 2 * w.heads * w.head_dim * keys
    return 2.0 * tokens * (w.layers * (proj + attn) + w.hidden * w.vocab)


def floor_flops(w: Workload, old_logps: bool = False) -> dict:
    """Matmul FLOPs of one GRPO step at its least: each prompt prefilled once, each completion token
    decoded once, the update's forward + backward (3 forwards) over prompt + completion, the reference
    forward when beta > 0, and the old-policy forward when asked for. Causal attention: half the keys."""
    P, N, T = w.prompt_len, w.new_tokens, w.prompt_len + w.new_tokens
    prefill = forward_flops(w, w.prompts * P, P / 2)
    decode = sum(forward_flops(w, w.rows, P + t + 1) for t in range(N))
    sequence = forward_flops(w, w.rows * T, T / 2)
    out = {"rollout": prefill + decode, "update": 3 * sequence,
           "reference": sequence if w.beta else 0.0, "old_logps": sequence if old_logps else 0.0}
    out["total"] = sum(out.values())
    return out


def projection_shapes(w: Workload) -> list[tuple[int, int]]:
    """(in, out) of every weight matmul one token goes through: per layer q, k, v, o, gate, up, down; the lm head."""
    q, kv = w.heads * w.head_dim, w.kv_heads * w.head_dim
    layer = [(w.hidden, q), (w.hidden, kv), (w.hidden, kv), (q, w.hidden),
             (w.hidden, w.mlp), (w.hidden, w.mlp), (w.mlp, w.hidden)]
    return layer * w.layers + [(w.hidden, w.vocab)]


def floor_matmuls(w: Workload, old_logps: bool = False) -> dict:
    """The weight matmuls behind `floor_flops`, as {phase: {(M, K, N): count}} for [M, K] @ [K, N] products,
    plus each phase's attention FLOPs ({phase: flops}, under "attention"). The update's backward of each
    forward product [M, K] @ [K, N] is the input gradient [M, N] @ [N, K] and the weight gradient
    [K, M] @ [M, N]. Their FLOPs plus the attention FLOPs add up to `floor_flops`."""
    P, N, T = w.prompt_len, w.new_tokens, w.prompt_len + w.new_tokens

    def attention(tokens: int, keys: float) -> float:
        return 2.0 * tokens * w.layers * 2 * w.heads * w.head_dim * keys

    # several projections share a shape (k and v; gate and up; every layer): count them
    def counted(tokens: int) -> collections.Counter:
        return collections.Counter((tokens, k, n) for k, n in projection_shapes(w))

    sequence = counted(w.rows * T)
    backward = collections.Counter()
    for (m, k, n), c in sequence.items():
        backward[(m, n, k)] += c
        backward[(k, m, n)] += c
    decode = collections.Counter({shape: c * N for shape, c in counted(w.rows).items()})
    shapes = {"rollout": counted(w.prompts * P) + decode, "update": sequence + backward,
              "reference": sequence.copy() if w.beta else collections.Counter(),
              "old_logps": sequence.copy() if old_logps else collections.Counter()}
    seq_attention = attention(w.rows * T, T / 2)
    attn = {"rollout": attention(w.prompts * P, P / 2) + sum(attention(w.rows, P + t + 1) for t in range(N)),
            "update": 3 * seq_attention, "reference": seq_attention if w.beta else 0.0,
            "old_logps": seq_attention if old_logps else 0.0}
    return {"matmuls": shapes, "attention": attn}


# ---------------------------------------------------------------- results


def median(xs) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def summarize(w: Workload, step_times: list[float], splits: list[dict], matmul_gflops: float,
              recompiles: Optional[int], recompile_source: str, old_logps: bool = False) -> dict:
    """One workload's result row from per-step wall times and per-step phase splits (step 1 first)."""
    later = step_times[1:] or step_times
    later_splits = splits[1:] or splits
    flops = floor_flops(w, old_logps)
    floor_s = flops["total"] / (matmul_gflops * 1e9)
    step_s = median(later)
    return {
        "workload": w.name, "steps": len(step_times), "first_step_s": step_times[0], "step_s": step_s,
        "split_s": {p: median([s.get(p, 0.0) for s in later_splits]) for p in PHASES},
        "step_times_s": step_times, "recompiles_after_step2": recompiles, "recompile_source": recompile_source,
        "floor_s": floor_s, "over_floor": step_s / floor_s, "floor_gflop": {k: v / 1e9 for k, v in flops.items()},
        "rows": w.rows, "prompt_len": w.prompt_len, "new_tokens": w.new_tokens, "beta": w.beta,
        "peak_rss_mb": peak_rss_mb(),
    }


def peak_rss_mb() -> float:
    """This process's peak resident memory (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def document(framework: str, versions: dict, matmul_gflops: float, results: list[dict]) -> dict:
    return {"framework": framework, "versions": versions, "matmul_gflops": matmul_gflops, "date": DATE,
            "host": {"cpus": os.cpu_count(), "platform": platform.platform()}, "results": results}


def print_table(doc: dict, out=sys.stdout) -> None:
    print(f"\n{doc['framework']} GRPO step, matmul {doc['matmul_gflops']:.0f} GFLOP/s; "
          f"{', '.join(f'{k} {v}' for k, v in doc['versions'].items())}", file=out)
    head = (f"{'workload':<9}{'step s':>9}{'first s':>9}{'rollout':>9}{'reward':>9}{'logps':>9}{'update':>9}"
            f"{'floor s':>9}{'x floor':>9}{'recomp':>7}{'RSS MB':>8}")
    print(head, file=out)
    for r in doc["results"]:
        if "error" in r:
            print(f"{r['workload']:<9} failed: {r['error']}", file=out)
            continue
        s = r["split_s"]
        rec = "-" if r["recompiles_after_step2"] is None else str(r["recompiles_after_step2"])
        print(f"{r['workload']:<9}{r['step_s']:9.3f}{r['first_step_s']:9.2f}{s['rollout']:9.3f}{s['reward']:9.4f}"
              f"{s['logps']:9.3f}{s['update']:9.3f}{r['floor_s']:9.4f}{r['over_floor']:9.1f}{rec:>7}"
              f"{r['peak_rss_mb']:8.0f}", file=out)


def finite_positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


# ---------------------------------------------------------------- one subprocess per workload


def run_children(script: str, names: list[str], steps: int, matmul_gflops: float, extra: list[str] = (),
                 python: str = sys.executable, timeout: Optional[float] = None) -> list[dict]:
    """Run `script --child W` once per workload, so each one's peak RSS is its own; collect their rows."""
    results = []
    for name in names:
        cmd = [python, script, "--child", name, "--steps", str(steps), "--matmul-gflops", str(matmul_gflops),
               *extra]
        try:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True, timeout=timeout)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                tail = proc.stdout.strip().splitlines()[-1:] or [""]
                results.append({"workload": name, "error": f"exit {proc.returncode}: {tail[0][:300]}"})
            else:
                results.append(json.loads(lines[-1][len("RESULT "):]))
        except subprocess.TimeoutExpired:
            results.append({"workload": name, "error": f"timed out after {timeout} s"})
        print(json.dumps(_rounded(results[-1])), flush=True)
    return results


def emit_child_result(row: dict) -> None:
    print("RESULT " + json.dumps(row), flush=True)


def _rounded(row: dict) -> dict:
    def r(v):
        if isinstance(v, float):
            return round(v, 4)
        if isinstance(v, dict):
            return {k: r(x) for k, x in v.items()}
        if isinstance(v, list):
            return [r(x) for x in v]
        return v

    return r(row)


def add_common_args(ap) -> None:
    ap.add_argument("--workload", default="all", help="tiny | small | smollm2 | all (or a comma list)")
    ap.add_argument("--steps", type=int, default=5, help="GRPO steps per workload (median of steps 2..N)")
    ap.add_argument("--json", default=None, help="write the JSON document here")
    ap.add_argument("--matmul-gflops", type=float, default=None,
                    help="this machine's f32 matmul rate; measured when not given")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per workload subprocess")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: run one workload, print RESULT


def jax_matmul_gflops() -> float:
    """The f32 matmul rate JAX reaches here (bench/peak.py), for the JAX sides' floors (ours and tunix)."""
    from bench.peak import matmul_flops_per_s

    return matmul_flops_per_s() / 1e9


def main_parent(framework: str, versions: dict, script: str, args, measure_gflops: Callable[[], float],
                extra: list[str] = ()) -> int:
    """The top level every script shares: measure the matmul rate, run each workload in a child, print."""
    gflops = args.matmul_gflops or measure_gflops()
    names = [w.name for w in select(args.workload)]
    results = run_children(script, names, args.steps, gflops, extra=extra, timeout=args.timeout)
    doc = document(framework, versions, gflops, results)
    print_table(doc)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
    return 0 if all("error" not in r for r in results) else 1


def cli_main(name: str, doc: str, script: str, run_workload, versions, measure_gflops, argv=None,
             options: dict[str, dict] = None) -> int:
    """The command line every benchmark script shares: a parent that spawns one child per workload.

    options: a script's own flags ({"--flag": argparse kwargs with a default}); the parent passes
    them on to each child, which gives them to run_workload as keyword arguments."""
    options = options or {}
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap)
    for flag, kwargs in options.items():
        ap.add_argument(flag, **kwargs)
    args = ap.parse_args(argv)
    chosen = {flag: getattr(args, flag.lstrip("-").replace("-", "_")) for flag in options}
    if args.child:
        kwargs = {flag.lstrip("-").replace("-", "_"): value for flag, value in chosen.items()}
        emit_child_result(run_workload(WORKLOADS[args.child], args.steps, args.matmul_gflops, **kwargs))
        return 0
    extra = [f"{flag}={value}" for flag, value in chosen.items()]
    return main_parent(name, versions(), script, args, measure_gflops, extra)
