"""Evaluate a policy on a held-out split: greedy pass@1, or pass@k / maj@k with --k.

  python -m launch eval --config configs/X.yaml [--run RUN_DIR [--step N | --best]] [--k 8] [--split test]

Without --run it scores the model at model.path (an HF folder / hub id, or a
converted checkpoint); with --run, the policy saved in that training run.
A completion counts as correct when the `accuracy` reward (or --correct-by) is > 0.5.
"""

from __future__ import annotations

import json

from launch.common import add_config_arguments, config_from_args


def add_arguments(parser):
    add_config_arguments(parser)
    parser.add_argument("--run", metavar="RUN_DIR", help="a training run's output dir: evaluate its checkpoint")
    parser.add_argument("--step", type=int, help="which checkpoint of --run (default: the newest)")
    parser.add_argument("--best", action="store_true", help="the best checkpoint of --run by keep_best_metric")
    parser.add_argument("--k", type=int, default=1, help="samples per prompt (1: greedy pass@1)")
    parser.add_argument("--split", help="split to score (default: data.eval_split)")
    parser.add_argument("--max-examples", type=int, help="prompts to score (default: run.eval_max_examples)")
    parser.add_argument("--correct-by", help="reward function that decides correctness (default: accuracy)")
    parser.add_argument("--json", metavar="FILE", help="also write the metrics as JSON")


def main(args) -> int:
    from grpo_jax.checkpoint import checkpoint_params
    from grpo_jax.data import load_dataset
    from grpo_jax.evaluate import evaluate
    from grpo_jax.policy import Policy
    from grpo_jax.rewards import RewardSet

    if args.k < 1:
        raise ValueError("--k must be >= 1")
    cfg = config_from_args(args)
    split = args.split or cfg.data.eval_split
    if not split:
        raise ValueError("no split to evaluate: pass --split or set data.eval_split")
    policy, rewards = Policy.load(cfg), RewardSet.from_config(cfg)
    try:
        source = cfg.model.path
        if args.run:
            params, step = checkpoint_params(args.run, args.step, args.best)
            policy.use_trained(params)  # the whole model, or LoRA adapters over the base
            source = f"{args.run} step {step}"
        dataset = load_dataset(cfg.data, split, cfg.run.seed)
        metrics = evaluate(policy, rewards, dataset, args.max_examples or cfg.run.eval_max_examples, k=args.k,
                           seed=cfg.run.seed, correct_by=args.correct_by)
    finally:
        rewards.close()
    print(f"evaluation of {source} on {cfg.data.source}:{split}")
    for key, value in metrics.items():
        print(f"  {key[5:]:<24} {value:.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": source, "split": split, **metrics}, f, indent=2)
    return 0
