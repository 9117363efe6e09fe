"""Math answer accuracy: extract the final answer, compare with math-verify, fall back to exact match.

Answer extraction (`extract_answer`), first that applies:

1. the last ``<answer>...</answer>`` (if it contains ``\\boxed{}``, the box's content);
2. the last ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces handled);
3. the rest of the line after the last ``#### `` (GSM8K);
4. the last number in the text (``-1,234.5``, ``3/4``) -- completions only.

References (the ``answer`` column, or ``solution`` as open-r1 names it) go
through steps 1-3 and otherwise are used whole, so ``"#### 72"`` -> ``72`` and
``"x^2+1"`` stays ``x^2+1``.

Comparison: `math_verify.verify(parse(ref), parse(pred))` on the extracted
strings (wrapped in ``\\boxed{}``), OR an exact match after normalisation
(``$``, commas, ``\\text{}``, ``%``, trailing ``.``; numbers compared as exact
fractions, so ``18.0 == 18`` and ``\\frac{1}{2} == 1/2 == 0.5``). The exact
match alone is used when math-verify is not installed, or raises.

Running math-verify from reward worker threads: its timeouts use SIGALRM,
which only works in a main thread, and sympy can hang for good on answers like
``9^{9^{9^9}}`` (big-integer arithmetic in C ignores signals). So by default
(`MathVerifySettings.mode = "subprocess"`) comparisons run in a small pool of
child processes (`_mv_worker.py`, one per thread verifying at once): there
math-verify keeps its own timeout, the parent kills a child that overruns it,
an address-space cap stops runaway allocations, and the GIL is not shared.
"inline" runs in this process (timeout only in the main thread); "off" uses
exact matching only; see `configure_math_verify`. Answers longer than
`MAX_VERIFY_CHARS` are compared by exact match only.
"""

from __future__ import annotations

import atexit
import dataclasses
import importlib.util
import json
import logging
import math
import os
import re
import select
import subprocess
import sys
import threading
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Optional, Sequence

from grpo_jax.rewards.registry import register

log = logging.getLogger(__name__)

MAX_VERIFY_CHARS = 512
"""Answers (prediction or reference) longer than this are compared by exact match only."""

# ---------------------------------------------------------------------------
# Extraction

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_BOX_START = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BOX_SPACE = re.compile(r"\\boxed +([^\s$]+)")
_HASHES = re.compile(r"####\s*([^\n]*)")
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?(?:\s*/\s*\d+)?")


def last_boxed(text: str) -> Optional[str]:
    """Content of the last ``\\boxed{...}`` (nested braces) or ``\\boxed 5``; None if absent/unclosed."""
    if not text:
        return None
    starts = list(_BOX_START.finditer(text))
    for m in reversed(starts):
        depth, i = 1, m.end()
        while i < len(text):
            c = text[i]
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    return text[m.end() : i].strip()
            i += 1
    spaced = _BOX_SPACE.findall(text)
    if spaced:
        return spaced[-1].strip()
    return None


def answer_tag(text: str) -> Optional[str]:
    """Stripped content of the last ``<answer>...</answer>``, or None."""
    found = _ANSWER_TAG.findall(text or "")
    return found[-1].strip() if found else None


def last_number(text: str) -> Optional[str]:
    found = _NUMBER.findall(text or "")
    return found[-1].replace(" ", "") if found else None


def extract_answer(text: Optional[str], last_number_fallback: bool = True) -> Optional[str]:
    """The final answer in `text` (see module docstring), or None if there is none."""
    if text is None:
        return None
    text = str(text)
    tagged = answer_tag(text)
    if tagged is not None:
        boxed = last_boxed(tagged)
        if boxed is not None:
            return boxed or None
        return tagged or None
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed or None
    hashes = _HASHES.findall(text)
    if hashes:
        return hashes[-1].strip() or None
    if last_number_fallback:
        return last_number(text)
    stripped = text.strip()
    return stripped or None


