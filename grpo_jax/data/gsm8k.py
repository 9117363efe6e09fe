"""GSM8K: the answer parser and a TFDS builder of our own (`grpo_gsm8k`).

GSM8K is not in the TFDS catalog, so `GrpoGsm8k` builds it from the official
`train.jsonl` / `test.jsonl` (7473 / 1319 problems): from
`dl_manager.manual_dir` when those files are there, else downloaded from the
openai/grade-school-math GitHub repository. It writes ArrayRecord files, so
`tfds.data_source("grpo_gsm8k", split=..., data_dir=...)` reads it with random
access and without TensorFlow (checked with tensorflow-datasets 4.9.10 and no
TensorFlow installed: preparing ArrayRecord files does not need it either).

Features: `question`, `answer` (the worked solution, as in the files) and
`final_answer` (the text after `####`, commas removed). Examples keep the
files' order (`disable_shuffling`), so index i is line i + 1 of the file.

    from grpo_jax.data import gsm8k
    gsm8k.prepare(data_dir="~/tensorflow_datasets", manual_dir="/path/to/gsm8k")
    ds = tfds.data_source("grpo_gsm8k", split="test", data_dir="~/tensorflow_datasets")
"""

from __future__ import annotations

import json
import os
import re
from typing import Optional

URLS = {
    "train": "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data/train.jsonl",
    "test": "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data/test.jsonl",
}

_FINAL = re.compile(r"####\s*(.+?)\s*$", re.S)


def parse_final_answer(solution: str) -> Optional[str]:
    """The reference number of a GSM8K solution: the text after `####`, commas removed."""
    m = _FINAL.search(solution or "")
    return m.group(1).replace(",", "").strip() if m else None


def gsm8k_row(question: str, solution: str) -> dict:
    """A data row: prompt = question, answer = final answer, plus the raw columns."""
    final = parse_final_answer(solution)
    return {"prompt": question, "answer": final, "question": question, "solution": solution,
            "final_answer": final, "task": "gsm8k"}


try:
    import tensorflow_datasets as tfds
except ImportError:  # pragma: no cover - tfds is a requirement, but keep the parser importable
    tfds = None

if tfds is not None:

    class GrpoGsm8k(tfds.core.GeneratorBasedBuilder):
        """GSM8K (grade-school math word problems) as a TFDS dataset named `grpo_gsm8k`."""

        VERSION = tfds.core.Version("1.0.0")
        RELEASE_NOTES = {"1.0.0": "Official train / test files of openai/grade-school-math."}
        MANUAL_DOWNLOAD_INSTRUCTIONS = (
            "Optional: put the official train.jsonl and test.jsonl in the manual dir to build offline; "
            "otherwise they are downloaded from GitHub.")

        def __init__(self, *args, **kwargs):
            kwargs.setdefault("file_format", "array_record")
            super().__init__(*args, **kwargs)

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                description="GSM8K: 8.5K grade school math word problems with worked solutions.",
                features=tfds.features.FeaturesDict({
                    "question": tfds.features.Text(),
                    "answer": tfds.features.Text(),
                    "final_answer": tfds.features.Text(),
                }),
                supervised_keys=None,
                disable_shuffling=True,  # keep the files' order: index i is line i + 1
                homepage="https://github.com/openai/grade-school-math",
                citation="@article{cobbe2021gsm8k, title={Training Verifiers to Solve Math Word Problems}, "
                         "author={Cobbe, Karl and others}, journal={arXiv:2110.14168}, year={2021}}",
            )

        def _split_generators(self, dl_manager):
            manual = None
            try:
                manual = dl_manager.manual_dir
            except Exception:  # no manual dir configured / it does not exist
                manual = None
            if manual is not None and all(os.path.isfile(os.path.join(os.fspath(manual), f"{s}.jsonl"))
                                          for s in URLS):
                paths = {s: os.path.join(os.fspath(manual), f"{s}.jsonl") for s in URLS}
            else:
                paths = {s: os.fspath(p) for s, p in dl_manager.download(URLS).items()}
            return {split: self._generate_examples(path) for split, path in paths.items()}

        def _generate_examples(self, path):
            with open(path, encoding="utf-8") as f:
                for i, line in enumerate(f):
                    if not line.strip():
                        continue
                    row = json.loads(line)
                    yield i, {"question": row["question"], "answer": row["answer"],
                              "final_answer": parse_final_answer(row["answer"]) or ""}


def prepare(data_dir: Optional[str] = None, manual_dir: Optional[str] = None):
    """Build `grpo_gsm8k` into `data_dir` (a no-op when already there); returns the builder."""
    if tfds is None:  # pragma: no cover
        raise ImportError("tensorflow-datasets is not installed")
    builder = GrpoGsm8k(data_dir=os.path.expanduser(data_dir) if data_dir else None)
    config = tfds.download.DownloadConfig(manual_dir=os.path.expanduser(manual_dir)) if manual_dir else None
    builder.download_and_prepare(download_config=config)
    return builder
