"""Deterministic, resumable batches over a random-access dataset.

The row order is a stream: epoch 0's order, then epoch 1's, ...; each epoch's
order is `np.random.default_rng([seed, epoch]).permutation(len(dataset))`
(or 0..n-1 without shuffling). A global batch is the next `batch_size` rows of
the stream; a training batch may span two epochs (no row is skipped and none
repeats within an epoch). The state is the stream position `(epoch, position)`
plus a count of rows dropped by `keep`, all ints: `state()` returns it, and
`restore(state)` (or `batches(..., state=...)`) continues with exactly the
batches that would have followed.

Multi-process: process `i` of `n` gets the contiguous slice
`[i * B/n, (i + 1) * B/n)` of each global batch (B divisible by n), matching
`jax.make_array_from_process_local_data` with the batch axis sharded over
processes in order. Every process walks the same stream, so the union of the
shards, in process order, is the global batch. Only this process's rows are
read, except when `keep` is given: then every process evaluates it on all
candidate rows of the global batch, so they agree on which rows were dropped.

Batches are dicts of lists: every row column (missing ones filled with None),
plus `index` (the dataset index of each row) and `valid` (False only on rows
that pad the last eval batch when `pad_last=True`).
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional

import numpy as np

from grpo_jax.data.dataset import DataError, Dataset


def epoch_permutation(n: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The row order of one epoch: a permutation keyed on (seed, epoch)."""
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    return np.random.default_rng([int(seed) % (1 << 64), int(epoch)]).permutation(n).astype(np.int64)


def collate(rows: list[dict]) -> dict[str, list]:
    """Rows -> columns; a column missing from some rows is None there."""
    keys: dict[str, None] = {}
    for row in rows:
        keys.update(dict.fromkeys(row))
    return {k: [row.get(k) for row in rows] for k in keys}