def extract_reference(ref: Any) -> Optional[str]:
    """The reference answer from a dataset cell (GSM8K ``... #### 72`` -> ``72``); None if missing."""
    if ref is None:
        return None
    if isinstance(ref, float) and ref != ref:  # NaN cell from pandas
        return None
    if isinstance(ref, (list, tuple)):  # some datasets store a list of accepted answers
        ref = ref[0] if ref else None
        return extract_reference(ref)
    return extract_answer(str(ref), last_number_fallback=False)


# ---------------------------------------------------------------------------
# Exact comparison

_TEXT_CMD = re.compile(r"\\(?:text|textbf|mathrm|mbox)\s*\{([^{}]*)\}")
_FRAC = re.compile(r"^(-?)\\frac\{([^{}]+)\}\{([^{}]+)\}$")
_FRAC_SHORT = re.compile(r"^(-?)\\frac(\d)(\d)$")
_THOUSANDS = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")


def normalize_answer(s: Optional[str]) -> str:
    """Canonical text of an answer for exact comparison."""
    if s is None:
        return ""
    s = str(s).strip()
    boxed = last_boxed(s)
    if boxed is not None:
        s = boxed
    s = _TEXT_CMD.sub(r"\1", s)
    for a, b in (("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\left", ""), ("\\right", ""),
                 ("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\ ", ""), ("\\$", ""), ("$", ""),
                 ("\\%", ""), ("%", ""), ("^\\circ", ""), ("^{\\circ}", "")):
        s = s.replace(a, b)
    s = re.sub(r"\s+", "", s)
    s = s.rstrip(".")
    if s.startswith("{") and s.endswith("}") and s.count("{") == 1:
        s = s[1:-1]
    return s.lower()


def to_fraction(s: str) -> Optional[Fraction]:
    """A normalised answer as an exact number, or None if it is not one."""
    if not s:
        return None
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    m = _FRAC.match(s) or _FRAC_SHORT.match(s)
    if m:
        num, den = to_fraction(m.group(2)), to_fraction(m.group(3))
        if num is None or den is None or den == 0:
            return None
        value = num / den
        return -value if m.group(1) else value
    if s.count("/") == 1:
        a, b = s.split("/")
        num, den = to_fraction(a), to_fraction(b)
        if num is None or den is None or den == 0:
            return None
        return num / den
    if not re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)(e[-+]?\d+)?", s):
        return None
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def exact_match(pred: Optional[str], ref: Optional[str]) -> bool:
    """Exact match after normalisation; numbers compare as fractions (18.0 == 18, 0.5 == 1/2)."""
    a, b = normalize_answer(pred), normalize_answer(ref)
    if not a or not b:
        return False
    fa, fb = to_fraction(a), to_fraction(b)
    if fa is not None and fb is not None:
        return fa == fb
    return a == b


# ---------------------------------------------------------------------------
# math-verify


@dataclass
class MathVerifySettings:
    mode: str = "subprocess"
    """"subprocess": a pool of child processes (hard timeout, memory cap, no GIL);
    "inline": in this process (SIGALRM timeout in the main thread, none in others);
    "off": exact matching only."""
    timeout_s: float = 5.0
    """Per comparison; a subprocess that overruns it (plus 2 s grace) is killed and restarted."""
    max_workers: int = 4
    """Most child processes (one per thread verifying at the same time)."""
    memory_limit_gb: float = 4.0
    """Address-space limit of each child (0: none)."""


SETTINGS = MathVerifySettings()


def configure_math_verify(**changes: Any) -> MathVerifySettings:
    """Change how math-verify runs (see MathVerifySettings); returns the previous settings."""
    global SETTINGS, _POOL
    previous = SETTINGS
    if changes.get("mode", previous.mode) not in ("subprocess", "inline", "off"):
        raise ValueError(f"math-verify mode must be subprocess, inline or off, got {changes['mode']!r}")
    SETTINGS = dataclasses.replace(previous, **changes)
    pool_settings = lambda s: (s.max_workers, s.memory_limit_gb)
    if _POOL is not None and pool_settings(SETTINGS) != pool_settings(previous):
        _POOL.close()
        _POOL = None
    return previous


