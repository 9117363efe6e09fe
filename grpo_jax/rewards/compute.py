"""Scoring completions with several reward functions: a matrix, a weighted sum, stats.

`RewardSet` resolves the configured functions once and scores each batch in a
thread pool, so text rewards can run on the host while the device generates or
trains: `submit(...)` returns a `concurrent.futures.Future[RewardResult]`.
`compute_rewards(...)` is the one-shot form.

Each function's result is validated: a list (or 1-D array) of exactly one
float / int / bool / None per completion. NaN counts as None; infinities and
other types are errors. A function that raises is handled by `on_error`:

- ``"stop"``: raise a one-line `RewardError` naming the function, the exception
  and the first completion that reproduces it on its own (found by re-running
  the function on single completions);
- ``"none"``: the completions it fails on score None, and the function's error
  count (in `RewardResult.num_errors` and `stats()`) rises by one per completion.
  Functions marked ``per_completion = False`` (their score depends on the whole
  group, e.g. `length`) are not re-run one completion at a time: the whole
  batch scores None.
"""

from __future__ import annotations

import inspect
import logging
import math
import threading
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from grpo_jax.config import ON_ERROR, OnError
from grpo_jax.rewards.registry import RewardError, RewardFn, get_reward, is_device_reward, reward_name

log = logging.getLogger(__name__)



@dataclass
class RewardResult:
    """Scores of one batch.

    rewards: f32[num_completions, num_fns], NaN where a function returned None.
    total: f32[num_completions], sum of weight * reward with NaN counted as 0.
    means: per-function mean over completions, ignoring None (NaN if all None).
    num_errors: per-function count of completions whose call raised (on_error="none").
    """

    names: list[str]
    weights: np.ndarray
    rewards: np.ndarray
    total: np.ndarray
    means: dict[str, float]
    num_errors: dict[str, int] = field(default_factory=dict)

    def unscored(self) -> list[str]:
        """The functions that scored no completion of this batch (every value NaN or None)."""
        return [name for k, name in enumerate(self.names) if self.rewards.size and np.isnan(self.rewards[:, k]).all()]

    def stats(self, prefix: str = "rewards/") -> dict[str, float]:
        """Flat metrics: `{prefix}{name}/mean|std|errors`, `{prefix}total/mean|std`."""
        out: dict[str, float] = {}
        for k, name in enumerate(self.names):
            col = self.rewards[:, k]
            out[f"{prefix}{name}/mean"] = self.means[name]
            out[f"{prefix}{name}/std"] = _nanstd(col)
            out[f"{prefix}{name}/errors"] = float(self.num_errors.get(name, 0))
        out[f"{prefix}total/mean"] = float(np.mean(self.total)) if self.total.size else math.nan
        out[f"{prefix}total/std"] = float(np.std(self.total)) if self.total.size else math.nan
        return out


def _nanmean(x: np.ndarray) -> float:
    ok = ~np.isnan(x)
    return float(np.mean(x[ok])) if ok.any() else math.nan


def _nanstd(x: np.ndarray) -> float:
    ok = ~np.isnan(x)
    return float(np.std(x[ok])) if ok.any() else math.nan


def _clip(text: Any, limit: int = 200) -> str:
    s = text if isinstance(text, str) else repr(text)
    short = s[:limit] + ("..." if len(s) > limit else "")
    return repr(short)


def _one_line(e: BaseException, limit: int = 200) -> str:
    msg = str(e).strip().splitlines()
    first = msg[0] if msg else ""
    if len(first) > limit:
        first = first[:limit] + "..."
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


# ---------------------------------------------------------------------------
# Calling one host function


def _accepted_keywords(fn: Callable) -> Optional[frozenset]:
    """Names of keyword parameters fn takes, or None when it takes **kwargs (or has no signature)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return None
    return frozenset(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def select_columns(fn: Callable, columns: Mapping[str, Any], skip: Sequence[str] = ()) -> dict[str, Any]:
    """The columns fn can take: all of them if it takes **kwargs, else those it names."""
    names = _accepted_keywords(fn)
    return {k: v for k, v in columns.items() if k not in skip and (names is None or k in names)}


_NUMBER_TYPES = (bool, int, float, np.bool_, np.integer, np.floating)


def validate_result(name: str, out: Any, n: int) -> np.ndarray:
    """A reward function's output -> f32[n] with NaN for None; RewardError if malformed."""
    if isinstance(out, np.ndarray):
        if out.ndim != 1:
            raise RewardError(f"reward {name!r} returned an array of shape {out.shape}, expected ({n},)")
        out = out.tolist()
    elif hasattr(out, "__array__") and hasattr(out, "shape"):  # jax arrays and the like
        arr = np.asarray(out)
        if arr.ndim != 1:
            raise RewardError(f"reward {name!r} returned an array of shape {arr.shape}, expected ({n},)")
        out = arr.tolist()
    if not isinstance(out, (list, tuple)):
        raise RewardError(f"reward {name!r} returned a {type(out).__name__}, expected a list of {n} floats or None")
    if len(out) != n:
        raise RewardError(f"reward {name!r} returned {len(out)} values for {n} completions")
    values = np.full((n,), np.nan, dtype=np.float32)
    for i, v in enumerate(out):
        if v is None:
            continue
        if not isinstance(v, _NUMBER_TYPES):
            raise RewardError(
                f"reward {name!r} returned a {type(v).__name__} ({_clip(v, 60)}) at index {i}, expected float or None"
            )
        f = float(v)
        if math.isinf(f):
            raise RewardError(f"reward {name!r} returned {f} at index {i}; rewards must be finite (or None)")
        values[i] = f
    return values


