"""The bounded table of shared strings."""

from __future__ import annotations

from tcpgc import safe_text as texts


def test_equal_texts_come_back_as_one_object() -> None:
    first = texts.shared("".join(["10.0.0.", "7"]))  # built at run time: not a constant
    again = texts.shared("".join(["10.0.0", ".7"]))
    assert again == "10.0.0.7" and again is first


def test_the_table_stays_bounded() -> None:
    """Peers choose these strings (client addresses, service names): however many
    distinct ones arrive, the table keeps at most LIMIT."""
    for n in range(texts.LIMIT * 3):
        texts.shared(f"2001:db8::{n:x}")
        assert len(texts._table) <= texts.LIMIT


def test_printable_keeps_one_line_one_line() -> None:
    forged = "down\r\n2026-01-01 00:00:00,000 INFO tcpgc.ll: forged\x1b[2J\u2028\x00"
    text = texts.printable(forged)
    assert text.isprintable() and "\n" not in text and "\x1b" not in text
    assert text == "down\\r\\n2026-01-01 00:00:00,000 INFO tcpgc.ll: forged\\x1b[2J\\u2028\\x00"
    plain = "cannot reach its server: connection refused (é)"
    assert texts.printable(plain) is plain