class BatchIterator:
    """Yields this process's share of each global batch; see the module docstring."""

    STATE_KEYS = ("epoch", "position", "dropped")

    def __init__(self, dataset: Dataset, batch_size: int, seed: int = 0, *, shuffle: bool = True,
                 repeat: bool = True, process_index: int = 0, process_count: int = 1,
                 keep: Optional[Callable[[dict], bool]] = None, pad_last: bool = False,
                 state: Optional[dict] = None):
        n = len(dataset)
        if n == 0:
            raise DataError(f"{getattr(dataset, 'name', 'dataset')}: no rows to iterate over")
        if batch_size < 1:
            raise DataError(f"batch_size={batch_size} must be >= 1")
        if process_count < 1 or not 0 <= process_index < process_count:
            raise DataError(f"process_index={process_index} must be in [0, process_count={process_count})")
        if batch_size % process_count:
            raise DataError(f"data.batch_size={batch_size} does not split evenly over {process_count} processes")
        self.dataset, self.batch_size, self.seed = dataset, int(batch_size), int(seed)
        self.shuffle, self.repeat, self.keep, self.pad_last = shuffle, repeat, keep, pad_last
        self.process_index, self.process_count = int(process_index), int(process_count)
        self.local_batch_size = self.batch_size // self.process_count
        self.epoch, self.position, self.dropped = 0, 0, 0
        self._perm_epoch, self._perm = None, None
        if state is not None:
            self.restore(state)

    # ------------------------------------------------------------ state

    def state(self) -> dict[str, int]:
        """Where the next batch starts: `{"epoch", "position", "dropped"}`, all ints."""
        return {"epoch": int(self.epoch), "position": int(self.position), "dropped": int(self.dropped)}

    def restore(self, state: dict) -> None:
        missing = [k for k in ("epoch", "position") if k not in state]
        if missing:
            raise DataError(f"data iterator state {state!r} lacks {', '.join(missing)}")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= len(self.dataset):
            raise DataError(f"data iterator state epoch={epoch} position={position} does not fit a dataset of "
                            f"{len(self.dataset)} rows (was the dataset changed?)")
        self.epoch, self.position, self.dropped = epoch, position, int(state.get("dropped", 0))

    # ------------------------------------------------------------ iteration

    @property
    def num_batches(self) -> Optional[int]:
        """Global batches in one pass (repeat=False and no `keep`), else None."""
        if self.repeat or self.keep is not None:
            return None
        return -(-len(self.dataset) // self.batch_size)

    def _order(self) -> np.ndarray:
        if self._perm_epoch != self.epoch:
            self._perm = epoch_permutation(len(self.dataset), self.seed, self.epoch, self.shuffle)
            self._perm_epoch = self.epoch
        return self._perm

    def _next_global(self) -> tuple[list[int], dict[int, dict]]:
        """Dataset indices of the next global batch, and rows already read for `keep`."""
        n, want = len(self.dataset), self.batch_size
        indices: list[int] = []
        cache: dict[int, dict] = {}
        scanned_without_keep = 0
        while len(indices) < want:
            if self.position >= n:
                if not self.repeat:
                    break
                self.epoch, self.position = self.epoch + 1, 0
            order = self._order()
            if self.keep is None:
                take = min(want - len(indices), n - self.position)
                indices.extend(int(i) for i in order[self.position:self.position + take])
                self.position += take
                continue
            idx = int(order[self.position])
            self.position += 1
            row = self.dataset[idx]
            if self.keep(row):
                indices.append(idx)
                cache[idx] = row
                scanned_without_keep = 0
            else:
                self.dropped += 1
                scanned_without_keep += 1
                if scanned_without_keep > n:
                    raise DataError(f"{getattr(self.dataset, 'name', 'dataset')}: every row was dropped "
                                    "(longer than rollout.max_prompt_length, with data.overlong_prompts=drop)")
        return indices, cache

    def __iter__(self) -> Iterator[dict[str, list]]:
        return self

    def __next__(self) -> dict[str, list]:
        indices, cache = self._next_global()
        if not indices:
            raise StopIteration
        valid = [True] * len(indices)
        if len(indices) < self.batch_size and self.pad_last:
            pad = self.batch_size - len(indices)
            indices = indices + [indices[-1]] * pad
            valid = valid + [False] * pad
        if len(indices) == self.batch_size:
            lo = self.process_index * self.local_batch_size
            hi = lo + self.local_batch_size
        else:  # short last batch of a pass: near-equal contiguous slices
            bounds = np.linspace(0, len(indices), self.process_count + 1).round().astype(int)
            lo, hi = int(bounds[self.process_index]), int(bounds[self.process_index + 1])
        rows = [cache[i] if i in cache else self.dataset[i] for i in indices[lo:hi]]
        batch = collate(rows) if rows else {"prompt": [], "answer": []}
        batch["index"] = indices[lo:hi]
        batch["valid"] = valid[lo:hi]
        return batch


def batches(dataset: Dataset, batch_size: int, seed: int = 0, *, shuffle: bool = True, repeat: bool = True,
            process_index: int = 0, process_count: int = 1, keep: Optional[Callable[[dict], bool]] = None,
            pad_last: bool = False, state: Optional[dict] = None) -> BatchIterator:
    """A `BatchIterator`: endless over epochs for training (`repeat=True`), one pass for eval (`repeat=False`)."""
    return BatchIterator(dataset, batch_size, seed, shuffle=shuffle, repeat=repeat, process_index=process_index,
                         process_count=process_count, keep=keep, pad_last=pad_last, state=state)


def run_batches(dataset: Dataset, cfg, formatter, process_index: int = 0, process_count: int = 1) -> BatchIterator:
    """A training run's endless, resumable stream of data.batch_size prompts, this process's share of it.

    cfg: the run's Config; formatter: its PromptFormatter (with data.overlong_prompts=drop, overlong
    prompts are left out before they reach a batch, so batches stay full)."""
    return batches(dataset, cfg.data.batch_size, cfg.run.seed, shuffle=cfg.data.shuffle, repeat=True,
                   process_index=process_index, process_count=process_count, keep=overlong_filter(cfg, formatter))


def overlong_filter(cfg, formatter) -> Optional[Callable[[dict], bool]]:
    """The `keep` of a run's batches: with data.overlong_prompts=drop, rows whose prompt is too long go."""
    if cfg.data.overlong_prompts != "drop":
        return None
    limit = cfg.rollout.max_prompt_length
    return lambda row: not formatter.is_overlong(row["prompt"], limit)