class _DropTimeoutWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


_MV: Any = None
_MV_LOCK = threading.Lock()


def _math_verify() -> Any:
    """(parse, verify, extraction_config) in this process, or False when not installed."""
    global _MV
    if _MV is None:
        with _MV_LOCK:
            if _MV is None:
                try:
                    import math_verify
                    from math_verify import ExprExtractionConfig, LatexExtractionConfig

                    for name in ("math_verify.parser", "math_verify.grader"):
                        logging.getLogger(name).addFilter(_DropTimeoutWarning())
                    _MV = (math_verify.parse, math_verify.verify, [LatexExtractionConfig(), ExprExtractionConfig()])
                except Exception as e:  # ImportError or a broken install
                    log.info("math-verify unavailable (%s); accuracy uses exact matching", e)
                    _MV = False
    return _MV


def math_verify_available() -> bool:
    """math-verify is installed and not switched off."""
    return SETTINGS.mode != "off" and importlib.util.find_spec("math_verify") is not None


def _verify_inline(pred: str, ref: str) -> Optional[bool]:
    mv = _math_verify()
    if not mv:
        return None
    parse, verify, config = mv
    # SIGALRM timeouts work only in the main thread; elsewhere math-verify must run without.
    main = threading.current_thread() is threading.main_thread()
    timeout = max(1, math.ceil(SETTINGS.timeout_s)) if main else None
    try:
        gold = parse("\\boxed{" + ref + "}", extraction_config=config, parsing_timeout=timeout)
        answer = parse("\\boxed{" + pred + "}", extraction_config=config, parsing_timeout=timeout)
        if not gold or not answer:
            return None
        return bool(verify(gold, answer, timeout_seconds=timeout))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 - math-verify's TimeoutException is a BaseException
        log.debug("math-verify failed on %r vs %r: %s", pred, ref, e)
        return None


class _Unavailable(RuntimeError):
    pass


