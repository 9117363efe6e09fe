"""Pieces shared by the config-driven commands."""

from __future__ import annotations

import argparse

from grpo_jax.config import Config, describe_fields, load_config


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """--config FILE plus every `--section.key=value` override, listed in --help."""
    parser.add_argument("--config", metavar="FILE",
                        help="YAML run config (see configs/); defaults apply to missing keys")
    parser.set_defaults(config_overrides=[])
    parser.epilog = "config overrides (YAML keys as dotted flags; defaults shown):\n" + describe_fields()


def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.config_overrides)
