"""Data sources: every one is a random-access `Dataset` of row dicts.

A row always has `prompt` (a str, or a list of chat messages `{"role", "content"}`)
and `answer` (a str, or None when the source has no answer column), plus the
source's other columns under their own names; reward functions receive them
as `**columns`.

`load_dataset(data_cfg, split, seed)` picks the source by `data.source`:

| source               | what                                                                      |
| -------------------- | ------------------------------------------------------------------------- |
| `arithmetic`         | built-in procedural sums / differences / products (`builtin.py`)           |
| `countdown`          | built-in numbers game; check answers with `verify_countdown`               |
| `jsonl`, `parquet`   | local files at `data.path` (see `resolve_files` for how splits are found)  |
| `gsm8k`              | GSM8K `train.jsonl` / `test.jsonl` in the folder `data.path`; with no path,|
|                      | the `tfds:grpo_gsm8k` builder (downloads the official files)               |
| `tfds:NAME`          | `tfds.data_source(NAME, split, data_dir=data.path)` (ArrayRecord, no TF)   |
| `reasoning_gym:NAME` | a reasoning-gym dataset; rows carry `rg_entry` and `rg_score`              |

Errors a user can fix are `DataError` (a `ValueError`) with a one-line message.
"""

from __future__ import annotations

import difflib
import glob
import json
import os
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from grpo_jax.data.builtin import TASKS, builtin_dataset
from grpo_jax.data.dataset import DataError, Dataset


class ListDataset(Dataset):
    """Rows held in memory (files are small next to a model)."""

    def __init__(self, rows: list[dict], name: str = "rows", split: str = "train"):
        self.rows, self.name, self.split = rows, name, split

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        return dict(self.rows[self._check_index(index)])


# ------------------------------------------------------------------ column mapping


def _to_answer(value) -> Optional[str]:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, (np.generic,)):
        value = value.item()
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return value if isinstance(value, str) else str(value)


def _to_prompt(value, where: str, column: str):
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        return [dict(m) for m in value]  # chat messages
    raise DataError(f"{where}: column {column!r} holds {type(value).__name__}, "
                    "expected text or a list of chat messages")


def map_row(row: dict, prompt_column: str, answer_column: Optional[str], where: str) -> dict:
    """The source row with `prompt` and `answer` set from the configured columns.

    An empty `answer_column` means the data has no answers (`answer` is None).
    """
    for column in (prompt_column, answer_column):
        if column and column not in row:
            present = ", ".join(map(str, row)) or "none"
            raise DataError(f"{where}: no column {column!r} (data.{'prompt' if column == prompt_column else 'answer'}"
                            f"_column); columns present: {present}")
    out = dict(row)
    out["prompt"] = _to_prompt(row[prompt_column], where, prompt_column)
    out["answer"] = _to_answer(row[answer_column]) if answer_column else None
    return out


# ------------------------------------------------------------------ files

_EXTENSIONS = {"jsonl": (".jsonl", ".json", ".jsonl.gz"), "parquet": (".parquet",)}


def resolve_files(path: str, split: str, fmt: str, train_split: str = "train") -> list[str]:
    """The files of `split` at `path`.

    - `path` containing `{split}` (e.g. `data/{split}.jsonl`): formatted with the split;
    - a folder: files named `SPLIT.ext`, `SPLIT-*.ext`, `SPLIT_*.ext`, or any file
      in a sub-folder named `SPLIT` (so a Hugging Face `data/train-00000-of-00001.parquet`
      layout works), searched recursively;
    - a single file: it is the training split (`data.split`); asking it for
      another split is an error, as evaluating on the training data would be silent.
    """
    exts = _EXTENSIONS[fmt]
    if "{split}" in path:
        path = path.replace("{split}", split)
        if not os.path.exists(path):
            raise DataError(f"{fmt}: no file {path} for split {split!r}")
    if os.path.isfile(path):
        if "{split}" not in path and split != train_split and os.path.basename(path).split(".")[0] != split:
            raise DataError(f"data.path={path} is one file and serves the training split only; for split {split!r} "
                            f"point data.path at a folder or a `{{split}}` pattern, or set data.eval_split=null")
        return [path]
    if not os.path.isdir(path):
        raise DataError(f"data.path={path} does not exist")
    found = []
    for f in sorted(glob.glob(os.path.join(path, "**", "*"), recursive=True)):
        if not os.path.isfile(f) or not f.endswith(exts):
            continue
        base = os.path.basename(f)
        stem = base.split(".")[0]
        parent = os.path.basename(os.path.dirname(f))
        if stem == split or base.startswith((split + "-", split + "_")) or parent == split:
            found.append(f)
    if not found:
        raise DataError(f"{fmt}: no {'/'.join(exts)} files for split {split!r} in {path} "
                        f"(expected {split}{exts[0]}, {split}-*{exts[0]} or {split}/*{exts[0]})")
    return found


def read_jsonl(path: str) -> Iterator[tuple[int, dict]]:
    """(line number, row) for each non-blank line; a bad line is a DataError naming file:line."""
    opener = open
    if path.endswith(".gz"):
        import gzip

        opener = gzip.open
    with opener(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})") \
                    from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object per line, got {type(row).__name__}")
            yield lineno, row


