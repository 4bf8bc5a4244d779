"""Tasks are started through one helper that names them and keeps a reference: a bare
`create_task` can be garbage-collected mid-flight, and an unnamed crash is hard to place."""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger("tcpgc")

#: For done-callbacks that read no context variable. Without it asyncio copies the
#: current context for every callback, an object kept per relayed connection.
NO_CONTEXT = contextvars.Context()


class TaskSet:
    """A set of background tasks that are cancelled together on close."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error("internal error in %s: %r", task.get_name(), exc, exc_info=exc)

    async def close(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def __len__(self) -> int:
        return len(self._tasks)
