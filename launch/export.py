"""Export a grpo_jax params checkpoint as a Hugging Face model folder.

  python -m launch export --checkpoint DIR --out HFDIR [--dtype bfloat16] [--max-shard-size 2GB]

DIR is a folder written by `python -m launch convert` (params/, model_config.json,
tokenizer/). HFDIR loads with transformers.AutoModelForCausalLM / AutoTokenizer.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", metavar="DIR", required=True, help="converted params checkpoint folder")
    parser.add_argument("--out", metavar="HFDIR", required=True, help="Hugging Face folder to write")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="stored dtype (default: the params' dtype)")
    parser.add_argument("--max-shard-size", default="2GB", help="safetensors shard size (default 2GB)")


def main(args: argparse.Namespace) -> int:
    from grpo_jax.models.hf import export_hf, load_converted

    ckpt = Path(args.checkpoint)
    model, config = load_converted(ckpt)
    tok_dir = ckpt / "tokenizer"
    out = export_hf(model, config, args.out, tokenizer=tok_dir if tok_dir.is_dir() else None,
                    max_shard_size=args.max_shard_size, dtype=args.dtype)
    print(f"wrote Hugging Face folder {out}")
    return 0
