"""A teacher reply's token counts, each choice's and the whole: from the server's bill (usage), the
tokens it listed per choice (logprobs), or the teacher's tokenizer; and what was wrong with the bill
(missing, fewer tokens than the choices hold, or nothing to check it against), with the one line a
run warns with. Kept apart from endpoint.py (the HTTP side): counting is where cost comes from."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from genssd_cli.rundir.records import TokenSource

# A bill below this share of the tokens its choices hold covers fewer choices than were sent
# (llama.cpp's llama-server bills about one of n); a tokenizer's count is close, never this far off.
UNDERBILLED = 0.75


class Counted(NamedTuple):
    """A reply's completion tokens: each choice's, where they came from, the reply's total (the
    bill, or the choices' own counts where the bill is missing or too small), and what was wrong
    with the bill: `missing` (no usage), `underbilled` (fewer tokens than the choices hold),
    `unchecked` (several choices and nothing to check the bill against: split evenly)."""

    tokens: list[int]
    source: TokenSource
    total: int
    problem: str | None = None


def usage_count(usage: object, field: str) -> int | None:
    """A usage count the server sent: a non-negative integer, else none (null, negative, 3.5,
    "7", true: a count that cannot be trusted is treated as missing)."""
    value = getattr(usage, field, None) if usage is not None else None
    return value if type(value) is int and value >= 0 else None


def listed_tokens(logprobs: object) -> int | None:
    """How many tokens a choice's logprobs list: OpenAI's `tokens` (completions) or `content`
    (chat, and llama.cpp's llama-server in completions too); None when there is no such list."""
    if logprobs is None:
        return None
    extra = getattr(logprobs, "model_extra", None) or {}
    for field in ("tokens", "content"):
        value = getattr(logprobs, field, None)
        value = extra.get(field) if value is None else value
        if isinstance(value, list):
            return len(value)
    return None


def per_choice_tokens(
    billed: int | None, listed: list[int | None], texts: list[str], count_tokens: Callable[[str], int] | None
) -> Counted:
    """Each choice's completion tokens, and where they came from. One choice: the bill itself.
    Several: the tokens the server listed per choice (logprobs) when they add up to the bill, or
    when the bill is far below them (a server that bills one choice of n: the lists are what it
    generated); else the teacher's tokenizer on each text, when known (close, not exact: the
    server may count an end token or tokenize across the seam); else the bill split evenly,
    which nothing checks. No bill (no usage, or a count that is no count): the lists, else the
    tokenizer, else nothing (`none`, 0 tokens)."""
    n = len(texts)
    known = [count for count in listed if count is not None]
    known = known if len(known) == n else None
    if billed is None:
        if known is not None:
            return Counted(known, "logprobs", sum(known), "missing")
        if count_tokens is not None:
            counts = [count_tokens(text) for text in texts]
            return Counted(counts, "tokenizer", sum(counts), "missing")
        return Counted([0] * n, "none", 0, "missing")
    if n == 1:
        return Counted([billed], "usage", billed)
    if known is not None and sum(known) == billed:
        return Counted(known, "logprobs", billed)
    if known is not None and billed < UNDERBILLED * sum(known):
        return Counted(known, "logprobs", sum(known), "underbilled")
    if count_tokens is not None:
        counts = [count_tokens(text) for text in texts]
        if billed < UNDERBILLED * sum(counts):
            return Counted(counts, "tokenizer", sum(counts), "underbilled")
        return Counted(counts, "tokenizer", billed)
    return Counted([billed // n] * n, "split", billed, "unchecked")


def token_warning(counted: Counted, name: str, tokenizer: bool) -> str:
    """The one line a run warns with, the first time a bill is missing, too small or unchecked."""
    fix = ("set prompts.teacher_chat_template to the teacher's tokenizer (genssd counts with it), or serve "
           "logprobs (teacher.logprobs: true)")  # fmt: skip
    if counted.problem == "missing" and not tokenizer:
        counted_how = "completion tokens from the logprobs, " if counted.source == "logprobs" else ""
        return (f"teacher {name} sends no usage (token counts): {counted_how}prompt tokens and the cost are "
                f"unknown (counted as 0; summary.json marks them approximate); {fix}")  # fmt: skip
    if counted.problem == "missing":
        return f"teacher {name} sends no usage (token counts): genssd counts them with the teacher's tokenizer"
    if counted.problem == "underbilled":
        return (f"teacher {name} bills fewer completion tokens than its choices hold (about one choice of n): "
                f"genssd counts each choice from the {counted.source}, and the cost from those counts")  # fmt: skip
    return (f"teacher {name} lists no tokens per choice that add up to its bill: each response's bill is split "
            "evenly among its choices, unchecked (a server that bills one choice of n makes it n times too low): "
            f"teacher tokens, kept lengths and cost are approximate (summary.json marks them); {fix}")  # fmt: skip
