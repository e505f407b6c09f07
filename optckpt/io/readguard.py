"""Reads that a file changing underneath cannot kill: ``optckpt: error: ...: changed while being read``.

Tensors are memory-mapped (``torch.load(mmap=True)``, safetensors). When another process shortens a
mapped file (a training job's ``torch.save`` reopening it with ``O_TRUNC``, ``optckpt restore``, a
``truncate``), the next touch of a page past the new end is a SIGBUS: the process dies with no word
on stderr. Python cannot recover from that fault, so it must not happen.

:func:`stable_reads` takes a read *lease* (``fcntl F_SETLEASE F_RDLCK``) on every file of the input
before anything maps it. While the lease is held the kernel lets no one open the file for writing or
truncate it: such an ``open``/``truncate`` waits, and this process gets SIGIO. The SIGIO handler
raises, the read stops at the next Python instruction (nothing of it is printed), the files are
closed, and the writer goes on; the command says "changed while being read" and exits 2. The
kernel breaks a lease that is not given back within ``/proc/sys/fs/lease-break-time`` (45 s by
default): far longer than any one tensor operation here takes.

A lease is refused where a file is open for writing right now (``EAGAIN``: a save in progress;
refused here, in one line, before anything is read), and where the filesystem or the permissions
offer none (``EACCES`` when the file belongs to another user and the process lacks ``CAP_LEASE``,
``EINVAL`` on NFS and some FUSE filesystems). Those files are read unguarded, as before, with the
check that follows for every file: device, inode, size and modification time before and after the
read must agree, or the result is withheld. ``--stats`` reads tensor bytes through :func:`chunks`
(``pread`` into private buffers, a short read being "changed while being read"), so even there the
bulk of the reading cannot fault; what remains exposed without a lease is the few small values read
from the mapping (an optimizer's ``step``, scalar extras) and ``diff``'s comparisons."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import stat
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ..errors import LoadError

__all__ = ["stable_reads", "ChangedWhileReading", "chunks"]

_MAX_FILES = 512  # leases held at once (one open file each); files beyond these are read unguarded


class ChangedWhileReading(BaseException):
    """Raised by the lease-break signal wherever the read happens to be; a BaseException so that no
    ``except Exception`` on the way turns it into another error."""


@dataclass
class _Guard:
    fds: dict[str, int] = field(default_factory=dict)  # leased files
    seen: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)  # every file: its identity
    armed: bool = False
    broken: bool = False


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _files(paths: list[str]) -> list[str]:
    out: list[str] = []
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            continue  # the load says what is wrong with it
        if stat.S_ISREG(st.st_mode):
            out.append(os.path.realpath(p))
        elif stat.S_ISDIR(st.st_mode):
            for root, dirs, names in os.walk(p):
                dirs.sort()
                for n in sorted(names):
                    full = os.path.join(root, n)
                    if os.path.isfile(full):
                        out.append(os.path.realpath(full))
                if len(out) > 4 * _MAX_FILES:
                    break
    return list(dict.fromkeys(out))


@contextlib.contextmanager
def stable_reads(*paths: str | None) -> Iterator[None]:
    """Hold read leases on the files of ``paths`` (files or checkpoint directories) while the body
    reads them; :class:`LoadError` ``...: changed while being read`` when one of them is opened for
    writing, truncated or replaced meanwhile (the body's result must then be thrown away: raise
    before it is shown, which this does by leaving the body with the error)."""
    files = _files([p for p in paths if p])
    try:
        import fcntl
    except ImportError:  # not POSIX
        fcntl = None  # type: ignore[assignment]
    if (threading.current_thread() is not threading.main_thread() or not files or fcntl is None
            or not hasattr(fcntl, "F_SETLEASE") or not hasattr(signal, "SIGIO")):
        yield  # no leases (not Linux), or not the main thread (signals reach only that one): unguarded
        return

    g = _Guard()
    changed: list[str] = []

    def on_break(signum: int, frame: object) -> None:
        g.broken = True
        if g.armed:
            g.armed = False
            raise ChangedWhileReading()

    previous = signal.signal(signal.SIGIO, on_break)
    try:
        try:
            for f in files:
                if len(g.fds) >= _MAX_FILES:
                    g.seen[f] = _identity(os.stat(f))
                    continue
                fd = os.open(f, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                try:
                    fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
                except OSError as e:
                    os.close(fd)
                    if e.errno == errno.EAGAIN:
                        raise LoadError(f"{f}: open for writing by another process (a save in progress?); "
                                        "nothing read: run the command again when it is done") from None
                    g.seen[f] = _identity(os.stat(f))  # no lease here: checked before and after only
                    continue
                g.fds[f] = fd
                g.seen[f] = _identity(os.fstat(fd))
        except OSError as e:
            raise LoadError(f"{e.filename or files[0]}: cannot read: {e.strerror or e}") from None
        g.armed = True
        if g.broken:
            raise ChangedWhileReading()
        try:
            yield
        except Exception:  # an error the change itself may have caused (a load of a half-written file)
            g.armed = False
            changed.extend(_moved(g))
            if not changed and not g.broken:
                raise
        finally:
            g.armed = False
        if not changed:
            changed.extend(_moved(g))
        if g.broken and not changed:
            changed.append(next(iter(g.fds), files[0]))
    except ChangedWhileReading:
        changed.append(next((f for f, fd in g.fds.items() if _lease_broken(fd)), next(iter(g.fds), files[0])))
    finally:
        for fd in g.fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)  # gives the lease back: a waiting writer goes on
        signal.signal(signal.SIGIO, previous)
    if changed:
        raise LoadError(f"{changed[0]}: changed while being read (another process opened it for writing, "
                        "truncated or replaced it); nothing reported, run the command again")


def _moved(g: _Guard) -> list[str]:
    """The files whose device, inode, size or mtime differ from before the read."""
    out = []
    for f, before in g.seen.items():
        try:
            now: tuple[int, int, int, int] | None = _identity(os.stat(f))
        except OSError:
            now = None
        if now != before:
            out.append(f)
    return out


def _lease_broken(fd: int) -> bool:
    """Is the lease on ``fd`` being broken (a writer waits for it)?"""
    import fcntl

    try:
        return bool(fcntl.fcntl(fd, fcntl.F_GETLEASE) != fcntl.F_RDLCK)
    except OSError:
        return False


_MAPS: list[tuple[int, int, int, int, str]] = []  # (lo, hi, file offset, inode, path) of file mappings


def _refresh_maps() -> None:
    out = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].startswith("/") and int(fields[4]):
                    lo, hi = fields[0].split("-")
                    out.append((int(lo, 16), int(hi, 16), int(fields[2], 16), int(fields[4]), fields[5].rstrip("\n")))
    except (OSError, ValueError):
        out = []
    _MAPS[:] = out


def forget_mappings() -> None:
    """Drop the cached view of this process's file mappings. A cached entry outlives the mapping it
    describes (a checkpoint loaded and freed earlier in the same process, then the address reused by
    another file or by anonymous memory): reading through it would read the wrong bytes. Called at the
    start of every read that uses :func:`chunks`; within one read the mappings stay alive."""
    _MAPS.clear()


def _mapping_of(ptr: int, nbytes: int) -> tuple[int, int, int, int, str] | None:
    for attempt in (0, 1):
        for m in _MAPS:
            if m[0] <= ptr and ptr + nbytes <= m[1]:
                return m
        if attempt == 0:
            _refresh_maps()
    return None


def _changed(path: str) -> LoadError:
    return LoadError(f"{path}: changed while being read (another process truncated or replaced it); "
                     "nothing reported, run the command again")


def chunks(t: Any, size: int) -> Iterator[Any]:
    """``t`` flattened, ``size`` elements at a time. Where ``t``'s bytes are a memory-mapped file,
    each piece is a private copy read with ``pread`` (the mapping itself is never touched, so a file
    shortened meanwhile gives :class:`LoadError` "changed while being read", not a SIGBUS); other
    tensors are simply sliced."""
    import torch

    n = t.numel()
    flat = t.reshape(-1)
    m = None
    if n and t.device.type == "cpu" and t.is_contiguous() and sys.platform.startswith("linux"):
        m = _mapping_of(t.data_ptr(), n * t.element_size())
    if m is None:
        for start in range(0, n, size):
            yield flat[start:start + size]
        return
    lo, _, map_offset, inode, path = m
    if path.endswith(" (deleted)"):
        raise _changed(path[:-len(" (deleted)")])
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        raise _changed(path) from None
    try:
        if os.fstat(fd).st_ino != inode:
            raise _changed(path)
        es = t.element_size()
        at = map_offset + t.data_ptr() - lo
        for start in range(0, n, size):
            count = min(size, n - start)
            buf = bytearray(count * es)
            view = memoryview(buf)
            done = 0
            while done < len(buf):
                got = os.preadv(fd, [view[done:]], at + start * es + done)
                if got <= 0:
                    raise _changed(path)
                done += got
            yield torch.frombuffer(buf, dtype=t.dtype)
    finally:
        os.close(fd)


def file_mappings(path: str) -> list[tuple[int, int]]:
    """Address ranges at which ``path`` is memory-mapped whole (from offset 0). There may be several:
    a refused ``weights_only`` load can leave its mapping alive until collected."""
    real = os.path.realpath(path)
    out = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].strip() == real and int(fields[2], 16) == 0:
                    lo, hi = fields[0].split("-")
                    out.append((int(lo, 16), int(hi, 16)))
    except OSError:
        return []
    return out


def offset_in(ranges: list[tuple[int, int]], ptr: int) -> int | None:
    """``ptr``'s offset in the file, from the mapping that holds it."""
    for lo, hi in ranges:
        if lo <= ptr < hi:
            return ptr - lo
    return None
