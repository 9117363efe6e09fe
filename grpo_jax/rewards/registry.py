"""Reward registry: names and `package.module:function` references -> reward callables.

A host reward function scores decoded text::

    fn(prompts: list[str], completions: list[str], **columns) -> list[float | None]

`columns` are dataset columns (e.g. `answer`), each a list aligned with
`completions`; None means "not applicable" and is left out of that function's
mean (it counts as 0 in the weighted sum). A function that does not take
`**kwargs` only receives the columns it names as parameters.

A device reward function scores token ids inside jit::

    fn(completion_ids: i32[B, N], completion_mask: [B, N], **arrays) -> f32[B]

and is marked with :func:`device_reward`.

A config entry (`rewards.functions` in YAML) is one of

- a registry name: ``accuracy``
- a registry name with keyword arguments for its factory: ``cosine(max_len=512)``
  (values are Python literals)
- an import reference ``package.module:function``; with keyword arguments,
  ``package.module:make_fn(k=1)`` calls ``make_fn(k=1)`` and uses what it returns
- a mapping ``{"name": "cosine", "max_len": 512}`` (the same as the call form).

Parameterised rewards are registered with :func:`register_factory`: the factory's
keyword arguments all have defaults, so the bare name works too. A `context`
(e.g. ``{"group_size": 8, "max_completion_len": 256}`` from the run config)
fills factory parameters of the same name that the entry does not set.
"""

from __future__ import annotations

import ast
import difflib
import functools
import importlib
import inspect
from typing import Any, Callable, Mapping, Optional

RewardFn = Callable[..., Any]


class RewardError(ValueError):
    """A reward that cannot be resolved or computed; the message is one line for the user."""


_FUNCTIONS: dict[str, RewardFn] = {}
_FACTORIES: dict[str, Callable[..., RewardFn]] = {}


def _check_free(name: str, overwrite: bool) -> None:
    if not overwrite and (name in _FUNCTIONS or name in _FACTORIES):
        raise RewardError(f"reward {name!r} is already registered")
    _FUNCTIONS.pop(name, None)
    _FACTORIES.pop(name, None)


def register(name: Optional[str] = None, *, overwrite: bool = False):
    """Decorator: register a reward function under `name` (default: its `__name__`)."""

    def deco(fn: RewardFn) -> RewardFn:
        key = name or fn.__name__
        _check_free(key, overwrite)
        _FUNCTIONS[key] = fn
        if getattr(fn, "reward_name", None) is None:
            _set_attr(fn, "reward_name", key)
        return fn

    return deco


def register_factory(name: str, *, overwrite: bool = False):
    """Decorator: register a factory `make(**kwargs) -> reward fn` under `name`.

    Every parameter of the factory must have a default: `get_reward(name)` calls
    it with none, `get_reward("name(k=v)")` with `k=v`.
    """

    def deco(factory: Callable[..., RewardFn]) -> Callable[..., RewardFn]:
        for p in inspect.signature(factory).parameters.values():
            if p.default is inspect.Parameter.empty and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                raise RewardError(f"factory for reward {name!r} needs a default for parameter {p.name!r}")
        _check_free(name, overwrite)
        _FACTORIES[name] = factory
        return factory

    return deco


def device_reward(fn: RewardFn) -> RewardFn:
    """Mark `fn(completion_ids, completion_mask, **arrays) -> f32[B]` as a jittable device reward."""
    _set_attr(fn, "is_device_reward", True)
    return fn


def is_device_reward(fn: RewardFn) -> bool:
    return bool(getattr(fn, "is_device_reward", False))


def _set_attr(fn: Any, key: str, value: Any) -> None:
    try:
        setattr(fn, key, value)
    except (AttributeError, TypeError):  # builtins, bound methods: leave as is
        pass


def _ensure_builtins() -> None:
    # The built-in reward modules register themselves on import.
    importlib.import_module("grpo_jax.rewards")


def available_rewards() -> list[str]:
    """Sorted registry names (functions and factories)."""
    _ensure_builtins()
    return sorted(set(_FUNCTIONS) | set(_FACTORIES))


# ---------------------------------------------------------------------------
# Parsing config entries


