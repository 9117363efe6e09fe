"""Where a run's numbers go: the console, metrics.jsonl, TensorBoard, and PNG plots.

Only the main process (process 0) writes; the others construct a logger that
does nothing, so call sites need no `if process_index == 0`.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Iterable, Optional

from grpo_jax.config import LoggingConfig

# (metric, label, format) shown on the console line, when present
CONSOLE = [
    ("reward/mean", "reward", "{:.3f}"),
    ("eval/accuracy", "eval acc", "{:.3f}"),
    ("loss", "loss", "{:+.4f}"),
    ("kl", "kl", "{:.4f}"),
    ("entropy", "entropy", "{:.3f}"),
    ("clip_ratio/region", "clip", "{:.3f}"),
    ("completion/mean_length", "len", "{:.0f}"),
    ("time/step_s", "s/step", "{:.2f}"),
]


def finite_or_none(value):
    value = float(value)
    return value if math.isfinite(value) else None


class MetricsLogger:
    def __init__(self, run_dir: str | os.PathLike, cfg: LoggingConfig, total_steps: int, is_main: bool = True,
                 run_name: str = "grpo", run_config: Optional[dict] = None, interactive: Optional[bool] = None):
        self.cfg, self.total_steps, self.is_main = cfg, total_steps, is_main
        self.run_dir = Path(run_dir)
        self._jsonl = None
        self._tb = None
        self._wandb = None
        self._bar = None
        self._start = time.time()
        self.rows = {"metrics": 0, "samples": 0}  # rows in metrics.jsonl / samples.jsonl (a checkpoint keeps them)
        if not is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        interactive = sys.stdout.isatty() if interactive is None else interactive
        if cfg.progress_bar and interactive:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, desc="grpo", unit="step", dynamic_ncols=True)
        if cfg.tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                raise ValueError("logging.tensorboard=true needs tensorboardX: pip install tensorboardX") from None
            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        if cfg.wandb:
            try:
                import wandb
            except ImportError:
                raise ValueError("logging.wandb=true needs wandb: pip install wandb") from None
            self._wandb = wandb.init(project=cfg.wandb_project, name=run_name, config=run_config or {},
                                     dir=str(self.run_dir), resume="allow")

    def log_step(self, step: int, metrics: dict, samples: Optional[list] = None) -> None:
        """A training step: on the console every logging.every_steps steps and at the last (with the sample
        rows), in the files always."""
        if step % self.cfg.every_steps == 0 or step == self.total_steps:
            self.log(step, metrics)
            if samples:
                self.log_samples(step, samples)
        else:
            self.log(step, metrics, console=False)

    def log(self, step: int, metrics: dict, console: bool = True) -> None:
        """Write one step's scalars (NaN/inf are written as null in JSONL)."""
        if not self.is_main:
            return
        row = {"step": int(step), "time": round(time.time() - self._start, 3)}
        row.update({k: finite_or_none(v) for k, v in sorted(metrics.items())})
        if self.cfg.jsonl:
            if self._jsonl is None:  # opened at first use, after a resume has truncated the file
                self._jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
            self._jsonl.write(json.dumps(row) + "\n")
            self.rows["metrics"] += 1
        if self._tb:
            for k, v in row.items():
                if v is not None and k != "step":
                    self._tb.add_scalar(k, v, step)
        if self._wandb:
            self._wandb.log({k: v for k, v in row.items() if v is not None and k != "step"}, step=int(step))
        if self._bar is not None:
            self._bar.n = min(int(step), self._bar.total)
            self._bar.set_postfix_str(self.console_line(step, metrics).split(" | ", 1)[-1], refresh=True)
        elif console:
            print(self.console_line(step, metrics), flush=True)

    def console_line(self, step: int, metrics: dict) -> str:
        parts = [f"step {step}/{self.total_steps}"]
        for key, label, fmt in CONSOLE:
            if key in metrics and metrics[key] is not None and math.isfinite(float(metrics[key])):
                parts.append(f"{label} {fmt.format(float(metrics[key]))}")
        return " | ".join(parts)

    def log_samples(self, step: int, rows: Iterable[dict], limit: Optional[int] = None) -> None:
        """A few (prompt, completion, reward) rows, printed and kept in samples.jsonl."""
        if not self.is_main:
            return
        rows = list(rows)[: self.cfg.log_completions if limit is None else limit]
        if not rows:
            return
        with open(self.run_dir / "samples.jsonl", "a") as f:
            for r in rows:
                f.write(json.dumps({"step": step, **r}) + "\n")
        self.rows["samples"] += len(rows)
        for r in rows:
            prompt = " ".join(str(r.get("prompt", "")).split())[-80:]
            completion = " ".join(str(r.get("completion", "")).split())[:160]
            line = f"  [reward {r.get('reward', float('nan')):+.2f}] ...{prompt!s} => {completion!s}"
            if self._bar is not None:
                self._bar.write(line)
            else:
                print(line)

    def cut_back(self, rows: Optional[dict]) -> None:
        """Cut metrics.jsonl and samples.jsonl back to the rows a checkpoint recorded (None: a fresh start, no
        rows), so a resumed run's files hold each step once, as an uninterrupted run's do."""
        if not self.is_main:
            return
        rows = rows or {}
        for name in ("metrics", "samples"):
            self.rows[name] = keep_rows(self.run_dir / f"{name}.jsonl", rows.get(name, 0))

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()
        if self._tb:
            self._tb.close()
        if self._wandb:
            self._wandb.finish()
        if self._bar is not None:
            self._bar.close()


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The rows of a run's metrics.jsonl (a torn last line, from a kill mid-write, is skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    rows = []
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def keep_rows(path: Path, n: int) -> int:
    """Keep the first `n` complete lines of a JSONL file (atomically); returns how many it now has."""
    if not path.exists():
        return 0
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.endswith("\n")][:n]  # a torn last line (a kill mid-write) goes
    if len(kept) != len(lines):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)
    return len(kept)


PLOTS = {
    "reward": ["reward/mean"],
    "reward_per_function": "reward/",
    "eval_accuracy": ["eval/accuracy", "eval/format"],
    "kl": ["kl"],
    "entropy": ["entropy"],
    "clip_ratio": ["clip_ratio/low", "clip_ratio/high", "clip_ratio/region"],
    "completion_length": ["completion/mean_length", "completion/min_length", "completion/max_length"],
}


def running_mean(values, window: int) -> list[float]:
    """Mean of the last `window` values at each point (fewer at the start), so curves keep their length."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_run(run_dir: str | os.PathLike) -> list[Path]:
    """PNG curves of a run's metrics.jsonl into run_dir/plots/; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    if not rows:
        raise ValueError(f"{run_dir}: no metrics.jsonl rows to plot")
    out_dir = Path(run_dir) / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = sorted({k for r in rows for k in r})
    written = []
    for name, wanted in PLOTS.items():
        if isinstance(wanted, str):  # a prefix: one curve per reward function
            series = [k for k in keys if k.startswith(wanted) and k.count("/") == 2 and k.endswith("/mean")]
        else:
            series = [k for k in wanted if k in keys]
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for key in series:
            points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if not points:
                continue
            xs, ys = zip(*points)
            if len(xs) < 30:
                ax.plot(xs, ys, marker="o", markersize=3, label=key)
            else:  # noisy per-step values: faint raw curve under a running mean
                (raw,) = ax.plot(xs, ys, alpha=0.3, linewidth=0.8)
                ax.plot(xs, running_mean(ys, max(2, len(ys) // 20)), color=raw.get_color(), label=key)
        ax.set_xlabel("step")
        ax.set_title(name.replace("_", " "))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