def _slice_columns(columns: Mapping[str, Any], i: int) -> dict[str, Any]:
    return {k: v[i : i + 1] for k, v in columns.items()}


def call_host_reward(
    fn: RewardFn,
    prompts: Sequence[str],
    completions: Sequence[str],
    columns: Mapping[str, Any],
    on_error: OnError = "stop",
    name: Optional[str] = None,
) -> tuple[np.ndarray, int]:
    """Run one host reward on a batch -> (f32[n] with NaN for None, number of failed completions)."""
    name = name or reward_name(fn)
    n = len(completions)
    kw = select_columns(fn, columns)
    try:
        out = fn(list(prompts), list(completions), **kw)
    except Exception as batch_error:
        return _recover(fn, name, prompts, completions, kw, on_error, batch_error)
    return validate_result(name, out, n), 0


def _recover(fn, name, prompts, completions, kw, on_error, batch_error) -> tuple[np.ndarray, int]:
    n = len(completions)
    values = np.full((n,), np.nan, dtype=np.float32)
    if not getattr(fn, "per_completion", True):  # group-dependent: single completions prove nothing
        if on_error == "stop":
            raise RewardError(f"reward {name!r} raised {_one_line(batch_error)} on a batch of {n} "
                              "completions") from batch_error
        log.warning("reward %r failed on a batch of %d (scored None): %s", name, n, _one_line(batch_error))
        return values, n
    errors = 0
    first: Optional[tuple[int, BaseException]] = None
    for i in range(n):
        try:
            out = fn(list(prompts[i : i + 1]), list(completions[i : i + 1]), **_slice_columns(kw, i))
        except Exception as e:
            if on_error == "stop":
                raise RewardError(
                    f"reward {name!r} raised {_one_line(e)} on completion {i}: {_clip(completions[i])}"
                ) from e
            errors += 1
            first = first or (i, e)
            continue
        values[i] = validate_result(name, out, 1)[0]
    if on_error == "stop":  # no single completion reproduces the failure
        raise RewardError(
            f"reward {name!r} raised {_one_line(batch_error)} on a batch of {n} completions "
            "(each completion alone scores without error)"
        ) from batch_error
    if errors:
        i, e = first  # type: ignore[misc]
        log.warning(
            "reward %r failed on %d of %d completions (scored None); first, completion %d: %s",
            name, errors, n, i, _one_line(e),
        )
    else:  # the batch call failed but every completion alone succeeded: count the batch
        log.warning("reward %r failed on the batch but not on single completions: %s", name, _one_line(batch_error))
    return values, errors


# ---------------------------------------------------------------------------
# Several functions


def _validate_inputs(prompts, completions, columns) -> dict[str, Any]:
    n = len(completions)
    if len(prompts) != n:
        raise RewardError(f"got {len(prompts)} prompts for {n} completions (repeat each prompt per completion)")
    for i, c in enumerate(completions):
        if not isinstance(c, str):
            raise RewardError(f"completion {i} is a {type(c).__name__}, expected str")
    cols = dict(columns or {})
    for k, v in cols.items():
        try:
            m = len(v)
        except TypeError:
            raise RewardError(f"column {k!r} is a {type(v).__name__}, "
                              "expected a list aligned with the completions") from None
        if m != n:
            raise RewardError(f"column {k!r} has {m} values for {n} completions "
                              "(repeat per-prompt columns per completion)")
    return cols


def _done_future(value: Any = None, error: Optional[BaseException] = None) -> Future:
    f: Future = Future()
    f.set_running_or_notify_cancel()
    if error is not None:
        f.set_exception(error)
    else:
        f.set_result(value)
    return f


def _run(executor: Optional[Executor], fn: Callable, *args) -> Future:
    if executor is None:
        try:
            return _done_future(fn(*args))
        except BaseException as e:  # noqa: BLE001 - handed to the future
            return _done_future(error=e)
    return executor.submit(fn, *args)


