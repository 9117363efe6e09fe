"""The R1 recipe as one command: stages (distill, sft, train, eval) in order, each one's model feeding the next.

    python -m launch pipeline --config C

`pipeline.stages` lists the stages; each is `{kind, name?, overrides?}`, its config the file's
config with the chain's settings (below) and then its own overrides on top. All of them are
planned and validated before the first runs. Under run.output_dir:

    config.yaml            the pipeline's config
    stage-1-distill/       distill.jsonl (a teacher's kept completions), config.yaml, stage.json
    stage-2-sft/           model/ (a converted checkpoint), metrics.jsonl, stage.json
    stage-3-train/         a GRPO run dir (checkpoints, metrics, plots), model/ (its final policy), stage.json
    stage-4-eval/          eval.json, stage.json
    results.md             the before/after table across stages; plots/stages.png, the same as a figure

The chain: each stage's model.path is the previous sft / train stage's model/ (the config's
model.path for the first); an sft stage after a distill stage trains on its corpus
(data.source=jsonl, data.path=<corpus>, data.prompt_column=prompt, sft.completion_template=
"{completion}"); its overrides win over both. A stage is finished once its stage.json is written.
Re-running the command skips finished stages (refusing if their settings changed) and resumes at
the first unfinished one: distill continues its corpus, train its newest checkpoint; sft and eval
start over. A stop signal during train or distill saves, and the pipeline stops there.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import jax

from grpo_jax.checkpoint import checkpoint_params
from grpo_jax.config import (
    Config,
    ConfigError,
    all_keys,
    apply_overrides,
    identity_changes,
    is_resumable,
    load_config,
    save_config,
)
from grpo_jax.data import load_dataset
from grpo_jax.distill import CORPUS_FILE, run_distill
from grpo_jax.distill import IDENTITY as DISTILL_IDENTITY
from grpo_jax.evaluate import evaluate_over_processes
from grpo_jax.models.hf import save_converted
from grpo_jax.policy import Policy, model_config, model_source
from grpo_jax.rewards import RewardSet
from grpo_jax.run_dir import CONFIG_FILE, RunLock, write_json
from grpo_jax.sft import run_sft

KINDS = ("distill", "sft", "train", "eval")
STAGE_KEYS = ("kind", "name", "overrides")
STAGE_FILE = "stage.json"
RESULTS_FILE = "results.md"
# Per kind, the settings a finished stage was made with: a re-run with one changed refuses.
_TRAINING = tuple(k for k in all_keys() if not is_resumable(k)) + ("run.steps",)
STAGE_IDENTITY = {
    "distill": DISTILL_IDENTITY,
    "sft": ("model.path", "model.tokenizer", "model.param_dtype", "data.", "rollout.max_prompt_length",
            "rollout.prompt_length_buckets", "optim.", "sft.", "run.seed"),
    "train": _TRAINING,
    "eval": ("model.path", "model.tokenizer", "model.param_dtype", "model.compute_dtype", "data.", "rollout.",
             "rewards.functions", "rewards.weights", "run.eval_max_examples", "run.seed"),
}
TABLE_SKIP = ("eval/examples", "eval/time_s")


class Stage(NamedTuple):
    number: int  # 1-based
    kind: str
    name: str
    dir: Path
    cfg: Config
    model_in: str  # label of the model the stage starts from ("base", "after 2-sft", ...)
    model_out: Optional[str]  # label of the model it writes (sft, train), else None


def stage_spec(raw, number: int) -> dict:
    where = f"pipeline.stages[{number - 1}]"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping with kind (one of {', '.join(KINDS)}), got {raw!r}")
    unknown = [k for k in raw if k not in STAGE_KEYS]
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (a stage has {', '.join(STAGE_KEYS)})")
    kind = raw.get("kind")
    if kind not in KINDS:
        raise ConfigError(f"{where}: kind={kind!r} must be one of {', '.join(KINDS)}")
    return {"kind": kind, "name": str(raw.get("name") or kind), "overrides": raw.get("overrides") or {}}


def plan(cfg: Config) -> list[Stage]:
    """Every stage with its config, validated; nothing runs and nothing is written."""
    if not cfg.pipeline.stages:
        raise ConfigError("pipeline.stages is empty: list the stages, e.g. [{kind: distill}, {kind: sft}, "
                          "{kind: train}, {kind: eval}]")
    root = Path(cfg.run.output_dir)
    model, tokenizer, label, corpus = cfg.model.path, cfg.model.tokenizer, "base", None
    stages = []
    for number, raw in enumerate(cfg.pipeline.stages, 1):
        spec = stage_spec(raw, number)
        kind, folder = spec["kind"], root / f"stage-{number}-{_slug(spec['name'])}"
        chained = dataclasses.replace(
            cfg, pipeline=dataclasses.replace(cfg.pipeline, stages=()),
            model=dataclasses.replace(cfg.model, path=model, tokenizer=tokenizer),
            run=dataclasses.replace(cfg.run, output_dir=str(folder), name=f"{cfg.run.name}-{spec['name']}"))
        if kind == "sft" and corpus is not None:
            chained = dataclasses.replace(
                chained, data=dataclasses.replace(chained.data, source="jsonl", path=str(corpus),
                                                  prompt_column="prompt", answer_column="answer"),
                sft=dataclasses.replace(chained.sft, completion_template="{completion}"))
        stage_cfg = apply_overrides(chained, spec["overrides"], f"pipeline.stages[{number - 1}] ({kind})")
        out_label = f"after {number}-{spec['name']}" if kind in ("sft", "train") else None
        stages.append(Stage(number, kind, spec["name"], folder, stage_cfg, label, out_label))
        if kind == "distill":
            corpus = folder / CORPUS_FILE
        elif kind in ("sft", "train"):
            model, tokenizer, label = str(folder / "model"), None, out_label
    return stages


def check_finished(stages: list[Stage]) -> list[Stage]:
    """The finished stages; one whose settings changed since refuses (nothing is touched)."""
    finished = []
    for s in stages:
        if not (s.dir / STAGE_FILE).exists():
            continue
        saved = load_config(s.dir / CONFIG_FILE)
        changes = identity_changes(saved, s.cfg, STAGE_IDENTITY[s.kind])
        if changes:
            raise ConfigError(f"stage {s.number} ({s.name}) finished in {s.dir} with other settings: "
                              f"{'; '.join(changes)}. Nothing was touched: delete {s.dir} (and the stages after "
                              "it) to redo it, or give the pipeline another run.output_dir")
        finished.append(s)
    return finished


def run_pipeline(cfg: Config, train: Callable[..., dict]) -> dict:
    """Run the stages not finished yet; returns {"stages": [...records], "table": str} or {"stopped_in": n}.

    train: the GRPO run, `grpo_jax.loop.train`, passed in by the caller (the CLI): library modules do
    not import the training run they are part of (tests/tools/import_graph.py)."""
    runners = dict(RUNNERS, train=functools.partial(run_train_stage, train=train))
    stages = plan(cfg)
    root = Path(cfg.run.output_dir)
    lock = RunLock(root)
    note = lock.acquire()
    if note:
        print(note, flush=True)
    try:
        done = {s.number for s in check_finished(stages)}
        save_config(cfg, root)
        t0 = time.perf_counter()
        for s in stages:
            if s.number in done:
                print(f"[stage {s.number}/{len(stages)}] {s.name}: finished earlier ({s.dir})", flush=True)
                continue
            print(f"\n[stage {s.number}/{len(stages)}] {s.name} ({s.kind}) -> {s.dir}", flush=True)
            started = time.perf_counter()
            record = runners[s.kind](s)
            if record is None:
                print(f"\npipeline stopped in stage {s.number} ({s.name}); re-run the same command to continue",
                      flush=True)
                return {"stopped_in": s.number}
            record.update(kind=s.kind, name=s.name, wall_s=round(time.perf_counter() - started, 1))
            write_json(s.dir / STAGE_FILE, record)
        records = [json.loads((s.dir / STAGE_FILE).read_text()) for s in stages]
        table = results_table(stages, records)
        (root / RESULTS_FILE).write_text(table + "\n")
        print("\n" + table, flush=True)
        figure = plot_stages(stages, records, root / "plots" / "stages.png") if jax.process_index() == 0 else None
        if figure:
            print(f"plot: {figure}", flush=True)
        print(f"\npipeline wall time {time.perf_counter() - t0:.0f} s this invocation; table in {root / RESULTS_FILE}",
              flush=True)
        return {"stages": records, "table": table}
    finally:
        lock.release()


# ---------------------------------------------------------------- the stages


def run_distill_stage(s: Stage) -> Optional[dict]:
    summary = run_distill(s.cfg, s.dir)
    if not summary.complete:
        return None
    if summary.kept == 0:
        d = s.cfg.distill
        raise ConfigError(f"stage {s.number} ({s.name}) kept no completion: none of {summary.completions} reached "
                          f"distill.min_reward={d.min_reward:g}; sample more (distill.samples_per_prompt, "
                          "rollout.temperature), lower the bar, or use a stronger distill.teacher "
                          f"(delete {s.dir} to redo it)")
    return {"corpus": str(summary.corpus), "prompts": summary.prompts, "completions": summary.completions,
            "kept": summary.kept, "prompts_kept": summary.prompts_kept, "evaluations": []}


def run_sft_stage(s: Stage) -> Optional[dict]:
    model_dir = run_sft(s.cfg, s.dir)
    return {"model": str(model_dir), "evaluations": []}


def run_train_stage(s: Stage, train: Callable[..., dict]) -> Optional[dict]:
    summary = train(s.cfg, show_config=False)
    if "stopped_at" in summary:
        return None
    params, step = checkpoint_params(s.dir)
    m = s.cfg.model
    if m.lora_rank:  # the next stage starts from base + adapters, summed
        params = Policy.load(s.cfg).merged(params)
    model_dir = save_converted(s.dir / "model", params, model_config(m),
                               tokenizer_src=m.tokenizer or model_source(m.path).default_tokenizer())
    before, after = train_evaluations(s.dir, s.cfg.run.steps)
    evaluations = [e for e in ({"model": s.model_in, "metrics": before}, {"model": s.model_out, "metrics": after})
                   if e["metrics"]]
    return {"model": str(model_dir), "step": step, "evaluations": evaluations}


def run_eval_stage(s: Stage) -> Optional[dict]:
    cfg = s.cfg
    if not cfg.data.eval_split:
        raise ConfigError(f"stage {s.number} ({s.name}): eval needs data.eval_split")
    save_config(cfg, s.dir)
    policy, rewards = Policy.load(cfg), RewardSet.from_config(cfg)
    try:
        dataset = load_dataset(cfg.data, cfg.data.eval_split, cfg.run.seed)
        metrics = evaluate_over_processes(policy, rewards, dataset, cfg.run.eval_max_examples, seed=cfg.run.seed)
    finally:
        rewards.close()
    if jax.process_index() == 0:
        write_json(s.dir / "eval.json", {"model": cfg.model.path, "label": s.model_in, **metrics})
    print("  " + "  ".join(f"{k[5:]} {v:.3f}" for k, v in metrics.items() if k not in TABLE_SKIP), flush=True)
    return {"evaluations": [{"model": s.model_in, "metrics": metrics}]}


RUNNERS = {"distill": run_distill_stage, "sft": run_sft_stage, "eval": run_eval_stage}  # train: run_pipeline's


def train_evaluations(run_dir: Path, steps: int) -> tuple[dict, dict]:
    """The held-out evaluations of a GRPO run dir before its first step and after its last (metrics.jsonl)."""
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    evals = [r for r in rows if any(k.startswith("eval/pass@") for k in r)]
    pick = lambda step: next(({k: v for k, v in r.items() if k.startswith("eval/")}  # noqa: E731
                              for r in reversed(evals) if r["step"] == step), {})
    return pick(0), pick(steps)


# ---------------------------------------------------------------- the table


def evaluations_by_model(stages: list[Stage], records: list[dict]) -> dict[str, tuple[str, dict]]:
    """model label -> (where it was measured, its held-out metrics), in stage order; an eval stage's
    numbers win over a train run's own evaluation of the same model."""
    rows: dict[str, tuple[str, dict]] = {}
    for s, record in zip(stages, records):
        for e in record.get("evaluations", []):
            if e["model"] not in rows or s.kind == "eval":
                rows[e["model"]] = (f"stage {s.number} ({s.name})", e["metrics"])
    return rows


