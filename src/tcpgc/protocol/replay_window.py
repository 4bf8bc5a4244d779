"""Which POOL counters an LL has already accepted from one agent session (sans-I/O).

An agent numbers every ready data connection it offers (new ones and reused ones) and
proves each number with its session key, so a captured offer cannot be replayed. Offers
travel on different TCP connections and may arrive out of order, so instead of "higher
than the last one" the LL accepts a number it has not seen that is at most `WIDTH` below
the highest seen, as IPsec and DTLS do with their sequence numbers.
"""

from __future__ import annotations


class ReplayWindow:
    """Accepts each counter value once, within `width` of the highest accepted."""

    WIDTH = 256

    __slots__ = ("highest", "_seen", "width")

    def __init__(self, width: int = WIDTH) -> None:
        self.width = width
        self.highest = 0
        self._seen = 0  # bit i set: `highest - i` was accepted

    def accept(self, counter: int) -> bool:
        """True (and remembered) if `counter` is new and recent enough."""
        if counter <= 0:
            return False
        if counter > self.highest:
            shift = counter - self.highest
            # A jump past the window forgets it all: never shift by a huge amount.
            if shift >= self.width:
                self._seen = 1
            else:
                self._seen = ((self._seen << shift) | 1) & ((1 << self.width) - 1)
            self.highest = counter
            return True
        offset = self.highest - counter
        if offset >= self.width or self._seen >> offset & 1:
            return False
        self._seen |= 1 << offset
        return True
