"""Distillation and rejection sampling: a teacher's completions of the training prompts, scored, filtered, as JSONL.

    python -m launch distill --config C      (writes run.output_dir/distill.jsonl)

Stage 1 of the R1 recipe, and its "rejection sampling + SFT" round: the teacher (`distill.teacher`,
or the policy itself for STaR / rejection-sampling fine-tuning) samples K completions of each prompt
with the jitted rollout, the run's reward functions score them, and per prompt the completions whose
total reward reaches `distill.min_reward` are kept (the best one, all of them, or the shortest).
Completions cut off at rollout.max_completion_length are dropped (distill.keep_truncated keeps them).

Each corpus row: `prompt` (the dataset's, untemplated), `completion` (as the rewards saw it,
data.assistant_prefix included), `answer` and the row's other columns, `reward` (the total),
`reward/<name>` per function, `length` (completion tokens), `truncated`, `teacher`, `index`
(dataset row) and `sample` (which of the K).
`sft` reads it as is: data.source=jsonl, data.path=<it>, data.prompt_column=prompt,
sft.completion_template="{completion}" (or a template that wraps it, e.g. in R1 tags).

Resuming: after each batch the rows are appended and fsynced, then `distill.progress.json` is
replaced atomically with the corpus length in bytes and the data position. A re-run truncates the
corpus to that length (dropping rows of a batch that had not been recorded) and continues with
the next batch: a kill -9 loses at most one batch's sampling and never duplicates a row.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import NamedTuple, Optional

import jax
import numpy as np

from grpo_jax.config import Config, ConfigError, identity_changes, load_config, save_config
from grpo_jax.data import batches, load_dataset, overlong_filter
from grpo_jax.metrics import finite_or_none
from grpo_jax.policy import Policy
from grpo_jax.rewards.compute import RewardSet
from grpo_jax.run_dir import CONFIG_FILE, RunLock, write_json
from grpo_jax.signals import StopSignals

CORPUS_FILE = "distill.jsonl"
PROGRESS_FILE = "distill.progress.json"
# What a corpus is made of: a re-run with any of these changed would mix two corpora.
IDENTITY = ("model.path", "model.tokenizer", "model.param_dtype", "model.compute_dtype", "data.", "rollout.",
            "rewards.functions", "rewards.weights", "distill.", "run.seed")
BATCH_COLUMNS = ("prompt", "answer", "index", "valid")  # set by the batch iterator or written under their own name


class DistillSummary(NamedTuple):
    corpus: Path
    prompts: int  # prompts sampled so far (all batches, resumed ones included)
    completions: int
    kept: int  # corpus rows
    prompts_kept: int  # prompts with at least one row
    complete: bool
    seconds: float = 0.0  # this invocation's sampling time
    tokens: int = 0  # completion tokens sampled by this invocation


def teacher_config(cfg: Config) -> Config:
    """The config the teacher loads with: model.path = distill.teacher (its own tokenizer) when set."""
    d = cfg.distill
    if d.teacher is None:
        return cfg
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=d.teacher,
                                                              tokenizer=d.teacher_tokenizer))


def select(total: np.ndarray, lengths: np.ndarray, truncated: np.ndarray, d) -> list[int]:
    """Which of one prompt's K completions to keep (indices into the group), by the distill section `d`."""
    eligible = [j for j in range(len(total)) if total[j] >= d.min_reward and (d.keep_truncated or not truncated[j])]
    keep = d.keep
    if not eligible or keep == "all":
        return eligible
    if keep == "shortest":
        return [min(eligible, key=lambda j: (lengths[j], j))]
    return [min(eligible, key=lambda j: (-total[j], lengths[j], j))]  # best: highest reward, then shortest