def _gather(futures: list[Future], combine: Callable[[list[Any]], Any]) -> Future:
    """A future that resolves to combine(results) when all futures are done (first error wins)."""
    outer: Future = Future()
    outer.set_running_or_notify_cancel()
    remaining = [len(futures)]
    lock = threading.Lock()

    def finish() -> None:
        for f in futures:
            e = f.exception()
            if e is not None:
                outer.set_exception(e)
                return
        try:
            outer.set_result(combine([f.result() for f in futures]))
        except BaseException as e:  # noqa: BLE001
            outer.set_exception(e)

    def on_done(_: Future) -> None:
        with lock:
            remaining[0] -= 1
            last = remaining[0] == 0
        if last:
            finish()

    if not futures:
        finish()
    for f in futures:
        f.add_done_callback(on_done)
    return outer


# batch columns that are not the dataset's own (the iterator's bookkeeping; the prompt is passed apart)
SKIP_COLUMNS = ("prompt", "index", "valid")


def reward_columns(batch: Mapping[str, Sequence], group_size: int, completion_lengths: np.ndarray) -> dict:
    """The keyword columns reward functions get: each dataset column's value repeated for the
    G completions of its prompt, plus each completion's length in tokens."""
    cols = {k: [v for v in values for _ in range(group_size)] for k, values in batch.items() if k not in SKIP_COLUMNS}
    cols["completion_lengths"] = [int(n) for n in completion_lengths]
    return cols


