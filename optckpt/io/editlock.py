"""The in-place edit lock of a torch zip file: taking it, asking whether another process holds it,
and what to tell of a file whose last edit did not finish (read by :mod:`torchfile`, taken by
:mod:`append`)."""

from __future__ import annotations

import os

from ..errors import WriteError

__all__ = ["lock", "being_edited", "interrupted_message"]


def lock(fd: int, path: str) -> None:
    """One appender at a time: two edits appending at the same end would write over each other's
    records (an exclusive ``flock``, released when ``fd`` closes)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no advisory locks to take
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise WriteError(f"{path}: another optckpt edit is writing this file in place; nothing changed") from None
    except OSError:  # a filesystem without flock: nothing to take
        pass


def being_edited(path: str) -> bool:
    """Does another process hold the in-place edit lock of ``path`` right now (:func:`lock`)?"""
    try:
        import fcntl
    except ImportError:
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # (releases the shared lock, if it was taken)
    return False


def interrupted_message(path: str, previous_size: int | None, size: int) -> str:
    """What to tell of a file whose end records are "pending": an edit still running in another
    process (it holds the edit lock: the same one line as a second edit gets), or one killed midway."""
    if being_edited(path):
        return f"{path}: another optckpt edit is writing this file in place; nothing changed"
    return (f"{path}: an in-place edit of this file was interrupted ({size - (previous_size or 0)} "
            f"unfinished bytes at its end; torch still loads the previous version); run "
            f"`optckpt restore {path}` to remove them")