def load_jsonl(paths: Sequence[str], prompt_column: str, answer_column: Optional[str], split: str) -> ListDataset:
    rows = []
    for path in paths:
        for lineno, row in read_jsonl(path):
            rows.append(map_row(row, prompt_column, answer_column, f"{path}:{lineno}"))
    if not rows:
        raise DataError(f"jsonl: no rows in {', '.join(paths)}")
    return ListDataset(rows, name=os.path.basename(paths[0]), split=split)


def load_parquet(paths: Sequence[str], prompt_column: str, answer_column: Optional[str], split: str) -> ListDataset:
    import pyarrow.parquet as pq

    rows = []
    for path in paths:
        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises several types for unreadable files
            raise DataError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]})") from None
        for column, what in ((prompt_column, "prompt"), (answer_column, "answer")):
            if column and column not in table.column_names:
                raise DataError(f"{path}: no column {column!r} (data.{what}_column); columns present: "
                                f"{', '.join(table.column_names) or 'none'}")
        for i, row in enumerate(table.to_pylist()):
            rows.append(map_row(row, prompt_column, answer_column, f"{path} row {i}"))
    if not rows:
        raise DataError(f"parquet: no rows in {', '.join(paths)}")
    return ListDataset(rows, name=os.path.basename(paths[0]), split=split)


# ------------------------------------------------------------------ TensorFlow Datasets


def _decode(value):
    """bytes -> str, numpy scalars / arrays -> Python values, recursively."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value
    if isinstance(value, dict):
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "SO":
            return [_decode(v) for v in value.tolist()]
        return value
    if isinstance(value, np.generic):
        return value.item()
    return value


class TfdsDataset(Dataset):
    """Rows of a `tfds.data_source` (random access over ArrayRecord files), decoded to Python."""

    def __init__(self, source, name: str, split: str, prompt_column: str, answer_column: Optional[str],
                 transform: Optional[Callable[[dict], dict]] = None):
        """`transform(raw_row) -> raw_row` renames / adds columns before the prompt / answer columns are read."""
        self.source, self.name, self.split = source, name, split
        self.prompt_column, self.answer_column, self.transform = prompt_column, answer_column, transform
        if len(source) == 0:
            raise DataError(f"tfds:{name}: split {split!r} has no rows")
        self[0]  # check the columns once, up front

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        index = self._check_index(index)
        raw = _decode(self.source[index])
        if self.transform is not None:
            raw = self.transform(raw)
        return map_row(raw, self.prompt_column, self.answer_column, f"tfds:{self.name}[{self.split}]")


def _gsm8k_columns(raw: dict) -> dict:
    """grpo_gsm8k rows: the worked solution (the file's `answer`) becomes `solution`."""
    out = {k: v for k, v in raw.items() if k != "answer"}
    out.update(solution=raw.get("answer"), task="gsm8k")
    return out


# Datasets we know: the answer column used instead of the default `answer`, and
# a renaming of the raw columns applied before the prompt / answer columns are read.
KNOWN_ANSWER_COLUMNS = {"grpo_gsm8k": "final_answer"}
KNOWN_COLUMNS = {"grpo_gsm8k": _gsm8k_columns}


def load_tfds(name: str, split: str, data_dir: Optional[str], prompt_column: str, answer_column: Optional[str],
              manual_dir: Optional[str] = None, download: bool = True) -> TfdsDataset:
    """`tfds.data_source(name, split=split, data_dir=data_dir)`, preparing the dataset if needed.

    Needs no TensorFlow: data sources read ArrayRecord files. Our own builders
    (`grpo_gsm8k`) are registered first; `manual_dir` is passed to their
    download config (GSM8K reads `train.jsonl` / `test.jsonl` from it).
    """
    import tensorflow_datasets as tfds

    from grpo_jax.data import gsm8k  # noqa: F401  registers grpo_gsm8k

    base = name.split("/")[0].split(":")[0]
    if answer_column == "answer" and base in KNOWN_ANSWER_COLUMNS:
        answer_column = KNOWN_ANSWER_COLUMNS[base]
    dl_kwargs: dict[str, Any] = {}
    if manual_dir:
        dl_kwargs["download_config"] = tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir))
    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=download,
                                  download_and_prepare_kwargs=dl_kwargs or None)
    except DataError:
        raise
    except Exception as e:  # tfds raises many types; keep the first line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"tfds:{name} split {split!r}: {msg}") from e
    return TfdsDataset(source, name, split, prompt_column, answer_column, transform=KNOWN_COLUMNS.get(base))


# ------------------------------------------------------------------ reasoning-gym


def _rg_seed(seed: int, split: str) -> int:
    """Far-apart seeds per split: reasoning-gym items use `Random(seed + index)`."""
    import zlib

    return int(np.random.SeedSequence([int(seed), zlib.crc32(split.encode())]).generate_state(1)[0])


