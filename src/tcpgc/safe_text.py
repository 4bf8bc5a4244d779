"""Texts: one string object for those that repeat across many connections, and peer
text made safe for a log line."""

from __future__ import annotations

#: Distinct texts kept at most; past it the table starts again (it is only a cache).
LIMIT = 4096

_table: dict[str, str] = {}


def shared(text: str) -> str:
    """`text`, or an equal string seen before: thousands of held connections then share
    one copy of their peer's host or their service's name. A bounded table rather than
    `sys.intern`, because peers choose these strings, and on some Python versions
    (3.12.0 to 3.12.5) interned strings are never freed."""
    found = _table.get(text)
    if found is None:
        if len(_table) >= LIMIT:
            _table.clear()
        _table[text] = found = text
    return found


def printable(text: str) -> str:
    """`text` with control characters (newlines, escape sequences, other unprintable
    ones) escaped as Python does, for text a peer chose that goes into a log line: one
    event stays one line, and nothing can forge another or drive a terminal."""
    if text.isprintable():
        return text  # the common case: no copy
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
