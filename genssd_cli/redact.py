"""What genssd writes or prints of text it must not show as it is: credentials inside a URL (user
info, key-like query parameters) replaced by `***`, and text a server sent (model ids, error
messages, bodies) stripped of control characters and terminal escape sequences."""

from __future__ import annotations

import re

# `scheme://user:password@` (the password may hold an `@`: up to the last one before the path).
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/?#\s]*@")
# Query parameters that carry a credential, by the names services give them.
_QUERY_KEY = re.compile(
    r"(?P<name>[?&;](?:api[_-]?key|apikey|key|token|access[_-]?token|auth|password|passwd|secret|"
    r"client[_-]?secret|sig|signature)=)[^&#\s'\"]*",
    re.IGNORECASE,
)
# Terminal escape sequences: CSI (colours, clearing), OSC (window title, links; ended by BEL or
# ST), DCS/SOS/PM/APC strings, then any other two-character ESC sequence.
_ESCAPES = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]?|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[PX^_][^\x1b]*(?:\x1b\\)?|\x1b[ -~]?"
)
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_WHITESPACE = re.compile(r"[\t\n\r\v\f]")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def redact(text: str) -> str:
    """`text` with the credentials of every URL in it replaced: `https://***@host/v1?api_key=***`.
    Used for every URL genssd writes or prints; the request itself uses the real one."""
    return _QUERY_KEY.sub(r"\g<name>***", _USERINFO.sub(r"\g<scheme>***@", text))


def printable(text: str, lines: bool = False) -> str:
    """Server text safe for a terminal: escape sequences and control characters removed (tabs and
    line breaks become spaces, or are kept with `lines`)."""
    text = _ESCAPES.sub("", text)
    if not lines:
        text = _WHITESPACE.sub(" ", text)
    return _CONTROLS.sub(lambda m: m.group() if m.group() in "\n\t" else "", text)


def shown(text: str) -> str:
    """One line for the terminal or a log: credentials redacted, control characters removed."""
    return printable(redact(text))


def is_env_name(name: str) -> bool:
    """An environment variable's name (letters, digits, _; not a digit first)."""
    return _ENV_NAME.fullmatch(name) is not None


def looks_like_key(name: str) -> bool:
    """A value given where a variable's name belongs that looks like a key itself: not a name, or a
    long run of letters and digits without the underscores names have (`sk-…`, `AKIA…`, hex)."""
    if not is_env_name(name):
        return True
    return len(name) >= 20 and "_" not in name and any(c.isdigit() for c in name)