class ReasoningGymDataset(Dataset):
    """A reasoning-gym procedural dataset.

    Rows: `prompt` (the entry's question), `answer` (its reference answer, may be
    None), `metadata`, `rg_entry` (the entry dict itself) and `rg_score`, a
    callable `rg_score(answer: str) -> float` that is the dataset's own
    `score_answer(answer, entry=rg_entry)`. A reward function can use it as
    `[score(extract(c)) for score, c in zip(rg_score, completions)]`.
    """

    def __init__(self, name: str, split: str, seed: int, size: int, options: Optional[dict] = None):
        try:
            import reasoning_gym
        except ImportError:
            raise DataError(f"reasoning_gym:{name} needs the reasoning-gym package: "
                            "pip install reasoning-gym") from None
        from reasoning_gym.factory import DATASETS

        if name not in DATASETS:
            near = difflib.get_close_matches(name, list(DATASETS), n=1)
            hint = (f"; did you mean {near[0]}?" if near
                    else f"; {len(DATASETS)} datasets in reasoning_gym.factory.DATASETS")
            raise DataError(f"unknown reasoning-gym dataset {name!r}{hint}")
        try:
            self.rg = reasoning_gym.create_dataset(name, size=int(size), seed=_rg_seed(seed, split), **(options or {}))
        except (TypeError, ValueError, AssertionError) as e:
            raise DataError(f"reasoning_gym:{name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        self.name, self.split = f"reasoning_gym:{name}", split

    def __len__(self) -> int:
        return len(self.rg)

    def __getitem__(self, index: int) -> dict:
        entry = self.rg[self._check_index(index)]
        score = self.rg.score_answer

        def rg_score(answer: Optional[str], _entry=entry) -> float:
            return float(score(answer, entry=_entry))

        return {"prompt": entry["question"], "answer": _to_answer(entry.get("answer")),
                "metadata": entry.get("metadata", {}), "rg_entry": entry, "rg_score": rg_score,
                "task": self.name}


# ------------------------------------------------------------------ GSM8K (pure Python)


def load_gsm8k_folder(path: str, split: str) -> ListDataset:
    """GSM8K from `PATH/{split}.jsonl` (the official files): prompt = question,
    answer = the number after `####`, `solution` = the worked solution."""
    from grpo_jax.data.gsm8k import gsm8k_row

    file = os.path.join(path, f"{split}.jsonl")
    if not os.path.isfile(file):
        raise DataError(f"gsm8k: no {split}.jsonl in {path} (expected the official train.jsonl / test.jsonl)")
    rows = []
    for lineno, raw in read_jsonl(file):
        row = map_row(raw, "question", "answer", f"{file}:{lineno}")
        rows.append(gsm8k_row(row["question"], row["answer"]))
    if not rows:
        raise DataError(f"gsm8k: no rows in {file}")
    return ListDataset(rows, name="gsm8k", split=split)


# ------------------------------------------------------------------ entry point


def load_dataset(data_cfg, split: Optional[str] = None, seed: int = 0) -> Dataset:
    """The dataset of `data_cfg.source` for `split` (default `data_cfg.split`).

    `seed` fixes the content of procedural sources (builtin, reasoning_gym).
    Optional config fields, read with defaults when absent: `num_examples`
    (rows of a procedural train split, default 10000), `num_eval_examples`
    (other splits, default 500), `task_options` (dict of keyword arguments for
    the task generator / reasoning-gym config), `tfds_manual_dir`.
    """
    source = data_cfg.source
    split = split or data_cfg.split
    prompt_col = data_cfg.prompt_column
    answer_col = data_cfg.answer_column or None
    options = dict(data_cfg.task_options or {})
    train_size = int(data_cfg.num_examples)
    eval_size = int(data_cfg.num_eval_examples)
    size = train_size if split == data_cfg.split else eval_size

    if source in TASKS:
        return builtin_dataset(source, split, seed, size, options)
    if source in ("jsonl", "parquet"):
        if not data_cfg.path:
            raise DataError(f"data.source={source} needs data.path (a file, a folder, or a pattern with {{split}})")
        files = resolve_files(os.path.expanduser(data_cfg.path), split, source, train_split=data_cfg.split)
        loader = load_jsonl if source == "jsonl" else load_parquet
        return loader(files, prompt_col, answer_col, split)
    if source == "gsm8k":
        if data_cfg.path:
            return load_gsm8k_folder(os.path.expanduser(data_cfg.path), split)
        return load_tfds("grpo_gsm8k", split, None, "question", "final_answer",
                         manual_dir=data_cfg.tfds_manual_dir)
    if source.startswith("tfds:"):
        return load_tfds(source[5:], split, data_cfg.path, prompt_col, answer_col,
                         manual_dir=data_cfg.tfds_manual_dir)
    if source.startswith("reasoning_gym:"):
        return ReasoningGymDataset(source.split(":", 1)[1], split, seed, size, options)
    choices = list(TASKS) + ["jsonl", "parquet", "gsm8k", "tfds:NAME", "reasoning_gym:NAME"]
    near = difflib.get_close_matches(source, choices, n=1)
    hint = f"; did you mean {near[0]}?" if near else ""
    raise DataError(f"unknown data.source {source!r}{hint} (choose from {', '.join(choices)})")
