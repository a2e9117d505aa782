"""Final-answer extraction and equivalence.

Fast path: plain numbers compared exactly (fractions, decimals, thousands separators, `$`,
`\\$`, `%`, trailing units). Anything else goes to math-verify, run in a worker process with a
hard timeout because it relies on `signal.alarm` (useless off the main thread) and can hang on
pathological LaTeX.
"""

from __future__ import annotations

import multiprocessing
import re
import threading
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from fractions import Fraction
from typing import Any

_BOXED = "\\boxed{"
# `\s*:?\s*` would split a long run of blank lines between two `\s*` in every way (quadratic);
# `(?:\s*:)?\s*` reads the same texts, splitting only at a colon.
_ANSWER_IS = re.compile(r"answer\s*(?:is|:)(?:\s*:)?\s*([^\n]+)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")
# A number (thousands separators, decimals, a fraction) and trailing units: the same strings as
# `-?[\d,]*\.?\d+`, but that form backtracked over every split of a long run of digits between
# `[\d,]*` and `\d+` (16,000 digits that then failed took 34 s); with the dot or the last digit
# fixed, a failure is found in linear time.
_PLAIN_NUMBER = re.compile(r"(-?(?:[\d,]*\.\d+|[\d,]*\d)(?:/\d+)?)\s*[A-Za-z ]*")


def extract_answer(text: str, explicit: bool = False) -> str | None:
    """The last `\\boxed{}`, else the text after the last `####`, else after 'the answer is',
    else (unless `explicit`: only a stated answer counts) the last number in the text. A
    training trace must state its answer; the fallback is for evaluating base models, which
    often do not follow the answer format."""
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    if "####" in text:
        tail = text.rpartition("####")[2].strip().splitlines()
        if tail and tail[0].strip():
            return tail[0].strip()
    matches = _ANSWER_IS.findall(text)
    if matches:
        # "The answer is 18 - 4 = 14 cookies." -> the value after the last '='.
        return matches[-1].rpartition("=")[2].strip().rstrip(".").strip()
    if explicit:
        return None
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def answer_statement_start(text: str) -> int | None:
    """Where the sentence stating the answer (what `extract_answer(text, explicit=True)` reads)
    begins, None when the text states none: what comes before it is the rationale."""
    boxed, hashes = text.rfind(_BOXED), text.rfind("####")
    stated = [m.start() for m in _ANSWER_IS.finditer(text)]
    if boxed >= 0 and _last_boxed(text) is not None:
        at = boxed
    elif hashes >= 0 and text[hashes + 4 :].strip():
        return hashes
    elif stated:
        at = stated[-1]
    else:
        return None
    start = max(text.rfind(mark, 0, at) for mark in (".", "!", "?", "\n")) + 1
    return start + len(text[start:at]) - len(text[start:at].lstrip())


def _last_boxed(text: str) -> str | None:
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    depth, i = 1, start + len(_BOXED)
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None


def to_number(text: str) -> Fraction | None:
    """A plain numeric answer as an exact Fraction, or None when it is not plainly numeric."""
    s = text.strip().replace("\\$", "").replace("$", "").replace("\\%", "%").replace("\\!", "")
    s = re.sub(r"^\\text\{(.*)\}$", r"\1", s).strip().rstrip(".").strip()
    percent = s.endswith("%")
    s = s.rstrip("%").strip()
    match = _PLAIN_NUMBER.fullmatch(s)
    if not match:
        frac = re.fullmatch(r"(-?)\\d?frac\{(-?\d+)\}\{(\d+)\}", s)
        if not frac or int(frac.group(3)) == 0:
            return None
        value = Fraction(int(frac.group(2)), int(frac.group(3)))
        return -value if frac.group(1) else value
    number = match.group(1).replace(",", "")
    try:
        value = Fraction(number)
    except (ValueError, ZeroDivisionError):
        return None
    return value / 100 if percent else value


def answers_match(reference: str, predicted: str | None, timeout_s: float = 5.0) -> bool:
    if predicted is None or not predicted.strip():
        return False
    ref, pred = to_number(reference), to_number(predicted)
    if ref is not None and pred is not None:
        # A percent may be meant as its bare number: GSM8K's gold "50" for "50%".
        return bool(_readings(reference, ref) & _readings(predicted, pred))
    return _math_verify(reference, predicted, timeout_s)


def _readings(text: str, value: Fraction) -> set[Fraction]:
    return {value, value * 100} if text.strip().rstrip(".").endswith("%") else {value}


# One worker process shared by every thread's checks. A check that times out kills it (it may be
# stuck for good); the checks queued behind it then see a broken pool and are asked again on a fresh
# one, so one pathological answer never fails another thread's check.
_pool: ProcessPoolExecutor | None = None
_pool_lock = threading.Lock()
_ATTEMPTS = 3  # a check asked again at most this often when other checks' timeouts broke its pool


def _math_verify(reference: str, predicted: str, timeout_s: float) -> bool:
    return bool(run_isolated(_verify_worker, (reference, predicted), timeout_s, default=False))


def run_isolated(function: Callable[..., Any], args: tuple, timeout_s: float, default: Any) -> Any:
    """`function(*args)` in the shared worker process, or `default` when it takes over `timeout_s`."""
    for _ in range(_ATTEMPTS):
        pool = _shared_pool()
        try:
            return pool.submit(function, *args).result(timeout=timeout_s)
        except FutureTimeout:
            _discard(pool)
            return default
        except (BrokenProcessPool, RuntimeError):  # killed for another check's timeout, or shut down
            _discard(pool)
    return default


def _shared_pool() -> ProcessPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        return _pool


def _discard(pool: ProcessPoolExecutor) -> None:
    """Kill `pool`'s worker (once, whoever asks first); the next check starts a fresh pool."""
    global _pool
    with _pool_lock:
        if _pool is not pool:
            return
        _pool = None
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        process.kill()
    pool.shutdown(wait=False, cancel_futures=True)


def _verify_worker(reference: str, predicted: str) -> bool:
    from math_verify import parse, verify

    clean = predicted.replace("\\$", "")
    gold = parse(reference if "$" in reference else f"${reference}$")
    pred = parse(clean if "$" in clean or "\\boxed" in clean else f"${clean}$")
    return bool(verify(gold, pred))  # gold first: verify is not symmetric
