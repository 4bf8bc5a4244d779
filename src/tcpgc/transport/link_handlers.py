"""What a `tcpgc.transport.link.Link` hands its events to: the handler interface, the
buffering handler every link starts with, and the handlers of links whose socket or
transport now belongs to someone else."""

from __future__ import annotations

import asyncio
from typing import Protocol

#: What the buffering handler holds before it stops reading: a client's first request
#: while it waits for an agent, or bytes that followed a frame. Bounded so a waiting
#: client cannot make us buffer without limit.
PREATTACH_LIMIT = 64 * 1024


class LinkHandler(Protocol):
    def on_data(self, data: bytes) -> None: ...
    def on_eof(self) -> None: ...
    def on_lost(self, exc: BaseException | None) -> None: ...
    def on_pause(self) -> None: ...
    def on_resume(self) -> None: ...


class Pausable(Protocol):
    """What the buffering handler needs of its link: a way to stop and resume reading."""

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...


class Buffering:
    """Holds events until a real handler is attached."""

    def __init__(self, link: Pausable, data: bytes = b"", eof: bool = False) -> None:
        self.link = link
        self.data = bytearray(data)
        self.eof = eof
        self.lost: tuple[BaseException | None] | None = None
        self.paused = False

    def on_data(self, data: bytes) -> None:
        self.data += data
        if len(self.data) >= PREATTACH_LIMIT and not self.paused:
            self.paused = True
            self.link.pause_reading()

    def on_eof(self) -> None:
        self.eof = True

    def on_lost(self, exc: BaseException | None) -> None:
        self.lost = (exc,)

    def on_pause(self) -> None:
        pass

    def on_resume(self) -> None:
        pass

    def replay(self, handler: LinkHandler) -> None:
        """Hand what was held to `handler`, the link's real handler from now on."""
        if self.paused:
            # Resumed before the replay: if the replay fills the new handler's peer,
            # flow control pauses the link again, and that pause must stand.
            self.link.resume_reading()
        if self.data:
            handler.on_data(bytes(self.data))
        if self.eof:
            handler.on_eof()
        if self.lost is not None:
            handler.on_lost(self.lost[0])


class Ignoring:
    """Handler that ignores everything: of a link whose socket now belongs to someone
    else, or whose relay is over while the link still drains."""

    def on_data(self, data: bytes) -> None:
        pass

    def on_eof(self) -> None:
        pass

    def on_lost(self, exc: BaseException | None) -> None:
        pass

    def on_pause(self) -> None:
        pass

    def on_resume(self) -> None:
        pass


class Retired(asyncio.Protocol):
    """Protocol of a transport a link has moved off: hears its end, does nothing."""