def corpus_rows(batch: dict, texts: list[str], result, lengths: np.ndarray, truncated: np.ndarray, k: int,
                valid: np.ndarray, cfg: Config, teacher: str) -> tuple[list[dict], int]:
    """The kept rows of one batch, and how many of its prompts gave at least one."""
    d = cfg.distill
    extra = [c for c in batch if c not in BATCH_COLUMNS]
    rows, prompts_kept = [], 0
    for i in np.flatnonzero(valid):
        group = slice(i * k, (i + 1) * k)
        chosen = select(result.total[group], lengths[group], truncated[group], d)
        prompts_kept += bool(chosen)
        for j in chosen:
            r = i * k + j
            row = {"prompt": batch["prompt"][i], "completion": texts[r], "answer": batch["answer"][i]}
            row.update({c: batch[c][i] for c in extra if _is_json(batch[c][i])})
            row["reward"] = float(result.total[r])
            row.update({f"reward/{name}": finite_or_none(result.rewards[r, n]) for n, name in enumerate(result.names)})
            row.update(length=int(lengths[r]), truncated=bool(truncated[r]), teacher=teacher,
                       index=int(batch["index"][i]), sample=int(j))
            rows.append(row)
    return rows, prompts_kept


class Progress:
    """distill.progress.json: how far the corpus got (replaced atomically after each batch)."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / PROGRESS_FILE
        self.state = {"batches": 0, "bytes": 0, "prompts": 0, "completions": 0, "kept": 0, "prompts_kept": 0,
                      "data": None, "complete": False}
        if self.path.exists():
            try:
                self.state.update(json.loads(self.path.read_text()))
            except ValueError:
                raise ConfigError(f"{self.path} is not valid JSON: delete {out_dir} to start the corpus afresh") \
                    from None

    def __getitem__(self, key):
        return self.state[key]

    def update(self, **values) -> None:
        self.state.update(values)
        write_json(self.path, self.state)


def claim_corpus(cfg: Config, out_dir: Path) -> Progress:
    """The progress to continue from: a dir holding another corpus refuses with the differences;
    the corpus file is cut back to the rows the progress file records."""
    progress = Progress(out_dir)
    saved = out_dir / CONFIG_FILE
    if progress["batches"] and saved.exists():
        changes = identity_changes(load_config(saved), cfg, IDENTITY)
        if changes:
            raise ConfigError(f"{out_dir} holds a distil corpus ({progress['kept']} rows from {progress['prompts']} "
                              f"prompts) made with other settings: {'; '.join(changes)}. Nothing was touched: "
                              "re-run with its settings to continue it, or give this one another run.output_dir")
    corpus = out_dir / CORPUS_FILE
    if corpus.exists() and corpus.stat().st_size != progress["bytes"]:
        with open(corpus, "r+b") as f:  # rows of a batch that was not recorded: it is sampled again
            f.truncate(progress["bytes"])
    return progress


def run_distill(cfg: Config, out_dir: Optional[str | os.PathLike] = None) -> DistillSummary:
    """Sample, score and filter distill.num_prompts prompts of data.split into out_dir/distill.jsonl
    (default out_dir: run.output_dir), continuing a corpus a killed run left there."""
    out_dir = Path(out_dir or cfg.run.output_dir)
    lock = RunLock(out_dir)
    note = lock.acquire()
    if note:
        print(note, flush=True)
    try:
        progress = claim_corpus(cfg, out_dir)
        corpus = out_dir / CORPUS_FILE
        if progress["complete"]:
            print(f"distill already complete: {progress['kept']} rows in {corpus}; nothing to do", flush=True)
            return _summary(corpus, progress, complete=True)
        save_config(cfg, out_dir)
        return _sample_corpus(cfg, out_dir, progress)
    finally:
        lock.release()


def _sample_corpus(cfg: Config, out_dir: Path, progress: Progress) -> DistillSummary:
    d, corpus = cfg.distill, out_dir / CORPUS_FILE
    teacher = Policy.load(teacher_config(cfg))
    if jax.process_count() > 1:
        raise ConfigError("distill runs in one process (its corpus is one file): launch it on one host")
    teacher_id = d.teacher or cfg.model.path
    rewards = RewardSet.from_config(cfg)
    dataset = load_dataset(cfg.data, cfg.data.split, cfg.run.seed)
    total = len(dataset) if d.num_prompts == 0 else min(d.num_prompts, len(dataset))
    it = batches(dataset, cfg.data.batch_size, cfg.run.seed, shuffle=cfg.data.shuffle, repeat=False, pad_last=True,
                 keep=overlong_filter(cfg, teacher.formatter), state=progress["data"])
    k, key = d.samples_per_prompt, jax.random.PRNGKey(cfg.run.seed)
    bar = _Bar(total, progress["prompts"], cfg.logging.progress_bar)
    if progress["prompts"]:
        print(f"continuing the corpus in {corpus} after {progress['prompts']} prompts ({progress['kept']} rows)",
              flush=True)
    t0, tokens = time.perf_counter(), 0
    try:
        with StopSignals() as signals, open(corpus, "ab") as out:
            signals.arm()
            for batch in it:
                remaining = total - progress["prompts"]
                if remaining <= 0:
                    break
                valid = np.asarray(batch["valid"], bool) & (np.arange(len(batch["valid"])) < remaining)
                b = progress["batches"]
                samples = teacher.sample(batch["prompt"], jax.random.fold_in(key, b), teacher.sampling, k)
                local = samples.local
                texts = teacher.decode(local.tokens, local.mask)
                result = rewards.score_groups(samples.prompts.texts, texts, batch, k, local.tokens, local.mask)
                lengths = local.mask.sum(axis=1)
                rows, prompts_kept = corpus_rows(batch, texts, result, lengths, np.asarray(local.truncated), k, valid,
                                                 cfg, teacher_id)
                out.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())
                out.flush()
                os.fsync(out.fileno())
                n = int(valid.sum())
                tokens += int(lengths[np.repeat(valid, k)].sum())
                progress.update(batches=b + 1, bytes=out.tell(), prompts=progress["prompts"] + n,
                                completions=progress["completions"] + n * k, kept=progress["kept"] + len(rows),
                                prompts_kept=progress["prompts_kept"] + prompts_kept, data=it.state())
                bar.advance(n, progress)
                if signals.received is not None:
                    print(f"\nstopped after {progress['prompts']} of {total} prompts ({progress['kept']} rows kept); "
                          "re-run the same command to continue", flush=True)
                    return _summary(corpus, progress, False, time.perf_counter() - t0, tokens)
    finally:
        rewards.close()
        bar.close()
    progress.update(complete=True)
    summary = _summary(corpus, progress, True, time.perf_counter() - t0, tokens)
    print(describe(summary, total), flush=True)
    return summary


def describe(s: DistillSummary, total: int) -> str:
    rate = f" in {s.seconds:.0f} s ({s.completions / max(s.seconds, 1e-9):.1f} completions/s, " \
           f"{s.tokens / max(s.seconds, 1e-9):.0f} tokens/s)" if s.seconds else ""
    return (f"distill: {s.prompts} of {total} prompts x {s.completions // max(s.prompts, 1)} samples{rate}; "
            f"kept {s.kept} rows from {s.prompts_kept} prompts ({s.prompts_kept / max(s.prompts, 1):.1%} of prompts) "
            f"-> {s.corpus}")


def _summary(corpus: Path, progress: Progress, complete: bool, seconds: float = 0.0, tokens: int = 0):
    return DistillSummary(corpus, progress["prompts"], progress["completions"], progress["kept"],
                          progress["prompts_kept"], complete, seconds, tokens)


class _Bar:
    """A tqdm bar over prompts with the kept fraction on a terminal; a line every ~10% otherwise."""

    def __init__(self, total: int, done: int, enabled: bool):
        self.total, self.done, self._bar, self._next_line = total, done, None, 0.1
        if enabled and sys.stdout.isatty():
            from tqdm import tqdm  # only on a terminal

            self._bar = tqdm(total=total, initial=done, desc="distill", unit="prompt", dynamic_ncols=True)

    def advance(self, n: int, progress: Progress) -> None:
        self.done += n
        kept = f"kept {progress['prompts_kept'] / max(progress['prompts'], 1):.0%} of prompts, {progress['kept']} rows"
        if self._bar is not None:
            self._bar.update(n)
            self._bar.set_postfix_str(kept, refresh=True)
        elif self.done >= self._next_line * self.total or self.done == self.total:
            print(f"distill {self.done}/{self.total} prompts | {kept}", flush=True)
            while self._next_line * self.total <= self.done:
                self._next_line += 0.1

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _is_json(value) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True
