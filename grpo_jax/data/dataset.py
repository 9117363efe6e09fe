"""The two types every data module shares: `Dataset` (random access to row dicts) and `DataError`.

They live here, below everything else in `grpo_jax.data`, so that the sources
(`sources.py`, `builtin.py`), the iterator and the prompt formatter can all import
them without importing each other.
"""

from __future__ import annotations

from typing import Iterator


class DataError(ValueError):
    """A dataset that cannot be used; its message is one line meant for the user."""


class Dataset:
    """Random access to rows: `len(ds)`, `ds[i] -> dict` with `prompt` and `answer`."""

    name: str = "dataset"
    split: str = "train"

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def __iter__(self) -> Iterator[dict]:
        for i in range(len(self)):
            yield self[i]

    def _check_index(self, index) -> int:
        index = int(index)
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"{self.name}: index {index} out of range for {n} rows")
        return index

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, split={self.split!r}, rows={len(self)})"
