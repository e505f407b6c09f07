"""Reading ``torch.save`` files safely: sniffing, ``weights_only`` loads, unsafe-global reporting."""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import struct
import sys
import zlib
from dataclasses import dataclass
from typing import Any

from ..errors import LoadError, UnsafePickleError
from .bounds import check_bounds
from .editlock import interrupted_message
from .reader import (
    NeedsGlobal,
    NeedsPlaceholders,
    NeedsTorch,
    fast_allowed,
    read_zip_pickle,
    read_zip_pickle_lazy,
    read_zip_pickle_placeholders,
)
from .readguard import file_mappings, offset_in
from .safepickle import Refused, has_placeholders, torch_table_bounded
from .zipscan import ZipCorruptError, ZipEntry, ZipLayout, ZipStructureError, parse_bytes, parse_zip

__all__ = ["sniff", "TorchLoad", "load_torch_file", "unsafe_globals", "zip_infos", "zip_layout", "check_zip_bytes"]

_ZIP_MAGIC = b"PK\x03\x04"
_CRC_CHECK_LIMIT = 1 << 30  # metadata records up to this size have their CRC checked on load


def sniff(path: str) -> str:
    """What kind of file this is, by content: ``zip`` (torch.save, also Lightning ``.ckpt``),
    ``legacy`` (pre-1.6 torch.save / plain pickle), ``safetensors``, ``json``, ``empty`` or ``unknown``."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise LoadError(f"{path}: cannot read: {e.strerror or e}") from None
    if size == 0:
        return "empty"
    if head.startswith(_ZIP_MAGIC):
        return "zip"
    if head[:1] == b"\x80" and len(head) >= 2 and 2 <= head[1] <= 5:
        return "legacy"
    if len(head) >= 9:
        n = int.from_bytes(head[:8], "little")
        if 2 <= n <= size - 8 and head[8:9] == b"{":
            return "safetensors"
    if head.lstrip()[:1] in (b"{", b"["):
        return "json"
    return "unknown"


def unsafe_globals(path: str) -> list[str]:
    """Globals a ``weights_only`` load of ``path`` would refuse (reads the pickle only, runs nothing)."""
    try:
        import torch

        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # legacy files: not a zip; fall back to scanning the pickle opcodes
        return _scan_pickle_globals(path)


def _scan_pickle_globals(path: str) -> list[str]:
    """The globals a legacy pickle names beyond the weights-only rules: read by the safe reader
    (each one an inert placeholder), so the names are exact, and nothing runs."""
    from .safepickle import PickledGlobal, safe_load_torch, walk

    try:
        obj = safe_load_torch(path, lambda storage, location: storage, zip_format=False)
    except Exception:
        return []
    return sorted({o.name for o in walk(obj) if isinstance(o, PickledGlobal)})


@dataclass
class TorchLoad:
    obj: Any
    saved_locations: tuple[str, ...]
    zip_format: bool
    placeholders: bool = False  # read by the safe reader: may hold inert placeholders


def load_torch_file(path: str, *, trust_pickle: bool = False, kind: str | None = None,
                    quiet: bool = False, lazy: bool = False) -> TorchLoad:
    """``torch.load`` with ``weights_only=True`` (never executes code), memory-mapped when the
    file is zip-format, always onto the CPU (CUDA-saved files load on CPU-only machines).

    Records the storage locations the file was saved with (``cuda:0``, ``cpu``) without moving
    anything there. A pickle needing other globals is read again by the safe reader (each of them an
    inert placeholder, nothing imported or run); one even that cannot read raises
    :class:`UnsafePickleError` naming them, unless ``trust_pickle`` (then full pickle, loudly). ``kind``: what
    :func:`sniff` already said of the file, so that it is not read twice; ``quiet``: no trust
    warning (a re-read of what this process just wrote); ``lazy``: tensors as
    :class:`~optckpt.tensors.RecordTensor` (record references, torch not imported) where the lazy
    reader models the whole pickle, real tensors otherwise."""
    kind = kind or sniff(path)
    if kind == "empty":
        raise LoadError(f"{path}: empty file (0 bytes): not a checkpoint")
    if kind not in ("zip", "legacy"):
        raise LoadError(f"{path}: not a torch.save file (content looks like {kind})")
    zip_format = kind == "zip"
    locations: dict[str, None] = {}
    checked = _check_zip(path) if zip_format else None
    if checked is not None and not trust_pickle and checked.fast and lazy:
        done = _read_lazily(path, checked, locations)
        if done is not None:
            return done
    if checked is not None and not trust_pickle and checked.fast:
        try:
            obj = read_zip_pickle(path, checked.layout, checked.pickle, checked.prefix, fast_allowed(), locations)
        except NeedsPlaceholders as e:  # a global outside the allowlist: the inert-placeholder reader
            locations.clear()
            obj = _load_placeholders(path, _recorder(locations, None), True, [e.name])
            check_bounds(obj, path, os.path.getsize(path))
            # (numpy's globals send a file here too: the safe reader checks their BUILD; it may hold no placeholder)
            return TorchLoad(obj=obj, saved_locations=tuple(locations), zip_format=True,
                             placeholders=has_placeholders(obj))
        except (LoadError, KeyboardInterrupt):
            raise
        except Refused as e:
            raise _refused(path, e) from None
        except RecursionError:
            raise LoadError(f"{path}: corrupt pickle: nested too deeply to read") from None
        except Exception as e:  # the C unpickler reports a malformed pickle with many types
            raise LoadError(f"{path}: corrupt pickle: {_first_line(e)}") from None
        check_bounds(obj, path, os.path.getsize(path))
        return TorchLoad(obj=obj, saved_locations=tuple(locations), zip_format=True)
    import torch

    check = _storage_check(path, checked.layout) if checked is not None else None
    _map = _recorder(locations, check)

    refused: list[str] | None = None
    try:
        if trust_pickle and not quiet:
            print(
                f"optckpt: warning: --trust-pickle: loading {path} with full pickle; "
                "this can execute code from the file",
                file=sys.stderr,
            )
        if trust_pickle:  # the classes a trusted file names import as --target's code does: from the current directory
            cwd = os.getcwd()
            if cwd not in sys.path:
                sys.path.insert(0, cwd)
        with contextlib.nullcontext() if trust_pickle else torch_table_bounded():
            obj = torch.load(path, map_location=_map, weights_only=not trust_pickle, mmap=zip_format)
    except ModuleNotFoundError as e:  # (only under --trust-pickle: the safe reader imports nothing)
        raise LoadError(f"{path}: its pickled objects need the module {e.name!r}, which is not importable from "
                        f"{os.getcwd()}: run optckpt from the training code's directory or set PYTHONPATH") from None
    except pickle.UnpicklingError as e:
        said = re.findall(r"GLOBAL ([\w.]+)", str(e))
        if not said and "weights only" not in str(e).lower():
            raise LoadError(f"{path}: corrupt pickle: {_first_line(e)}") from None
        refused = said
    except (LoadError, KeyboardInterrupt):  # LoadError: also _storage_check's refusal
        raise
    except Exception as e:  # torch reports corruption with many types (RuntimeError, AssertionError, ...)
        raise LoadError(f"{path}: cannot load (truncated or corrupt torch file?): {_first_line(e)}") from None
    if refused is not None:  # outside the handler: the refused attempt (and its file mapping) is released
        locations.clear()
        obj = _load_placeholders(path, _map, zip_format, refused)  # each refused global an inert placeholder
    # (trusted: the file's code could allocate anything anyway; what it makes is not held to the file's size)
    check_bounds(obj, path, None if trust_pickle else os.path.getsize(path))
    return TorchLoad(obj=obj, saved_locations=tuple(locations), zip_format=zip_format,
                     placeholders=refused is not None)


def _read_lazily(path: str, checked: _Checked, locations: dict[str, None]) -> TorchLoad | None:
    """The file read by the lazy reader; one that names a global outside its table, by the lazy
    placeholder reader (inert placeholders, torch not imported either). None: neither models it, and
    the torch way reads it (accepts, reads placeholders or refuses as before)."""
    placeholders = False
    try:
        obj = read_zip_pickle_lazy(path, checked.layout, checked.pickle, checked.prefix, locations)
    except NeedsGlobal:
        locations.clear()
        try:  # the same checked bytes again, through the safe reader's opcode loop
            obj = read_zip_pickle_placeholders(path, checked.layout, checked.pickle, checked.prefix, locations)
        except (LoadError, KeyboardInterrupt):
            raise
        except Exception:  # NeedsTorch, or what the safe reader refuses: the torch way's verdict and message
            locations.clear()
            return None
        placeholders = True
    except NeedsTorch:
        locations.clear()
        return None
    except (LoadError, KeyboardInterrupt):
        raise
    except Refused as e:
        raise _refused(path, e) from None
    except RecursionError:
        raise LoadError(f"{path}: corrupt pickle: nested too deeply to read") from None
    except Exception as e:
        raise LoadError(f"{path}: corrupt pickle: {_first_line(e)}") from None
    check_bounds(obj, path, os.path.getsize(path))
    return TorchLoad(obj=obj, saved_locations=tuple(locations), zip_format=True, placeholders=placeholders)


def _refused(path: str, e: Refused) -> LoadError:
    return LoadError(f"{path}: {_first_line(e)}: {e.verdict}")


def _recorder(locations: dict[str, None], check: Any) -> Any:
    """A ``map_location`` that records each storage's saved location (and checks it), moving nothing."""

    def _map(storage: Any, location: str) -> Any:
        locations[str(location)] = None
        if check is not None:
            check(storage)
        return storage

    return _map


