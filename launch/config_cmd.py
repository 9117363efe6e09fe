"""Print the run config resolved from defaults, a YAML file and dotted overrides.

Example: python -m launch config --config configs/demo.yaml --grpo.beta=0.04 --save
A config that would not run is rejected here with the same one-line error
`train` would give, so this is also a cheap way to check a config.
"""

from __future__ import annotations

from grpo_jax.config import announce_config
from launch.common import add_config_arguments, config_from_args


def add_arguments(parser):
    add_config_arguments(parser)
    parser.add_argument("--save", action="store_true", help="also write config.yaml into run.output_dir")


def main(args) -> int:
    cfg = config_from_args(args)
    announce_config(cfg, save=args.save)
    return 0
