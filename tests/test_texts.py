"""The bounded table of shared strings."""

from __future__ import annotations

from tcpgc import texts


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