class _Worker:
    """One child process running _mv_worker.py."""

    def __init__(self, memory_limit_gb: float, start_timeout_s: float = 120.0):
        limit = int(memory_limit_gb * (1 << 30)) if memory_limit_gb > 0 else 0
        self.proc = subprocess.Popen(
            [sys.executable, "-u", _WORKER_SCRIPT, str(limit)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True,
        )
        line = self.readline(start_timeout_s)
        ready = json.loads(line) if line else {"ready": False, "error": "no answer"}
        if not ready.get("ready"):
            self.kill()
            raise _Unavailable(f"math-verify worker did not start: {ready.get('error')}")

    def readline(self, timeout_s: float) -> Optional[bytes]:
        assert self.proc.stdout is not None
        readable, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        if not readable:
            return None
        line = self.proc.stdout.readline()
        return line or None  # b"": the child died

    def verify(self, pred: str, ref: str, timeout_s: float) -> tuple[Optional[bool], bool]:
        """-> (verdict, worker still usable)."""
        assert self.proc.stdin is not None
        request = {"pred": pred, "ref": ref, "timeout": max(1, math.ceil(timeout_s))}
        try:
            self.proc.stdin.write((json.dumps(request) + "\n").encode())
            self.proc.stdin.flush()
            line = self.readline(timeout_s + 2.0)
        except (OSError, ValueError):
            return None, False
        if line is None:
            return None, False
        try:
            return json.loads(line)["ok"], True
        except (ValueError, KeyError, TypeError):
            return None, False

    def kill(self) -> None:
        try:
            self.proc.kill()
            self.proc.wait(timeout=5)
        except Exception:  # noqa: BLE001
            pass
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                if stream is not None:
                    stream.close()
            except Exception:  # noqa: BLE001
                pass


class _WorkerPool:
    def __init__(self) -> None:
        self.pid = os.getpid()
        self.idle: list[_Worker] = []
        self.workers: set[_Worker] = set()
        self.starting = 0
        self.cond = threading.Condition()
        self.broken: Optional[str] = None

    def _acquire(self) -> _Worker:
        with self.cond:
            while True:
                if self.broken:
                    raise _Unavailable(self.broken)
                if self.idle:
                    return self.idle.pop()
                if len(self.workers) + self.starting < max(1, SETTINGS.max_workers):
                    self.starting += 1
                    break
                self.cond.wait()
        try:
            worker = _Worker(SETTINGS.memory_limit_gb)
        except Exception as e:  # noqa: BLE001
            with self.cond:
                self.starting -= 1
                self.broken = str(e) if isinstance(e, _Unavailable) else f"math-verify worker failed to start: {e}"
                self.cond.notify_all()
            raise _Unavailable(self.broken) from None
        with self.cond:
            self.starting -= 1
            self.workers.add(worker)
        return worker

    def _release(self, worker: _Worker, keep: bool) -> None:
        if not keep:
            worker.kill()
        with self.cond:
            if keep:
                self.idle.append(worker)
            else:
                self.workers.discard(worker)
            self.cond.notify()

    def verify(self, pred: str, ref: str, timeout_s: float) -> Optional[bool]:
        worker = self._acquire()
        verdict, keep = None, False
        try:
            verdict, keep = worker.verify(pred, ref, timeout_s)
            if not keep:
                log.warning("math-verify took over %.0f s (or died) on %r vs %r; worker restarted",
                            timeout_s, pred[:100], ref[:100])
            return verdict
        finally:
            self._release(worker, keep)

    def close(self) -> None:
        with self.cond:
            workers, self.idle, self.workers = list(self.workers), [], set()
        for w in workers:
            w.kill()


_WORKER_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_mv_worker.py")
_POOL: Optional[_WorkerPool] = None
_POOL_LOCK = threading.Lock()


def _pool() -> _WorkerPool:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL.pid != os.getpid():  # a forked child starts its own pool
            _POOL = _WorkerPool()
        return _POOL


@atexit.register
def _close_pool() -> None:
    if _POOL is not None and _POOL.pid == os.getpid():
        _POOL.close()


_warned_inline = False


def math_verify_match(pred: str, ref: str) -> Optional[bool]:
    """math-verify's verdict on two extracted answers; None when it is off, unavailable or fails.

    Safe in any thread (see MathVerifySettings.mode).
    """
    global _warned_inline
    if SETTINGS.mode == "off" or not pred or not ref:
        return None
    if len(pred) > MAX_VERIFY_CHARS or len(ref) > MAX_VERIFY_CHARS:
        return None
    if SETTINGS.mode == "subprocess" and os.name == "posix":
        try:
            return _pool().verify(pred, ref, SETTINGS.timeout_s)
        except _Unavailable as e:
            if not _warned_inline:
                _warned_inline = True
                log.warning("%s; running math-verify in-process instead", e)
    return _verify_inline(pred, ref)


def answers_match(pred: Optional[str], ref: Optional[str]) -> bool:
    """True if the extracted prediction equals the extracted reference (math-verify or exact)."""
    if not pred or not ref:
        return False
    if exact_match(pred, ref):
        return True
    return bool(math_verify_match(pred, ref))


def is_correct(completion: str, reference: Any) -> Optional[bool]:
    """Is the completion's final answer the reference's? None when there is no reference."""
    ref = extract_reference(reference)
    if ref is None:
        return None
    return answers_match(extract_answer(completion), ref)


def references_from(columns: dict, n: int) -> Sequence[Any]:
    """The reference column: `answer`, else `solution`, else all None."""
    for key in ("answer", "solution"):
        if columns.get(key) is not None:
            return columns[key]
    return [None] * n


@register("accuracy")
def accuracy(prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> list[Optional[float]]:
    """1.0 if the final answer matches the `answer` (or `solution`) column, else 0.0; None without one."""
    refs = references_from(columns, len(completions))
    out: list[Optional[float]] = []
    for completion, ref in zip(completions, refs):
        ok = is_correct(completion, ref)
        out.append(None if ok is None else float(ok))
    return out
