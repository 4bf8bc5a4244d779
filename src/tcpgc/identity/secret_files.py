"""Files that hold secrets: written 0600 and atomically, given to the state dir's owner
when root writes them, and refused when other users can read them."""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from tcpgc.errors import UsageError


def write_private(path: Path, data: bytes) -> None:
    """Create `path` 0600 atomically; an existing file is never overwritten."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        _give_to_dir_owner(fd, path.parent)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # fails if another process created it first: theirs wins
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)


def make_private_dir(path: Path) -> None:
    """Create folder `path` 0700 if missing, its parent's owner's (as `write_private`
    gives files): the LL, running as the service user, must be able to read it."""
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        _give_to_dir_owner(fd, path.parent)
    finally:
        os.close(fd)


def _give_to_dir_owner(fd: int, directory: Path) -> None:
    """Root writing into a state dir that belongs to the service user (`tcpgc token
    --rotate` run with sudo) makes the file that user's: a root-owned 0600 secret
    would lock the LL out of its own identity at the next reload or restart."""
    if os.geteuid() != 0:
        return
    owner = directory.stat()
    if owner.st_uid != 0 or owner.st_gid != 0:
        os.fchown(fd, owner.st_uid, owner.st_gid)


def check_private(path: Path) -> None:
    """Refuse a secret file that others can read, with the fix in the message."""
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise UsageError(
            f"{path} is accessible by other users (mode {stat.S_IMODE(mode):04o}); "
            f"it holds a secret: run 'chmod 600 {path}'"
        )
