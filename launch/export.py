"""Export a trained policy or a converted checkpoint as a Hugging Face model folder.

  python -m launch export --run RUN_DIR [--step N | --best] --out HFDIR [--dtype bfloat16]
  python -m launch export --run LORA_RUN_DIR [--lora-format peft | --merge] --out DIR
  python -m launch export --run PPO_RUN_DIR --critic --out HFDIR
  python -m launch export --checkpoint DIR --out HFDIR [--dtype bfloat16] [--max-shard-size 2GB]

RUN_DIR is a training run's output dir (its newest checkpoint, a given step, or the
best by checkpoint.keep_best_metric); DIR is a folder written by `python -m launch
convert` (params/, model_config.json, tokenizer/). HFDIR loads with
transformers.AutoModelForCausalLM / AutoTokenizer. A LoRA run (model.lora_rank > 0)
writes its adapters as a PEFT folder (the default, `--lora-format peft`: loads with
peft.PeftModel.from_pretrained onto the base), or with `--merge` base + adapters summed
as a whole HF folder. `--critic` writes a PPO run's critic instead, as an HF
*ForSequenceClassification folder with one label (transformers' AutoModelForSequenceClassification,
TRL's value model; `ppo.critic_path` starts a critic from one).
"""

from __future__ import annotations

import argparse
import dataclasses
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
    parser.add_argument("--lora-format", choices=["peft", "merged"], default=None,
                        help="a LoRA run: its adapters as a PEFT folder (default), or merged into a whole HF folder")
    parser.add_argument("--merge", action="store_true", help="a LoRA run: write base + adapters merged (= "
                        "--lora-format merged)")
    parser.add_argument("--critic", action="store_true", help="a PPO run: write its critic (value model) instead "
                        "of the policy")


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
    import jax

    from grpo_jax.checkpoint import checkpoint_params
    from grpo_jax.config import MeshConfig, load_config
    from grpo_jax.models.hf import export_hf
    from grpo_jax.models.lora import LoraSpec
    from grpo_jax.models.peft import save_peft
    from grpo_jax.policy import Policy, model_config, model_source

    run = Path(args.run)
    if not (run / "config.yaml").exists():
        raise ValueError(f"{run} has no config.yaml: not a training run directory")
    cfg = load_config(run / "config.yaml")
    fmt = "merged" if args.merge else args.lora_format
    if fmt is not None and not cfg.model.lora_rank:
        raise ValueError(f"--lora-format / --merge: {run} trained the whole model (model.lora_rank=0), not LoRA "
                         "adapters; export it without them")
    tokenizer = cfg.model.tokenizer or model_source(cfg.model.path).default_tokenizer()
    if args.critic:
        return export_critic(args, cfg, tokenizer)
    params, step = checkpoint_params(run, args.step, args.best)
    if cfg.model.lora_rank and fmt != "merged":
        out = save_peft(args.out, params, LoraSpec.from_config(cfg.model), model_config(cfg.model),
                        base_model=cfg.model.path)
        print(f"wrote PEFT adapter folder {out} from {run} step {step} (base: {cfg.model.path})")
        return 0
    if cfg.model.lora_rank:
        # the base on this machine's devices (the run's mesh may span hosts), plus the adapters
        params = jax.device_get(Policy.load(dataclasses.replace(cfg, mesh=MeshConfig())).merged(params))
    out = export_hf(params, model_config(cfg.model), args.out, tokenizer=tokenizer, max_shard_size=args.max_shard_size,
                    dtype=args.dtype)
    print(f"wrote Hugging Face folder {out} from {run} step {step}")
    return 0


def export_critic(args: argparse.Namespace, cfg, tokenizer) -> int:
    from grpo_jax.checkpoint import checkpoint_params
    from grpo_jax.critic import critic_config
    from grpo_jax.models.hf import export_hf
    from grpo_jax.policy import model_config

    if cfg.run.algorithm != "ppo":
        raise ValueError(f"--critic: {args.run} ran run.algorithm={cfg.run.algorithm}, which trains no critic")
    critic, step = checkpoint_params(args.run, args.step, args.best, part="critic_params")
    source = cfg.model if cfg.ppo.critic_path is None else dataclasses.replace(cfg.model, path=cfg.ppo.critic_path)
    out = export_hf(critic["decoder"], critic_config(model_config(source)), args.out, tokenizer=tokenizer,
                    max_shard_size=args.max_shard_size, dtype=args.dtype, value_head=critic["score"])
    print(f"wrote the critic of {args.run} step {step} as a Hugging Face value model (ForSequenceClassification) "
          f"{out}")
    return 0