def results_table(stages: list[Stage], records: list[dict]) -> str:
    """One row per model evaluated, a column per metric, and each stage's wall time."""
    rows = evaluations_by_model(stages, records)
    if not rows:
        return "no stage evaluated a model (add an eval stage, or data.eval_split for the train stages)"
    keys = [k for k in dict.fromkeys(k for _, m in rows.values() for k in m) if k not in TABLE_SKIP]
    keys.sort(key=lambda k: (not k.startswith("eval/pass@"), k == "eval/mean_length", k))
    header = "| model | measured in | " + " | ".join(k[5:] for k in keys) + " |"
    lines = [header, "|" + "---|" * (len(keys) + 2)]
    for label, (where, metrics) in rows.items():
        cells = [_cell(k, metrics.get(k)) for k in keys]
        lines.append(f"| {label} | {where} | " + " | ".join(cells) + " |")
    examples = {int(m.get("eval/examples", 0)) for _, m in rows.values()}
    walls = ", ".join(f"{s.number}-{s.name} {r.get('wall_s', 0):.0f} s" for s, r in zip(stages, records))
    lines.append("")
    lines.append(f"held-out problems per row: {', '.join(map(str, sorted(examples)))} (greedy); stage wall times: "
                 f"{walls}")
    return "\n".join(lines)


def plot_stages(stages: list[Stage], records: list[dict], out: Path) -> Optional[Path]:
    """The held-out scores (pass@1 and each reward's mean) of every model the pipeline evaluated, as a PNG."""
    import matplotlib  # plotting only here, at the end

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = evaluations_by_model(stages, records)
    keys = [k for k in dict.fromkeys(k for _, m in rows.values() for k in m)
            if k not in TABLE_SKIP and k != "eval/mean_length"]
    if len(rows) < 2 or not keys:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    labels = list(rows)
    for key in keys:
        ax.plot(range(len(labels)), [rows[label][1].get(key, float("nan")) for label in labels], marker="o",
                label=key[5:])
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("held-out (greedy), model after each stage")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _cell(key: str, value) -> str:
    """Rates (pass@k, rewards in [0, 1]) as percentages; lengths and other scores as numbers."""
    if value is None:
        return "n/a"
    if key == "eval/mean_length":
        return f"{value:.1f}"
    return f"{value:.1%}" if 0.0 <= value <= 1.0 else f"{value:.3f}"


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name.strip().lower()) or "stage"
