"""Export a trained policy or a converted checkpoint as a Hugging Face model folder.

  python -m launch export --run RUN_DIR [--step N | --best] --out HFDIR [--dtype bfloat16]
  python -m launch export --checkpoint DIR --out HFDIR [--dtype bfloat16] [--max-shard-size 2GB]

RUN_DIR is a training run's output dir (its newest checkpoint, a given step, or the
best by checkpoint.keep_best_metric); DIR is a folder written by `python -m launch
convert` (params/, model_config.json, tokenizer/). HFDIR loads with
transformers.AutoModelForCausalLM / AutoTokenizer.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", metavar="RUN_DIR", help="a training run's output dir")
    source.add_argument("--checkpoint", metavar="DIR", help="converted params checkpoint folder")
    parser.add_argument("--step", type=int, help="which checkpoint of --run (default: the newest)")
    parser.add_argument("--best", action="store_true", help="the best checkpoint of --run by keep_best_metric")
    parser.add_argument("--out", metavar="HFDIR", required=True, help="Hugging Face folder to write")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="stored dtype (default: the params' dtype)")
    parser.add_argument("--max-shard-size", default="2GB", help="safetensors shard size (default 2GB)")


def main(args: argparse.Namespace) -> int:
    from grpo_jax.models.hf import export_hf, load_converted

    if args.run:
        return export_run(args)
    ckpt = Path(args.checkpoint)
    model, config = load_converted(ckpt)
    tok_dir = ckpt / "tokenizer"
    out = export_hf(model, config, args.out, tokenizer=tok_dir if tok_dir.is_dir() else None,
                    max_shard_size=args.max_shard_size, dtype=args.dtype)
    print(f"wrote Hugging Face folder {out}")
    return 0


def export_run(args: argparse.Namespace) -> int:
    from grpo_jax.checkpoint import checkpoint_params
    from grpo_jax.config import load_config
    from grpo_jax.models.hf import export_hf
    from grpo_jax.policy import model_config, model_source

    run = Path(args.run)
    if not (run / "config.yaml").exists():
        raise ValueError(f"{run} has no config.yaml: not a training run directory")
    cfg = load_config(run / "config.yaml")
    params, step = checkpoint_params(run, args.step, args.best)
    tokenizer = cfg.model.tokenizer or model_source(cfg.model.path).default_tokenizer()
    out = export_hf(params, model_config(cfg.model), args.out, tokenizer=tokenizer, max_shard_size=args.max_shard_size,
                    dtype=args.dtype)
    print(f"wrote Hugging Face folder {out} from {run} step {step}")
    return 0