class RewardSet:
    """The configured reward functions, their weights and an error policy.

    fns: config entries (names, `pkg.mod:fn`, `name(k=v)`, mappings) or callables.
    weights: one per function (default all 1).
    context: factory defaults such as `group_size`, `max_completion_len`.
    executor: a shared executor; otherwise the set owns a ThreadPoolExecutor of
      `num_workers` threads (0: score inline in the caller's thread).
    """

    def __init__(
        self,
        fns: Sequence[Any],
        weights: Optional[Sequence[float]] = None,
        on_error: OnError = "stop",
        num_workers: int = 4,
        executor: Optional[Executor] = None,
        context: Optional[Mapping[str, Any]] = None,
    ):
        if on_error not in ON_ERROR:
            raise RewardError(f"on_error must be 'stop' or 'none', got {on_error!r}")
        if not fns:
            raise RewardError("no reward functions configured")
        self.fns = [get_reward(f, context) for f in fns]
        names = [reward_name(f) for f in self.fns]
        self.names = _dedupe(names)
        if weights is None or len(weights) == 0:
            weights = [1.0] * len(self.fns)
        if len(weights) != len(self.fns):
            raise RewardError(f"got {len(weights)} reward weights for {len(self.fns)} reward functions "
                              f"({', '.join(self.names)})")
        self.weights = np.asarray(weights, dtype=np.float32)
        self.on_error: OnError = on_error
        self.device_index = [k for k, f in enumerate(self.fns) if is_device_reward(f)]
        self.host_index = [k for k, f in enumerate(self.fns) if not is_device_reward(f)]
        self._own_executor = executor is None and num_workers > 0
        self._num_workers = num_workers
        self._executor: Optional[Executor] = executor
        self._device_fn_jit: Optional[Callable] = None

    @classmethod
    def from_config(cls, cfg) -> "RewardSet":
        """The rewards section of a run config (`grpo_jax.config.Config`)."""
        return cls(cfg.rewards.functions, cfg.rewards.weights or None, on_error=cfg.rewards.on_error,
                   num_workers=cfg.rewards.num_workers,
                   context={"group_size": cfg.rollout.group_size,
                            "max_completion_len": cfg.rollout.max_completion_length})

    # -- executor -------------------------------------------------------------
    @property
    def executor(self) -> Optional[Executor]:
        if self._executor is None and self._own_executor:
            self._executor = ThreadPoolExecutor(max_workers=self._num_workers, thread_name_prefix="reward")
        return self._executor

    def close(self) -> None:
        if self._own_executor and self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def __enter__(self) -> "RewardSet":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- device rewards ---------------------------------------------------------
    @property
    def has_device_rewards(self) -> bool:
        return bool(self.device_index)

    def device_fn(self) -> Optional[Callable]:
        """Jittable `(completion_ids[B,N], completion_mask[B,N], **arrays) -> f32[B, num_device_fns]`
        in the order of `device_index`; None when no device rewards are configured."""
        if not self.device_index:
            return None
        fns = [self.fns[k] for k in self.device_index]

        def device_rewards(completion_ids, completion_mask, **arrays):
            cols = []
            for fn in fns:
                r = fn(completion_ids, completion_mask, **select_columns(fn, arrays))
                cols.append(jnp.asarray(r, jnp.float32).reshape(completion_ids.shape[0]))
            return jnp.stack(cols, axis=1)

        return device_rewards

    def _device_values(self, n: int, device_values, completion_ids, completion_mask, arrays) -> np.ndarray:
        if device_values is None:
            if completion_ids is None or completion_mask is None:
                names = [self.names[k] for k in self.device_index]
                raise RewardError(
                    f"device rewards {names} need device_values or completion_ids and completion_mask"
                )
            if self._device_fn_jit is None:
                self._device_fn_jit = jax.jit(self.device_fn())
            device_values = self._device_fn_jit(completion_ids, completion_mask, **(arrays or {}))
        values = np.asarray(device_values, dtype=np.float32)
        if values.ndim == 1:
            values = values[:, None]
        if values.shape != (n, len(self.device_index)):
            raise RewardError(
                f"device rewards have shape {values.shape}, expected ({n}, {len(self.device_index)})"
            )
        return values

    # -- scoring ----------------------------------------------------------------
    def score_groups(self, prompts: Sequence[str], completions: Sequence[str], rows: Mapping[str, Sequence],
                     group_size: int, completion_ids: Any, completion_mask: Any) -> RewardResult:
        """Score `group_size` completions of each prompt (prompt p's at p*G .. p*G+G-1), waiting for the result:
        each prompt's text and dataset columns (`rows`, a data batch) repeated for its completions."""
        texts = [t for t in prompts for _ in range(group_size)]
        columns = reward_columns(rows, group_size, np.asarray(completion_mask).sum(axis=1))
        return self.submit(texts, completions, columns, completion_ids=completion_ids,
                           completion_mask=completion_mask).result()

    def submit(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        columns: Optional[Mapping[str, Any]] = None,
        *,
        device_values: Any = None,
        completion_ids: Any = None,
        completion_mask: Any = None,
        arrays: Optional[Mapping[str, Any]] = None,
    ) -> "Future[RewardResult]":
        """Start scoring; returns a Future of RewardResult (raises RewardError from `.result()`).

        columns: dataset columns, each a list aligned with `completions`.
        device_values: f32[n, num_device_fns] already computed on the device; else the
          device rewards run (jitted) here on completion_ids / completion_mask / arrays.
        """
        cols = _validate_inputs(prompts, completions, columns)
        n = len(completions)
        executor = self.executor
        futures: list[Future] = []
        for k in self.host_index:
            futures.append(
                _run(executor, call_host_reward, self.fns[k], prompts, completions, cols, self.on_error, self.names[k])
            )
        if self.device_index:
            futures.append(
                _run(executor, self._device_values, n, device_values, completion_ids, completion_mask, arrays)
            )

        def combine(results: list[Any]) -> RewardResult:
            matrix = np.full((n, len(self.fns)), np.nan, dtype=np.float32)
            errors = {name: 0 for name in self.names}
            for j, k in enumerate(self.host_index):
                values, num_errors = results[j]
                matrix[:, k] = values
                errors[self.names[k]] = int(num_errors)
            if self.device_index:
                matrix[:, self.device_index] = results[-1]
            return make_result(self.names, self.weights, matrix, errors)

        return _gather(futures, combine)

    def __call__(self, prompts, completions, columns=None, **kwargs) -> RewardResult:
        """Score synchronously (see `submit`)."""
        return self.submit(prompts, completions, columns, **kwargs).result()

    compute = __call__


def make_result(names: Sequence[str], weights: np.ndarray, matrix: np.ndarray,
                errors: Optional[dict] = None) -> RewardResult:
    matrix = np.asarray(matrix, dtype=np.float32)
    weights = np.asarray(weights, dtype=np.float32)
    total = np.nansum(matrix * weights[None, :], axis=1).astype(np.float32)
    means = {name: _nanmean(matrix[:, k]) for k, name in enumerate(names)}
    return RewardResult(list(names), weights, matrix, total, means, dict(errors or {}))


def _dedupe(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        if name in seen:
            seen[name] += 1
            out.append(f"{name}_{seen[name]}")
        else:
            seen[name] = 1
            out.append(name)
    return out


def compute_rewards(
    fns: Sequence[Any],
    weights: Optional[Sequence[float]],
    prompts: Sequence[str],
    completions: Sequence[str],
    columns: Optional[Mapping[str, Any]] = None,
    on_error: OnError = "stop",
    executor: Optional[Executor] = None,
    context: Optional[Mapping[str, Any]] = None,
    **device_kwargs: Any,
) -> RewardResult:
    """One-shot scoring: functions run in `executor` when given, else inline in this thread."""
    rs = RewardSet(fns, weights, on_error=on_error, num_workers=0, executor=executor, context=context)
    return rs.submit(prompts, completions, columns, **device_kwargs).result()
