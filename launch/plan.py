"""Plan a run's memory: per-device bytes of params, optimizer, reference, KV cache and compiled temps.

  python -m launch plan --config configs/demo.yaml --mesh.fsdp=8 --devices 8
  python -m launch plan --config X --model-preset qwen2.5-7b --mesh.fsdp=64 --devices 64 --device-kind v5p
  python -m launch plan --config X --devices 8 --json
  python -m launch plan --config configs/qwen2.5-0.5b-gsm8k.yaml --target sized_for   (every target it names)
  python -m launch plan --config X --model-preset qwen2.5-7b --devices 32 --device-kind v5p \
      --mesh.fsdp=32 --mesh.data=1 --completion-lengths 4096,16384                     (a sweep, one table)

Nothing is allocated: the train state and batches are abstract arrays, and the
rollout, reference log-prob and update programs are compiled (not run) against
them on a mesh of --devices devices. With more devices than this machine has, the
command re-runs itself on that many fake CPU devices (compile times grow with the
model: seconds for tiny models, minutes for 7B on a small CPU).

The model's shape comes from --model-preset, else model.path's config.json (a local
folder), else model.path matched against the built-in presets (HF hub ids of the
preset models work without a download).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from launch.common import add_config_arguments, config_from_args

CHILD_ENV = "GRPO_JAX_PLAN_CHILD"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from grpo_jax.models.presets import PRESETS
    from grpo_jax.planner import DEVICE_MEMORY_GIB

    add_config_arguments(parser)
    parser.add_argument("--devices", type=int, default=None, metavar="N",
                        help="devices in the mesh (default: this machine's); more than it has: N fake CPU devices")
    parser.add_argument("--model-preset", default=None, metavar="NAME",
                        help=f"plan a known model without its files: {', '.join(PRESETS)}")
    parser.add_argument("--device-kind", default=None, metavar="KIND",
                        help=f"target accelerator for the verdict: {', '.join(DEVICE_MEMORY_GIB)} "
                             "(default: this machine's accelerator, else v5e)")
    parser.add_argument("--device-memory-gib", type=float, default=None, metavar="GIB",
                        help="memory per device for the verdict (default: by --device-kind)")
    parser.add_argument("--programs", default="rollout,logps,update", metavar="LIST",
                        help="programs to compile: any of rollout,logps,update, or none (resident bytes only)")
    parser.add_argument("--compare-logprobs", action="store_true",
                        help="also compile the log-prob + backward pass three ways (current, naive full "
                             "log-softmax, hidden-state chunked) and report each one's temp bytes")
    parser.add_argument("--target", default=None, metavar="NAME",
                        help="plan for a named target such as h100x1 or v5e-8 (sets --devices and --device-kind), "
                             "or `sized_for`: every target in the config's run.sized_for, one verdict each")
    parser.add_argument("--completion-lengths", default=None, metavar="N,N,...",
                        help="plan once per rollout.max_completion_length and print one row per length")
    parser.add_argument("--no-micro-batch-search", action="store_true",
                        help="do not search for the largest micro-batch that fits (fewer compiles); "
                             "grpo.micro_batch_size=auto still searches")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def _child_argv(args) -> list[str]:
    argv = []
    if args.config:
        argv += ["--config", args.config]
    for flag in ("devices", "model_preset", "device_kind", "device_memory_gib", "programs", "completion_lengths"):
        value = getattr(args, flag)
        if value is not None:
            argv += [f"--{flag.replace('_', '-')}", str(value)]
    if args.compare_logprobs:
        argv.append("--compare-logprobs")
    if args.no_micro_batch_search:
        argv.append("--no-micro-batch-search")
    if args.json:
        argv.append("--json")
    return argv + list(args.config_overrides)


def _reexec_on_fake_devices(args, n: int) -> int:
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env = dict(os.environ, XLA_FLAGS=" ".join(flags + [f"--xla_force_host_platform_device_count={n}"]),
               JAX_PLATFORMS="cpu", **{CHILD_ENV: "1"})
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if not args.json:
        print(f"(planning on {n} fake CPU devices in a subprocess)", file=sys.stderr, flush=True)
    # `python -m launch.plan`: the same command, independent of launch/__main__.py's command table
    return subprocess.call([sys.executable, "-m", "launch.plan", *_child_argv(args)], env=env)


def main(args) -> int:
    cfg = config_from_args(args)  # config errors first, before any device work
    programs = tuple(p for p in args.programs.split(",") if p and p != "none")
    unknown = set(programs) - {"rollout", "logps", "update"}
    if unknown:
        raise ValueError(f"--programs: unknown {', '.join(sorted(unknown))}; choose from rollout, logps, update, none")
    lengths = _lengths(args.completion_lengths)
    if args.target is not None:
        return _plan_targets(args, cfg)

    import jax

    from grpo_jax import planner, sharding

    devices = jax.devices()
    n = args.devices or len(devices)
    if n < 1:
        raise ValueError("--devices must be >= 1")
    if n > len(devices):
        if os.environ.get(CHILD_ENV):
            raise ValueError(f"asked for {n} fake devices but got {len(devices)}")
        return _reexec_on_fake_devices(args, n)
    devices = devices[:n]
    model_config, source = planner.model_config_for(cfg, args.model_preset)
    mesh = sharding.make_mesh(cfg.mesh, devices)

    kind = args.device_kind
    memory = None if args.device_memory_gib is None else int(args.device_memory_gib * planner.GiB)
    if kind is None and devices[0].platform != "cpu":
        kind = devices[0].device_kind
        memory = memory or planner.device_memory_bytes(devices[0])
    if kind is None:
        kind = "v5e"
    if memory is None:
        key = planner.device_kind_key(kind)
        if key is None:
            raise ValueError(f"unknown --device-kind {kind!r}; known: {', '.join(planner.DEVICE_MEMORY_GIB)} "
                             "(or give --device-memory-gib)")
        memory = planner.DEVICE_MEMORY_GIB[key] * planner.GiB

    progress = (lambda _: None) if args.json else (lambda msg: print(f"... {msg}", file=sys.stderr, flush=True))
    reports = []
    for length in lengths or [None]:
        run_cfg = cfg if length is None else planner.with_completion_length(cfg, length)
        if length is not None:
            progress(f"completion length {length}")
        report = planner.plan(run_cfg, model_config, mesh, programs=programs, device_memory=memory, device_kind=kind,
                              compare_logprobs=args.compare_logprobs,
                              search_micro_batch=not args.no_micro_batch_search and not lengths, progress=progress)
        report["model_source"] = source
        reports.append(report)
    if args.json:
        print(planner.to_json(reports if lengths else reports[0]))
    elif lengths:
        print(planner.format_sweep(reports))
    else:
        print(planner.format_report(reports[0]))
    return 0


def _lengths(text):
    if text is None:
        return None
    try:
        lengths = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--completion-lengths {text!r}: expected numbers separated by commas") from None
    if not lengths or min(lengths) < 1:
        raise ValueError("--completion-lengths needs at least one positive length")
    return lengths


def _plan_targets(args, cfg) -> int:
    """--target: each named target in its own `plan` process (its own fake device count); one verdict line each."""
    from grpo_jax import planner

    names = list(cfg.run.sized_for) if args.target == "sized_for" else [args.target]
    if not names:
        raise ValueError("--target sized_for: the config names no targets in run.sized_for")
    targets = [planner.parse_target(name) for name in names]
    worst = 0
    for target in targets:
        child = argparse.Namespace(**{**vars(args), "target": None, "devices": target.devices,
                                      "device_kind": target.kind})
        if not args.json:
            print(f"== target {target.name}: {target.devices} x {target.kind}", flush=True)
        code = _reexec_on_fake_devices(child, target.devices)
        worst = max(worst, code)
    return worst


def _standalone(argv=None) -> int:
    """`python -m launch.plan ...` (what the fake-device subprocess runs); same flags and errors as `launch plan`."""
    parser = argparse.ArgumentParser(prog="python -m launch plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    add_arguments(parser)
    args, extra = parser.parse_known_args(argv)
    args.config_overrides = extra
    try:
        return int(main(args) or 0)
    except (ValueError, OSError, KeyError) as e:
        if os.environ.get("GRPO_JAX_DEBUG"):
            raise
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(_standalone())