def parse_spec(spec: Any) -> tuple[str, dict[str, Any]]:
    """`"name"`, `"name(k=v, ...)"` or `{"name": ..., k: v}` -> (name, kwargs)."""
    if isinstance(spec, Mapping):
        if "name" not in spec:
            raise RewardError(f"reward entry {dict(spec)!r} has no 'name' key")
        kwargs = {str(k): v for k, v in spec.items() if k != "name"}
        return str(spec["name"]), kwargs
    if not isinstance(spec, str):
        raise RewardError(f"reward entry must be a string or a mapping, got {type(spec).__name__}: {spec!r}")
    text = spec.strip()
    if not text:
        raise RewardError("empty reward entry")
    if not text.endswith(")"):
        return text, {}
    head, _, args = text.partition("(")
    head = head.strip()
    try:
        call = ast.parse(f"f({args}", mode="eval").body
        if not isinstance(call, ast.Call) or call.args:
            raise ValueError("only keyword arguments are allowed, as in name(key=value)")
        kwargs = {}
        for kw in call.keywords:
            if kw.arg is None:
                raise ValueError("**kwargs is not allowed")
            kwargs[kw.arg] = ast.literal_eval(kw.value)
    except (SyntaxError, ValueError) as e:
        raise RewardError(f"cannot parse reward entry {spec!r}: {e}") from None
    if not head:
        raise RewardError(f"cannot parse reward entry {spec!r}: no name before '('")
    return head, kwargs


def _import_ref(ref: str) -> Any:
    module_name, _, attr = ref.partition(":")
    if not module_name or not attr:
        raise RewardError(f"reward reference {ref!r} must look like package.module:function")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or whatever the module raises at import
        reason = f"{type(e).__name__}: {e}".splitlines()[0]
        raise RewardError(f"cannot import reward {ref!r}: {reason}") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise RewardError(f"cannot import reward {ref!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise RewardError(f"reward {ref!r} is a {type(obj).__name__}, not a function")
    return obj


def _call_factory(name: str, factory: Callable[..., RewardFn], kwargs: dict, context: Mapping[str, Any]) -> RewardFn:
    sig = inspect.signature(factory)
    params = sig.parameters
    takes_var_kw = any(p.kind == p.VAR_KEYWORD for p in params.values())
    unknown = [k for k in kwargs if k not in params and not takes_var_kw]
    if unknown:
        variadic = (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
        valid = [p for p in params if params[p].kind not in variadic]
        near = difflib.get_close_matches(unknown[0], valid, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise RewardError(f"reward {name!r} has no parameter {unknown[0]!r} "
                          f"(parameters: {', '.join(valid) or 'none'}){hint}")
    full = {k: v for k, v in context.items() if k in params and k not in kwargs}
    full.update(kwargs)
    try:
        fn = factory(**full)
    except RewardError:
        raise
    except Exception as e:
        raise RewardError(f"reward {name!r} with {kwargs!r}: {type(e).__name__}: {e}".splitlines()[0]) from None
    if not callable(fn):
        raise RewardError(f"factory of reward {name!r} returned a {type(fn).__name__}, not a function")
    return fn


def get_reward(spec: Any, context: Optional[Mapping[str, Any]] = None) -> RewardFn:
    """Resolve a config entry (see module docstring) to a reward callable.

    A plain callable is returned unchanged. The result carries `reward_name`.
    Raises RewardError (one line) for unknown names, bad references and bad kwargs.
    """
    if callable(spec) and not isinstance(spec, (str, Mapping)):
        return spec
    context = dict(context or {})
    name, kwargs = parse_spec(spec)
    if ":" in name:
        obj = _import_ref(name)
        if kwargs:
            fn = _call_factory(name, obj, kwargs, {})
        else:
            fn = obj
        display = name.split(":", 1)[1].rsplit(".", 1)[-1]
    else:
        _ensure_builtins()
        if name in _FACTORIES:
            fn = _call_factory(name, _FACTORIES[name], kwargs, context)
        elif name in _FUNCTIONS:
            if kwargs:
                raise RewardError(f"reward {name!r} takes no parameters, got {sorted(kwargs)}")
            fn = _FUNCTIONS[name]
        else:
            names = available_rewards()
            near = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise RewardError(
                f"unknown reward {name!r}{hint} (available: {', '.join(names)}; "
                "or use package.module:function)"
            )
        display = name
    if getattr(fn, "reward_name", None) is None or kwargs or ":" in name:
        # Wrap to give the resolved function its own name without mutating shared objects.
        fn = _named(fn, display)
    return fn


def _named(fn: RewardFn, name: str) -> RewardFn:
    if getattr(fn, "reward_name", None) == name:
        return fn

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)

    wrapper.reward_name = name  # type: ignore[attr-defined]
    wrapper.is_device_reward = is_device_reward(fn)  # type: ignore[attr-defined]
    try:
        wrapper.__signature__ = inspect.signature(fn)  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        pass
    return wrapper


def reward_name(fn: RewardFn) -> str:
    return getattr(fn, "reward_name", None) or getattr(fn, "__name__", None) or type(fn).__name__
