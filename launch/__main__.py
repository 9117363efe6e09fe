"""`python -m launch <command> [--config FILE] [--section.key=value ...]`.

Each command lives in its own module of this package with `add_arguments(parser)`
and `main(args) -> int`; adding a command is one line in COMMANDS.
Errors meant for users (bad config, bad paths, bad data) print one line and exit
with status 2; Ctrl-C / SIGTERM where there is nothing to save print one line and
exit 128 + the signal number; set GRPO_JAX_DEBUG=1 to see the traceback instead
(and the libraries' own error logs, which otherwise stay quiet).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys

# name -> (module, one-line help)
COMMANDS = {
    "train": ("launch.train", "train a model with GRPO (resumes from the run dir's newest checkpoint)"),
    "sft": ("launch.sft", "supervised fine-tuning on (prompt, completion) pairs (the R1 cold start)"),
    "distill": ("launch.distill", "sample a teacher's completions, keep the ones the rewards accept (JSONL for sft)"),
    "pipeline": ("launch.pipeline", "the R1 recipe's stages (distill, sft, train, eval) in one run dir, resumable"),
    "eval": ("launch.eval", "evaluate a model or a run's checkpoint: pass@1, pass@k, maj@k"),
    "plan": ("launch.plan", "per-device memory of a run on a mesh: compiles the step programs, allocates nothing"),
    "config": ("launch.config_cmd", "print (and optionally save) the resolved run config"),
    "demo": ("launch.demo",
             "the built-in default job: SFT warm start + GRPO on a CPU in minutes, with a before/after table"),
    "convert": ("launch.convert", "convert an HF model folder or a GGUF file into grpo_jax / HF checkpoints"),
    "export": ("launch.export", "export a grpo_jax params checkpoint as an HF model folder"),
    "plot": ("launch.plot", "draw a run's curves (reward, accuracy, KL, clipping, length) as PNGs in its run dir"),
}

USER_ERRORS = (ValueError, OSError, KeyError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        allow_abbrev=False,
        prog="python -m launch",
        description="grpo_jax: GRPO fine-tuning of LLMs in JAX/Flax.",
        epilog="Run `python -m launch COMMAND --help` for a command's flags.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        mod = importlib.import_module(module)
        p = sub.add_parser(
            name,
            help=help_text,
            description=(mod.__doc__ or help_text).strip(),
            formatter_class=argparse.RawDescriptionHelpFormatter,
            allow_abbrev=False,
        )
        mod.add_arguments(p)
        p.set_defaults(_module=mod)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    takes_overrides = getattr(args, "config_overrides", None) is not None
    if extra and not takes_overrides:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if takes_overrides:
        args.config_overrides = extra
    debug = bool(os.environ.get("GRPO_JAX_DEBUG"))
    if not debug:  # Orbax logs each failed write's traceback at ERROR; our one line says it
        logging.getLogger("absl").setLevel(logging.CRITICAL)
    try:
        return int(args._module.main(args) or 0)
    except USER_ERRORS as e:
        if debug:
            raise
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        if debug:
            raise
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"\ninterrupted ({signal.Signals(signum).name}) before there was anything to save", file=sys.stderr)
        return 128 + signum


if __name__ == "__main__":
    sys.exit(main())
