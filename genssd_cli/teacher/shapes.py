"""The shapes of what an OpenAI-compatible server sends that genssd reads: a completions or chat
completions reply, a 400's error body and the model list; and server text made fit to print.

Every byte a server sends is untrusted: a reply is validated once, where it arrives (endpoint.py),
and one of the wrong shape is a `malformed` fault (retried, never cached), never a traceback.
Lenient where the API is: fields genssd does not read may hold anything, optional ones may be
absent; strict on the ones it reads (a number is no text, a string no count, null no index).
"""

from __future__ import annotations

import unicodedata
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)

from genssd_cli.redact import printable


def _not_null(value: Any) -> Any:
    # An absent optional field takes its default unvalidated; an explicit null comes here.
    if value is None:
        raise ValueError("null where a value (or nothing) belongs")
    return value


Count = Annotated[StrictInt, Field(ge=0)]
OptionalCount = Annotated[Count | None, BeforeValidator(_not_null)]


class _Shape(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)  # the fields genssd does not read


class Usage(_Shape):
    """Its counts are judged where they are used (token_counts.usage_count): a count that is no count
    is treated as missing and counted from the logprobs or the tokenizer, not refused."""


class CompletionLogprobs(_Shape):
    """OpenAI's `tokens`, or llama-server's `content`: read by token_counts.listed_tokens."""


class CompletionChoice(_Shape):
    index: OptionalCount = None
    text: StrictStr
    finish_reason: StrictStr | None = None
    logprobs: CompletionLogprobs | None = None


class ChatMessage(_Shape):
    content: StrictStr | None = None
    reasoning_content: StrictStr | None = None  # a reasoning parser's thinking (vLLM, SGLang)
    reasoning: StrictStr | None = None  # the same, in newer vLLM


class ChatLogprobs(_Shape):
    """`content`: read by token_counts.listed_tokens."""


class ChatChoice(_Shape):
    index: OptionalCount = None
    message: ChatMessage
    finish_reason: StrictStr | None = None
    logprobs: ChatLogprobs | None = None


class _Reply(_Shape):
    usage: Usage | None = None

    @model_validator(mode="after")
    def _distinct_indices(self) -> _Reply:
        indices = [i for i, _ in self.numbered()]
        if len(set(indices)) < len(indices):
            raise ValueError(f"choice indices repeat: {indices[:8]}")
        return self

    def numbered(self) -> list[tuple[int, Any]]:
        """(index, choice): the index the server gave, else the choice's place in the list."""
        return [(i if c.index is None else c.index, c) for i, c in enumerate(self.choices)]  # type: ignore[attr-defined]

    def in_order(self) -> list:
        return [c for _, c in sorted(self.numbered(), key=lambda pair: pair[0])]


class Completion(_Reply):
    choices: list[CompletionChoice]


class ChatCompletion(_Reply):
    choices: list[ChatChoice]


class ErrorObject(_Shape):
    message: StrictStr | None = None


class ErrorBody(_Shape):
    """A 4xx body as the API sends it: `{"error": {"message": …}}` (or a bare string), or vLLM's
    older `{"message": …}` at the top."""

    error: StrictStr | ErrorObject | None = None
    message: StrictStr | None = None

    def text(self) -> str | None:
        if isinstance(self.error, ErrorObject):
            return self.error.message
        return self.error or self.message


class ModelEntry(_Shape):
    id: StrictStr


class ModelList(_Shape):
    data: list[ModelEntry]


def shape_error(exc: ValidationError) -> str:
    """What was wrong with a reply, in one short line: the first problems and where."""
    parts = [f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors()[:3]]
    return server_text("; ".join(parts), 200)


def server_text(value: object, limit: int = 200) -> str:
    """A server's text (an error message, a model id) fit for one line of a terminal or a log:
    escape sequences and control characters removed (redact.printable), format characters too
    (bidi overrides), runs of space folded, at most `limit` characters."""
    shown = printable(str(value)[: 4 * limit])  # enough to fill the line; never the whole of a huge body
    text = " ".join("".join(" " if unicodedata.category(ch)[0] in "CZ" else ch for ch in shown).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