def _storage_check(path: str, layout: ZipLayout) -> Any:
    """A check for each storage torch maps from ``path``: it must be exactly one record's bytes.
    With ``mmap=True`` torch takes ``nbytes`` (from the pickle) from where the record's data
    starts, whatever the record's size; a plain ``torch.load`` reads the record itself. A storage
    longer or shorter than its record would differ between the two: refused."""
    by_offset = {e.data_offset: e for e in layout.entries if "/data/" in e.filename}
    ranges: list[tuple[int, int]] = []

    def check(storage: Any) -> None:
        if getattr(storage, "device", None) is None or storage.device.type != "cpu":
            return
        nbytes = storage.nbytes()
        if nbytes == 0:
            return
        if not ranges:
            ranges.extend(file_mappings(path) or [(0, 0)])
        off = offset_in(ranges, storage.data_ptr())
        if off is None:
            return  # not memory-mapped from the file: torch read the record itself
        rec = by_offset.get(off)
        if rec is None:
            raise LoadError(f"{path}: ambiguous zip structure: a tensor's {nbytes} bytes at byte {off} are no "
                            "record's data")
        if rec.file_size != nbytes:
            raise LoadError(f"{path}: ambiguous zip structure: the pickle reads {nbytes} bytes from record "
                            f"{rec.filename!r}, which holds {rec.file_size}")

    return check


