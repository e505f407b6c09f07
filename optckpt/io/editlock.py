"""The in-place edit lock of a torch zip file: taking it, asking whether another process holds it,
and what to tell of a file whose last edit did not finish (read by :mod:`torchfile`, taken by
:mod:`append`)."""

from __future__ import annotations

import os

from ..errors import WriteError
from .zipscan import _PEND  # (the end-record comment an edit's first step writes)

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


def interrupted_message(path: str, previous_size: int | None, size: int, *, locked: bool = False) -> str:
    """What to tell of a file whose end records were "pending" when it was read (``size`` bytes): an
    edit still running in another process (it holds the edit lock: the same one line as a second edit
    gets), one that finished between that read and this look (its end records no longer pending: it
    released the lock), or one killed midway (still pending, nobody holding the lock). ``locked``: this
    process holds the lock itself (no other edit can be running: the pending records are a killed one's)."""
    if not locked:
        if being_edited(path):
            return f"{path}: another optckpt edit is writing this file in place; nothing changed"
        if not _still_pending(path, size) or being_edited(path):  # (the second look: an edit begun meanwhile)
            return (f"{path}: another optckpt edit wrote this file in place while this one was reading it; "
                    "nothing changed, run the command again")
    return (f"{path}: an in-place edit of this file was interrupted ({size - (previous_size or 0)} "
            f"unfinished bytes at its end; torch still loads the previous version); run "
            f"`optckpt restore {path}` to remove them")


def _still_pending(path: str, size: int) -> bool:
    """The file is still ``size`` bytes long and its end record's comment (the file's last bytes, fixed
    length) still says "pending": an edit's last step rewrites exactly those bytes."""
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size != size:
                return False
            f.seek(max(0, size - 128))
            return _PEND in f.read(128)
    except OSError:
        return False
