"""Writing a changed checkpoint in the layout it was read from.

The promise: the final path holds either what was there before or a complete, *verified* result.
Every output is written to a temp file (or directory) created exclusively beside it, fsynced,
verified there, and only then renamed into place. Temp names carry the writer's pid, so the temp
files a killed run leaves behind are recognised (and named) by the next run. Nothing is written
through a symlink, into a FIFO or device, or over an existing backup unless asked.

``--in-place`` on a torch zip file appends a new version to it (:mod:`.append`: O(pickle), the
previous version stays inside the file and ``optckpt restore`` brings it back; ``--backup`` also
keeps a full copy as ``PATH.bak``). Other layouts (legacy pickles, safetensors, directories) are
rewritten beside the input and renamed into place, the original kept as ``PATH.bak`` (for a file
a hard link to the original inode: no copy, no partial backup on a full disk)."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import stat
import tempfile
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..checkpoint import Checkpoint, KeyPath
from ..errors import WriteError
from ..tensors import materialize
from .append import append_version
from .records import PROGRESS, rewrite_records
from .safepickle import pickle_module_for
from .torchfile import sniff

__all__ = ["WriteOptions", "replace_at", "write_checkpoint", "resolve_output", "new_output", "atomic_torch_save",
           "temp_file", "temp_dir", "commit_file", "commit_dir", "stale_temps", "appends_in_place"]

@dataclass(frozen=True)
class WriteOptions:
    """How an editing command writes its result (the CLI's write options, one value)."""

    dry_run: bool = False  # plan only, write nothing
    in_place: bool = False  # rewrite the input (a torch zip file: append a version)
    verify: bool | str = True  # read the result back and compare it with what was meant ("torch": by torch.load)
    replace_backup: bool = False  # an existing PATH.bak may be replaced
    backup: bool = False  # a torch zip file edited in place: also keep a full copy as PATH.bak


Verify = Callable[[str], None]
"""Checks a written temp file/directory (raises :class:`WriteError`); runs before the final rename."""

_NAME_KEEP = 120  # temp names embed at most this much of the output's name (NAME_MAX is 255)


def replace_at(obj: Any, path: KeyPath, new: Any) -> Any:
    """``obj`` with the value at ``path`` replaced (dicts/lists edited in place, tuples rebuilt)."""
    if not path:
        return new
    key, rest = path[0], path[1:]
    if isinstance(obj, tuple):
        items = list(obj)
        items[key] = replace_at(items[key], rest, new)
        return type(obj)(items) if type(obj) is tuple else type(obj)(*items)
    obj[key] = replace_at(obj[key], rest, new)
    return obj


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _check_writable_target(out: str) -> None:
    """An existing path we would replace must be a plain file (never a link, FIFO or device)."""
    try:
        st = os.lstat(out)
    except FileNotFoundError:
        return
    except OSError as e:
        raise WriteError(f"{out}: cannot check the output path: {e.strerror or e}") from None
    if stat.S_ISLNK(st.st_mode):
        raise WriteError(f"{out}: is a symbolic link; name the real output path (nothing is written through links)")
    if stat.S_ISDIR(st.st_mode):
        raise WriteError(f"{out}: is a directory; name the output file")
    if not stat.S_ISREG(st.st_mode):
        raise WriteError(f"{out}: is not a regular file (a FIFO, socket or device); refused")


def backup_path(src: str) -> str:
    return os.path.realpath(src).rstrip(os.sep) + ".bak"


def appends_in_place(path: str) -> bool:
    """Does ``--in-place`` append a version to ``path`` (a regular torch zip file) rather than
    rewrite it beside and rename?"""
    try:
        return stat.S_ISREG(os.stat(path).st_mode) and sniff(path) == "zip"
    except Exception:
        return False


def resolve_output(src: str, out: str | None, in_place: bool, *, replace_backup: bool = False,
                   backup: bool = False) -> str:
    """Where to write, refusing to clobber the input unless ``in_place`` (then the input's real path,
    after checking that a backup can be kept where one will be: always, except for a torch zip
    file edited by appending without ``backup``)."""
    if in_place:
        if out is not None and not _same_file(src, out):
            raise WriteError("--in-place writes over the input: do not also give -o/--output")
        real = os.path.realpath(src)  # a symlinked input: rewrite the file it points to, keep the link
        if not os.access(os.path.dirname(real) or ".", os.W_OK):
            raise WriteError(f"{src}: its directory is not writable")
        try:
            st = os.stat(real)
        except OSError as e:
            raise WriteError(f"{src}: {e.strerror or e}") from None
        if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
            raise WriteError(f"{src}: has {st.st_nlink} hard links; rewriting it in place would leave the other "
                             "names with the old content. Write a new file with -o instead")
        bak = backup_path(src)
        if not backup and appends_in_place(real):
            return real
        if os.path.lexists(bak) and not replace_backup:
            raise WriteError(f"{bak}: a previous backup is in the way; move it away or pass --replace-backup")
        if os.path.lexists(bak) and not (os.path.isdir(bak) if os.path.isdir(real) else
                                         stat.S_ISREG(os.lstat(bak).st_mode)):
            raise WriteError(f"{bak}: exists and is not a {'directory' if os.path.isdir(real) else 'regular file'}; "
                             "refused")
        return real
    kept = ("the previous version stays inside the file: `optckpt restore` undoes it" if appends_in_place(src)
            else "a .bak is kept")
    if out is None:
        raise WriteError(f"no output given: pass -o OUT (or --in-place to rewrite the input; {kept})")
    if os.path.lexists(out) and os.path.exists(out) and _same_file(src, out):
        raise WriteError(f"{out}: is the input; pass --in-place to rewrite it ({kept})")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise WriteError(f"{out}: the directory {parent} does not exist")
    if os.path.isdir(src):
        if os.path.lexists(out):
            raise WriteError(f"{out}: already exists; choose a new directory name")
        return out
    _check_writable_target(out)
    return out


def new_output(out: str) -> str:
    """An output that must not exist yet (``convert``)."""
    if os.path.lexists(out):
        raise WriteError(f"{out}: already exists; choose a new name")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise WriteError(f"{out}: the directory {parent} does not exist")
    return out


def _prefix(final_name: str) -> str:
    return f".{final_name[:_NAME_KEEP]}.optckpt-{os.getpid()}."


def temp_file(dest_dir: str, final_name: str) -> str:
    """A new empty temp file beside the output, created exclusively (``O_EXCL``)."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=_prefix(final_name), suffix=".tmp", dir=dest_dir)
        os.close(fd)
    except OSError as e:
        raise WriteError(f"{os.path.join(dest_dir, final_name)}: cannot create a file in {dest_dir}: "
                         f"{e.strerror or e}") from None
    return tmp


def temp_dir(dest_dir: str, final_name: str) -> str:
    try:
        return tempfile.mkdtemp(prefix=_prefix(final_name), suffix=".tmp", dir=dest_dir)
    except OSError as e:
        raise WriteError(f"{os.path.join(dest_dir, final_name)}: cannot create a temporary directory in "
                         f"{dest_dir}: {e.strerror or e}") from None


_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.optckpt-(?P<pid>\d+)\.[^.]+\.tmp$")


def stale_temps(out: str) -> list[str]:
    """Temp files/directories that earlier, killed runs writing ``out`` left beside it (their writer
    process is gone)."""
    parent = os.path.dirname(os.path.abspath(out))
    name = os.path.basename(out.rstrip(os.sep))[:_NAME_KEEP]
    found = []
    try:
        entries = os.listdir(parent)
    except OSError:
        return []
    for entry in entries:
        m = _TEMP_RE.match(entry)
        if m is None or m["name"] != name:
            continue
        pid = int(m["pid"])
        if pid == os.getpid() or _alive(pid):
            continue
        found.append(os.path.join(parent, entry))
    return sorted(found)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _Flush:
    """The fsync of a written temp file, run in a thread (the kernel writes the file back without the
    GIL) while the caller verifies what was written; :meth:`wait` joins it. Both must be done before
    the temp file is renamed into place."""

    def __init__(self, path: str) -> None:
        self._error: OSError | None = None
        self._fd = os.open(path, os.O_RDONLY)
        try:
            self._thread = threading.Thread(target=self._run, name="optckpt-fsync", daemon=True)
            self._thread.start()
        except BaseException:
            os.close(self._fd)
            raise

    def _run(self) -> None:
        try:
            os.fsync(self._fd)
        except OSError as e:
            self._error = e

    def wait(self) -> None:
        """Returns once the file is on disk; raises the fsync's OSError."""
        if self._fd >= 0:
            self._thread.join()
            os.close(self._fd)
            self._fd = -1
        if self._error is not None:
            raise self._error


def _save_part(kind: str, obj: Any, tmp: str, *, legacy: bool, source: str, background: bool = False) -> _Flush | None:
    """Write a changed part in its own format: torch.save, or (a safetensors model file) safetensors.
    ``background``: a torch file's fsync is left running (returned: the caller waits for it)."""
    if kind == "safetensors":
        _save_safetensors_like(obj, tmp, source)
        return None
    return _save_torch(obj, tmp, legacy=legacy, source=source, background=background)


def _save_safetensors_like(tensors: Mapping[str, Any], tmp: str, source: str) -> None:
    """``tensors`` as safetensors, with the source file's ``__metadata__``; a key whose tensor is
    another key's (tied weights) and that the source did not store is left out, as the library that
    wrote it stores tied weights once."""
    from .discover import tied_keys
    from .safetensors_io import read_header, save_safetensors

    dest_dir, final = os.path.dirname(tmp), os.path.basename(tmp)
    try:
        meta, extra = read_header(source)
        tied = tied_keys(tensors)
        keep = {k: t.contiguous() for k, t in tensors.items() if k in meta or k not in tied}
        save_safetensors(keep, tmp, metadata=extra or None)
        _fsync_path(tmp)
    except BaseException as e:
        _unlink(tmp)
        raise _as_write_error(e, os.path.join(dest_dir, final), "write failed") from None


def _save_torch(obj: Any, tmp: str, *, legacy: bool, source: str | None = None,
                background: bool = False) -> _Flush | None:
    """torch.save ``obj`` into the (existing, empty) temp file ``tmp`` and fsync it (``background``:
    the fsync started in a thread and returned, for the caller to verify the file meanwhile).

    torch writes to a *path* with its C++ writer straight from the memory-mapped input (a Python
    file object would route every record through Python ``bytes``: ~2.5x slower on big files). That
    writer reports a failed write only as an opaque ``unexpected pos`` RuntimeError, so the real
    cause (ENOSPC, EIO, EROFS) is found by probing the directory afterwards."""
    dest_dir, final = os.path.dirname(tmp), os.path.basename(tmp)
    try:
        if legacy or source is None or not rewrite_records(source, obj, tmp):
            import torch

            obj = materialize(obj)
            torch.save(obj, tmp, pickle_module=pickle_module_for(obj), _use_new_zipfile_serialization=not legacy)
        if background:
            return _Flush(tmp)
        _fsync_path(tmp)
        return None
    except BaseException as e:
        _unlink(tmp)
        if isinstance(e, RuntimeError) and not isinstance(e, OSError):
            raise WriteError(f"{os.path.join(dest_dir, final)}: write failed: {_probe(dest_dir, e)}") from None
        raise _as_write_error(e, os.path.join(dest_dir, final), "write failed") from None


def _as_write_error(e: BaseException, where: str, what: str) -> BaseException:
    """An OS failure while writing ``where`` as one-line :class:`WriteError` (anything else as it is)."""
    if isinstance(e, FileExistsError):
        return WriteError(f"{e.filename or where}: appeared while writing (another run?); nothing replaced")
    if isinstance(e, OSError):
        return WriteError(f"{where}: {what}: {e.strerror or e}")
    return e


def _probe(dest_dir: str, err: BaseException) -> str:
    """Why did a write into ``dest_dir`` fail? Write 64 KiB there and report the OS's answer."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".optckpt-probe.", dir=dest_dir)
    except OSError as e:
        return e.strerror or str(e)
    try:
        os.write(fd, b"\0" * 65536)
        os.fsync(fd)
    except OSError as e:
        return e.strerror or str(e)
    finally:
        os.close(fd)
        _unlink(probe)
    return str(err).splitlines()[0][:200]


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def copy_mode(src: str, dst: str) -> None:
    try:
        os.chmod(dst, stat.S_IMODE(os.stat(src).st_mode))
    except OSError:
        pass


def _keep_backup(src: str, replace: bool) -> None:
    """``src.bak`` := the current ``src`` without copying (a hard link to its inode), never following
    a link at the backup path; copied (into an exclusive temp, then linked) where hard links fail."""
    _place_backup(_stage_backup(src, copy=False), src, replace)


def _stage_backup(src: str, *, copy: bool) -> str:
    """A temp file beside ``src.bak`` holding the current ``src``: a hard link to it, or a copy
    (``copy``, or where links fail; ``copy``: the file is about to change in place, a link would
    change with it)."""
    bak = backup_path(src)
    dest_dir = os.path.dirname(bak)
    if not copy:
        tmp = os.path.join(dest_dir, _prefix(os.path.basename(bak)) + "link.tmp")
        _unlink(tmp)
        try:
            os.link(src, tmp, follow_symlinks=False)
            return tmp
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EXDEV, errno.ENOTSUP, errno.EMLINK, errno.EOPNOTSUPP):
                raise
    tmp = temp_file(dest_dir, os.path.basename(bak))
    try:
        shutil.copyfile(src, tmp)
        copy_mode(src, tmp)
        _fsync_path(tmp)
    except BaseException:
        _unlink(tmp)
        raise
    return tmp


def _place_backup(tmp: str, src: str, replace: bool) -> None:
    """Rename the staged backup ``tmp`` to ``src.bak`` (no-clobber unless ``replace``)."""
    bak = backup_path(src)
    try:
        if replace:
            os.replace(tmp, bak)  # replaces whatever name sits there; never writes through it
        else:
            os.link(tmp, bak, follow_symlinks=False)  # no-clobber: EEXIST if a backup appeared meanwhile
            os.unlink(tmp)
    except BaseException:
        _unlink(tmp)
        raise


def commit_file(tmp: str, out: str, *, verify: Verify | None = None, no_clobber: bool = False,
                in_place: bool = False, replace_backup: bool = False, flushing: _Flush | None = None) -> str:
    """Verify the fsynced temp file, then rename it to ``out`` (keeping a backup ``in_place``).
    ``flushing``: the temp file's fsync, still running: the verification runs meanwhile, and the
    rename waits for both. On any failure the temp file is removed and ``out`` is as it was."""
    try:
        try:
            if verify is not None:
                verify(tmp)
        except BaseException:
            if flushing is not None:  # (its own failure is moot: the file is removed)
                with contextlib.suppress(OSError):
                    flushing.wait()
            raise
        if flushing is not None:
            try:
                flushing.wait()
            except OSError as e:
                raise WriteError(f"{out}: write failed: {e.strerror or e}") from None
        if in_place:
            _keep_backup(out, replace_backup)
        if no_clobber:
            os.link(tmp, out)
            os.unlink(tmp)
        else:
            os.replace(tmp, out)
    except BaseException as e:
        _unlink(tmp)
        raise _as_write_error(e, out, "cannot write") from None
    _fsync_dir(os.path.dirname(os.path.abspath(out)))
    return out


def commit_dir(tmpdir: str, out: str, *, verify: Verify | None = None, in_place: bool = False,
               replace_backup: bool = False) -> str:
    """Verify the temp directory, then rename it to ``out`` (which must not exist, or is the input
    when ``in_place``: the input becomes ``out.bak``). On failure the temp directory is removed."""
    parent = os.path.dirname(os.path.abspath(out))
    old_bak: str | None = None
    try:
        _fsync_dir(tmpdir)
        if verify is not None:
            verify(tmpdir)
        if in_place:
            bak = backup_path(out)
            if os.path.lexists(bak):
                if not replace_backup:
                    raise WriteError(f"{bak}: a previous backup is in the way; move it away or pass --replace-backup")
                old_bak = temp_dir(parent, os.path.basename(bak))
                os.replace(bak, old_bak)
            os.rename(out, bak)
            os.rename(tmpdir, out)
        else:
            if os.path.lexists(out):
                raise WriteError(f"{out}: appeared while writing (another run?); nothing replaced")
            os.rename(tmpdir, out)
    except BaseException as e:
        shutil.rmtree(tmpdir, ignore_errors=True)
        if isinstance(e, OSError) and e.errno in (errno.ENOTEMPTY, errno.EEXIST):  # another writer won the race
            raise WriteError(f"{out}: appeared while writing (another run?); nothing replaced") from None
        if isinstance(e, OSError):
            raise WriteError(f"{out}: write failed: {e.strerror or e}") from None
        raise
    if old_bak is not None:
        shutil.rmtree(old_bak, ignore_errors=True)
    _fsync_dir(parent)
    return out


def write_checkpoint(ck: Checkpoint, out: str, changed_parts: Mapping[str, Any], *, in_place: bool = False,
                     verify: Verify | None = None, replace_backup: bool = False, backup: bool = False) -> str:
    """Write ``ck`` to ``out`` with the objects in ``changed_parts`` (part relpath → new object).

    A torch zip file ``in_place``: a version appended to it, verified (``backup``: a full copy
    of the old one kept as ``PATH.bak``). Other files: one temp file, verified, then renamed.
    Directory layouts: a temp directory beside ``out`` holding every file (changed ones re-saved,
    the rest copied byte-for-byte, symlinks kept as links, never followed), verified, then renamed
    into place. ``verify`` gets the path to check."""
    if ck.layout == "dcp":
        raise WriteError(f"{ck.path}: rewriting DCP checkpoints in place is not supported yet; "
                         "`optckpt convert --to torch` it, repair, and `convert --to dcp` back")
    if ck.layout == "deepspeed":
        raise WriteError(f"{ck.path}: editing DeepSpeed ZeRO partitions is not supported; "
                         "`optckpt convert --to torch` (or `--to dcp`) gives a name-keyed checkpoint to edit")
    src = os.path.realpath(ck.path) if in_place else ck.path
    dest_dir = os.path.dirname(os.path.abspath(out))
    try:
        if os.path.isdir(src):
            return _write_directory(ck, src, out, changed_parts, in_place, verify, replace_backup)
        part = next(p for p in ck.parts if p.relpath == os.path.basename(ck.path))
        if part.relpath not in changed_parts:
            raise WriteError("internal: nothing to write")
        if in_place and part.zip_format and appends_in_place(src):
            return _append_in_place(src, changed_parts[part.relpath], verify, backup, replace_backup, part.nbytes)
        tmp = temp_file(dest_dir, os.path.basename(out))
        if not in_place:
            _drop_cache_of(out, src)
        flushing = _save_part(part.kind, changed_parts[part.relpath], tmp, legacy=not part.zip_format,
                              source=ck.path, background=True)
        try:
            copy_mode(src, tmp)
        except BaseException:
            if flushing is not None:
                with contextlib.suppress(OSError):
                    flushing.wait()
            _unlink(tmp)
            raise
        return commit_file(tmp, out, verify=verify, in_place=in_place, replace_backup=replace_backup,
                           flushing=flushing)
    except PermissionError as e:
        raise WriteError(f"{out}: permission denied ({e.strerror or e})") from None


def _drop_cache_of(out: str, src: str) -> None:
    """The file about to be replaced (a regular file, no other link, not the input): its cached pages
    dropped (``POSIX_FADV_DONTNEED``, a hint: the file is not changed) in a thread while the new one
    is written, so that the final rename spends less time freeing them. Nothing when in doubt."""
    if not hasattr(os, "posix_fadvise"):
        return
    try:
        st = os.lstat(out)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or os.path.samefile(out, src):
            return
        fd = os.open(out, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return

    def drop() -> None:
        try:
            if (os.fstat(fd).st_dev, os.fstat(fd).st_ino) == (st.st_dev, st.st_ino):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass
        finally:
            os.close(fd)

    try:
        threading.Thread(target=drop, name="optckpt-drop-cache", daemon=True).start()
    except BaseException:
        os.close(fd)
        raise


def _append_in_place(src: str, obj: Any, verify: Verify | None, backup: bool, replace_backup: bool,
                     read_size: int) -> str:
    """A new version appended to the torch zip file ``src``; with ``backup`` a full copy of the old
    one, staged first, becomes ``src.bak`` once the edit is verified (none on failure)."""
    staged = None
    try:
        if backup:
            staged = _stage_backup(src, copy=True)
        append_version(src, obj, verify=verify, expect_size=read_size)
        if staged is not None:
            _place_backup(staged, src, replace_backup)
            staged = None
    except OSError as e:
        raise _as_write_error(e, backup_path(src), "cannot keep the backup") from None
    finally:
        if staged is not None:
            _unlink(staged)
    return src


def _write_directory(ck: Checkpoint, src: str, out: str, changed_parts: Mapping[str, Any], in_place: bool,
                     verify: Verify | None, replace_backup: bool) -> str:
    parent = os.path.dirname(os.path.abspath(out))
    tmpdir = temp_dir(parent, os.path.basename(out.rstrip(os.sep)))
    tick = PROGRESS.get()
    try:
        _copy_changed(ck, src, tmpdir, "", changed_parts, tick)
    except BaseException as e:
        shutil.rmtree(tmpdir, ignore_errors=True)
        if isinstance(e, OSError):
            raise WriteError(f"{out}: write failed: {e.strerror or e}") from None
        raise
    return commit_dir(tmpdir, out, verify=verify, in_place=in_place, replace_backup=replace_backup)


def _copy_changed(ck: Checkpoint, src: str, dst_dir: str, rel: str, changed_parts: Mapping[str, Any],
                  tick: Any) -> None:
    """Copy directory ``src`` (``rel`` inside the checkpoint) to ``dst_dir`` with the changed parts
    saved anew; a subdirectory that holds a changed part (DeepSpeed's ``<tag>/`` step directory) is
    walked the same way, any other is copied whole."""
    copy_mode(src, dst_dir)
    for name in sorted(os.listdir(src)):
        full = os.path.join(src, name)
        dst = os.path.join(dst_dir, name)
        relname = os.path.join(rel, name) if rel else name
        part = next((p for p in ck.parts if p.relpath == relname), None)
        st = os.lstat(full)
        if relname in changed_parts and part is not None:
            tmp = temp_file(dst_dir, name)
            _save_part(part.kind, changed_parts[relname], tmp, legacy=not part.zip_format, source=full)
            copy_mode(full, tmp)
            os.replace(tmp, dst)
        elif stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(full), dst)  # a link stays a link: never followed out of the checkpoint
        elif stat.S_ISDIR(st.st_mode) and any(k.startswith(relname + os.sep) for k in changed_parts):
            os.mkdir(dst)
            _copy_changed(ck, full, dst, relname, changed_parts, tick)
        elif stat.S_ISDIR(st.st_mode):
            shutil.copytree(full, dst, symlinks=True)
        elif stat.S_ISREG(st.st_mode):
            shutil.copy2(full, dst, follow_symlinks=False)
            _fsync_path(dst)
            if tick is not None:
                tick(st.st_size)
        # FIFOs, sockets and devices are not checkpoint content: not carried


def atomic_torch_save(obj: Any, out: str, *, verify: Verify | None = None, mode_from: str | None = None) -> str:
    """``torch.save(obj, out)`` to a new path: exclusive temp, fsync, verify, no-clobber rename."""
    dest_dir = os.path.dirname(os.path.abspath(out))
    tmp = temp_file(dest_dir, os.path.basename(out))
    _save_torch(obj, tmp, legacy=False)
    if mode_from is not None:
        copy_mode(mode_from, tmp)
    return commit_file(tmp, out, verify=verify, no_clobber=True)