def _load_placeholders(path: str, map_location: Any, zip_format: bool, said: list[str]) -> Any:
    """The weights-only refusal's fallback: every other global read as an inert placeholder. Only
    when even that fails are the refused globals listed (one more read of the pickle's opcodes)."""
    from .safepickle import safe_load_torch

    try:
        return safe_load_torch(path, map_location, zip_format=zip_format)
    except (KeyboardInterrupt, LoadError):
        raise
    except Refused as e:  # (torch's loader, which reads the file first, says only that it refused)
        raise _refused(path, e) from None
    except RecursionError:
        raise UnsafePickleError(path, unsafe_globals(path) or said, "nested too deeply to read safely") from None
    except Exception as e:
        raise UnsafePickleError(path, unsafe_globals(path) or said, _first_line(e)) from None


_INFOS: dict[tuple[int, int, int, int], ZipLayout] = {}


def _file_key(path: str) -> tuple[int, int, int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def zip_layout(path: str) -> ZipLayout:
    """The zip structure of ``path`` as torch reads it (:mod:`optckpt.io.zipscan`, every structure
    rule checked): the one this process's last check of the same file (device, inode, size, mtime)
    parsed, or parsed now. Raises :class:`LoadError` for a file it refuses."""
    key = _file_key(path)
    layout = _INFOS.get(key)
    if layout is None:
        layout = _parse_checked(path)
        _remember(key, layout)
    return layout


def zip_infos(path: str) -> list[ZipEntry]:
    """The records of ``path`` that torch reads (see :func:`zip_layout`)."""
    return list(zip_layout(path).entries)


def _remember(key: tuple[int, int, int, int], layout: ZipLayout) -> None:
    if len(_INFOS) >= 8:
        _INFOS.pop(next(iter(_INFOS)))
    _INFOS[key] = layout


def _parse_checked(path: str) -> ZipLayout:
    try:
        layout = parse_zip(path)
    except ZipStructureError as e:
        raise LoadError(f"{path}: ambiguous zip structure: {e}") from None
    except (ZipCorruptError, OSError, ValueError, struct.error) as e:
        raise LoadError(f"{path}: truncated or corrupt zip container ({_first_line(e)})") from None
    if layout.kind == "pend" and layout.previous_size is not None:
        raise LoadError(interrupted_message(path, layout.previous_size, layout.size))
    return layout


def check_zip_bytes(data: bytes, where: str) -> None:
    """The same structure rules for a ``torch.save`` zip held in memory (a DCP byte entry) before
    ``torch.load`` reads it: torch's reader would inflate a compressed record whatever it declares."""
    if data[:4] != _ZIP_MAGIC:
        return
    try:
        parse_bytes(data)
    except ZipStructureError as e:
        raise LoadError(f"{where}: ambiguous zip structure: {e}") from None
    except (ZipCorruptError, ValueError, struct.error) as e:
        raise LoadError(f"{where}: truncated or corrupt zip container ({_first_line(e)})") from None


@dataclass
class _Checked:
    layout: ZipLayout
    prefix: str  # the archive's directory name (``archive`` / the file's stem)
    pickle: bytes  # ``<prefix>/data.pkl``, the bytes whose CRC was checked
    fast: bool  # optckpt's own reader can read it (little-endian, not TorchScript)


def _check_zip(path: str) -> _Checked:
    """Validate the zip container before anything reads it: one parse, as torch's reader (miniz)
    resolves the file (:mod:`optckpt.io.zipscan`), every check on exactly the records that are read;
    the pickle's bytes kept (they are what is decoded, not a second read of them)."""
    key = _file_key(path)
    layout = _parse_checked(path)
    infos = [i for i in layout.entries if "/data/" not in i.filename]  # the pickle and the small records beside
    pickles = [i for i in infos if i.filename.endswith("/data.pkl") and i.filename.count("/") == 1]
    if not pickles:
        raise LoadError(f"{path}: a zip file, but not one written by torch.save (no data.pkl)")
    prefix = pickles[0].filename.split("/", 1)[0]
    # torch never checks the CRCs it writes: the pickle (and the small records beside it) are
    # checked here, so a flipped bit in data.pkl is a corrupt file, not a silently wrong value.
    # Tensor records are not read at load time (memory-mapped); their CRCs are not checked.
    # (Compressed and encrypted records were refused by the parse: torch.save stores every record.)
    small: dict[str, bytes] = {}
    try:
        with open(path, "rb") as f:
            for i in infos:
                if i.file_size <= _CRC_CHECK_LIMIT:
                    f.seek(i.data_offset)
                    data = f.read(i.file_size)
                    if len(data) != i.file_size:
                        raise LoadError(f"{path}: truncated or corrupt zip container (record {i.filename!r} "
                                        "is cut short)")
                    if zlib.crc32(data) != i.CRC:
                        raise LoadError(f"{path}: truncated or corrupt zip container (Bad CRC-32 for file "
                                        f"{i.filename!r})")
                    small[i.filename] = data
    except OSError as e:
        raise LoadError(f"{path}: cannot read: {e.strerror or e}") from None
    _remember(key, layout)
    pkl = small.get(f"{prefix}/data.pkl")
    order = small.get(f"{prefix}/byteorder", b"little")
    fast = (pkl is not None and order == b"little" and sys.byteorder == "little"
            and not any(n.endswith("/constants.pkl") for n in small))
    return _Checked(layout, prefix, pkl or b"", fast)


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]
