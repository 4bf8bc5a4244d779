"""Secrets handed over in the environment, taken out of it once read.

Removing a variable from `os.environ` is not enough: the process's initial environment
block, which other processes of the same user (and `ps e`) read through
/proc/PID/environ, keeps the original string. So its value is also overwritten there.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path


def take_from_environment(name: str) -> str | None:
    """The value of `name`, which is then gone from this process's environment (and
    from what children it starts would inherit); None if it is not set."""
    value = os.environ.get(name)
    if value is None:
        return None
    _wipe_initial(name)
    os.environ.pop(name, None)  # unsetenv too: the entry is gone from `environ`
    return value


def _wipe_initial(name: str) -> None:
    """Zero the value of `name` where the kernel shows it, if it lies in the initial
    environment block (a value set later by the process lives elsewhere, in memory
    libc may still use: that is left alone). Best effort: Linux with glibc or musl."""
    try:
        start, end = _initial_block()
        libc = ctypes.CDLL(None)
        libc.getenv.restype = ctypes.c_void_p
        libc.getenv.argtypes = [ctypes.c_char_p]
        address = libc.getenv(os.fsencode(name))
        if not address:
            return
        length = len(ctypes.string_at(address))
        if start <= address and address + length <= end:
            ctypes.memset(address, 0, length)
    except (OSError, ValueError, AttributeError, IndexError):
        pass


def _initial_block() -> tuple[int, int]:
    """Where the initial environment block is (env_start and env_end of proc(5))."""
    text = Path("/proc/self/stat").read_text()
    fields = text.rsplit(")", 1)[1].split()  # from field 3 on: the name may hold spaces
    return int(fields[50 - 3]), int(fields[51 - 3])
