"""Bandwidth as people write it ("50Mbit", "1Gbit", "800 kbit/s") and as tcpgc shows it.

Units are bits per second with SI prefixes, as network links are sold and as iperf3
reports: 1 Mbit = 1,000,000 bits. Bytes are not accepted, so "50M" is never read
eight times wrong.
"""

from __future__ import annotations

import re

_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_RATE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:bit(?:/s)?|bps)\s*", re.IGNORECASE)

#: Below this a limit would stall interactive use (one 1500-byte packet per 100 ms).
MIN_RATE = 8_000 * 15


def rate_problem(text: object) -> str | None:
    """Why `text` is not a rate, or None."""
    if not isinstance(text, str) or (match := _RATE.fullmatch(text)) is None:
        return f'expected a rate such as "50Mbit" or "1Gbit" (bits per second), got {text!r}'
    bits = float(match[1]) * _UNITS[match[2].lower()]
    if bits < MIN_RATE:
        return f"{text!r} is below the smallest rate, {format_rate(MIN_RATE)}"
    return None


def parse_rate(text: str) -> int:
    """Bits per second; ValueError (with the message `rate_problem` gives) if invalid."""
    problem = rate_problem(text)
    if problem is not None:
        raise ValueError(problem)
    match = _RATE.fullmatch(text)
    assert match is not None
    return int(float(match[1]) * _UNITS[match[2].lower()])


def format_rate(bits_per_second: float) -> str:
    """'80 Mbit/s', '1.5 Gbit/s', '120 kbit/s'."""
    for prefix, size in (("G", 10**9), ("M", 10**6), ("k", 10**3)):
        if bits_per_second >= size:
            return f"{bits_per_second / size:.4g} {prefix}bit/s"
    return f"{bits_per_second:.0f} bit/s"
