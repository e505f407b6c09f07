"""``torch.distributed.checkpoint`` (DCP) directories, read with DCP's own reader and planner.

Two of DCP's defaults execute checkpoint content: ``FileSystemReader.read_metadata`` unpickles
``.metadata`` with plain ``pickle``, and ``DefaultLoadPlanner.load_bytes`` uses
``torch.load(weights_only=False)`` for non-tensor entries. optckpt replaces exactly those two: the
metadata goes through an unpickler that only admits DCP's own metadata classes (and torch sizes,
dtypes, layouts), and byte entries through ``torch.load(weights_only=True)``. Everything else —
planning, reading shards, resharding — is DCP's.

Tensors are loaded lazily, one key at a time (memory bounded by the largest tensor, not the
checkpoint); ``inspect`` needs only the metadata plus the small non-tensor entries (param-group
hyperparameters, scheduler fields)."""

from __future__ import annotations

import errno
import io
import logging
import os
import pickle
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import Any

import torch

from ..checkpoint import Checkpoint, ModelState, OptimizerState, Part, SchedulerState, TensorMeta
from ..errors import LoadError, UnsafePickleError, WriteError
from .bounds import check_bounds
from .globals_guard import Globals, load_keeping
from .paths import is_dcp_dir, is_regular, member_path, require_regular
from .safepickle import torch_table_bounded
from .torchfile import check_zip_bytes

__all__ = ["is_dcp_dir", "load_dcp", "read_dcp_metadata", "save_dcp", "rewrite_dcp", "commit_in_place",
           "changed_small_values", "metadata_paths"]

# Exactly the globals DCP metadata pickles refer to, as (module, qualified name) pairs. Each is
# resolved once, here, from the module optckpt imports itself; ``find_class`` returns the object
# stored for the exact pair and never looks anything up by the name the file gives (a dotted name
# such as ``filesystem`` + ``os.system`` matches no pair). Every entry is a plain data class, an
# enum or a constructor with no side effects.
_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                                              "TensorStorageMetadata", "BytesStorageMetadata",
                                              "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING"),
    "torch.distributed.checkpoint.filesystem": ("_StorageInfo", "SerializationFormat"),
}
_OTHER_GLOBALS = {
    ("torch", "Size"): lambda: torch.Size,
    ("torch.serialization", "_get_layout"): lambda: torch.serialization._get_layout,
    ("collections", "OrderedDict"): lambda: __import__("collections").OrderedDict,
    ("builtins", "set"): lambda: set,
    ("builtins", "frozenset"): lambda: frozenset,
    ("pathlib", "PosixPath"): lambda: __import__("pathlib").PosixPath,
    ("pathlib", "PurePosixPath"): lambda: __import__("pathlib").PurePosixPath,
}
_allowed_cache: dict[tuple[str, str], Any] = {}


def metadata_globals() -> dict[tuple[str, str], Any]:
    """The exact (module, name) → object table the metadata unpickler admits (torch dtypes, layouts
    and memory formats are admitted separately, by type)."""
    if not _allowed_cache:
        import importlib

        for mod_name, names in _METADATA_CLASSES.items():
            mod = importlib.import_module(mod_name)
            for n in names:
                obj = getattr(mod, n, None)
                if isinstance(obj, type) and obj.__module__ == mod_name and obj.__qualname__ == n:
                    _allowed_cache[(mod_name, n)] = obj
        for key, get in _OTHER_GLOBALS.items():
            _allowed_cache[key] = get()
    return _allowed_cache


_TORCH_VALUE_TYPES = (torch.dtype, torch.layout, torch.memory_format)


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata objects and nothing else: any other global is refused, unexecuted."""

    def __init__(self, f: Any, path: str):
        super().__init__(f)
        self._path = path
        self._globals = Globals()  # (BUILD on a class it hands out: put back, and the file refused)

    def find_class(self, module: str, name: str) -> Any:
        obj = metadata_globals().get((module, name))
        if obj is not None:
            self._globals.note(obj, f"{module}.{name}")
            return obj
        if module == "torch" and name.isidentifier() and isinstance(vars(torch).get(name), _TORCH_VALUE_TYPES):
            return vars(torch)[name]
        raise UnsafePickleError(self._path, [f"{module}.{name}"])

    def checked_load(self) -> Any:
        return load_keeping(self, self._globals, lambda name: LoadError(
            f"{self._path}: the pickle sets the state of {name} (it would change it for the whole process): not DCP "
            "metadata; refused"))

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(self._path, ["(persistent id)"])


def read_dcp_metadata(path: str) -> Any:
    meta_path = os.path.join(path, ".metadata")
    if not is_regular(meta_path):
        raise LoadError(f"{meta_path}: not a regular file")
    try:
        with open(meta_path, "rb") as f:
            md = _MetadataUnpickler(f, meta_path).checked_load()
    except (UnsafePickleError, LoadError):
        raise
    except RecursionError:
        raise LoadError(f"{meta_path}: nested too deeply to be DCP metadata") from None
    except Exception as e:
        raise LoadError(f"{meta_path}: not a readable DCP metadata file ({type(e).__name__}: {e})") from None
    from torch.distributed.checkpoint.metadata import Metadata

    if type(md) is not Metadata:
        raise LoadError(f"{meta_path}: not DCP metadata")
    _check_storage_paths(path, md)
    return md


def _check_storage_paths(root: str, md: Any) -> None:
    """Every shard the metadata names must be a regular file inside the checkpoint directory
    (no ``..``, no absolute path, no symlink out of it, no FIFO or device), and every byte range
    must lie inside it: DCP would otherwise open whatever path the file gives."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    real_root = os.path.realpath(root)
    what = f"{root}/.metadata"
    sizes: dict[str, int] = {}
    storage = md.storage_data if isinstance(md.storage_data, Mapping) else {}
    for idx, info in storage.items():
        if type(info) is not _StorageInfo:
            raise LoadError(f"{what}: storage entry {_fqn(idx)!r} is not a DCP storage record")
        rel = info.relative_path
        if rel not in sizes:
            real = os.path.realpath(member_path(real_root, rel, what))
            if os.path.commonpath([real_root, real]) != real_root:
                raise LoadError(f"{what}: shard {rel!r} leads outside the checkpoint directory; refused")
            sizes[rel] = require_regular(real, what)
        off, length = info.offset, info.length
        if not (isinstance(off, int) and isinstance(length, int)) or off < 0 or length < 0 \
                or off + length > sizes[rel]:
            raise LoadError(f"{root}: entry {_fqn(idx)!r} points past the end of shard {rel!r}")


def _fqn(idx: Any) -> str:
    return str(getattr(idx, "fqn", idx))


def _reader(path: str) -> Any:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            md = read_dcp_metadata(path)
            if getattr(md, "storage_meta", None) is None:
                md.storage_meta = StorageMeta()
            md.storage_meta.load_id = self.load_id
            return md

    return SafeReader(path)


def _planner(results: dict[str, Any], refused: list[LoadError], path: str) -> Any:
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class SafePlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            fqn = read_item.dest_index.fqn
            try:
                check_zip_bytes(value.getvalue(), f"{path} (DCP entry {fqn})")
                with torch_table_bounded():
                    results[fqn] = torch.load(value, weights_only=True)
                check_bounds(results[fqn], f"{path} (DCP entry {fqn})", len(value.getvalue()))
            except LoadError as e:
                refused.append(e)
                raise
            except pickle.UnpicklingError:
                value.seek(0)
                try:
                    names = list(torch.serialization.get_unsafe_globals_in_checkpoint(value))
                except Exception:
                    names = []
                refused.append(UnsafePickleError(f"{path} (DCP entry {fqn})", names))
                raise refused[-1] from None

    return SafePlanner(flatten_state_dict=False)


def _dcp_load(path: str, keys: Mapping[str, Any]) -> dict[str, Any]:
    """Load the given flat keys (tensors: preallocated; bytes: anything) with DCP, safely."""
    import torch.distributed.checkpoint as dcp

    results: dict[str, Any] = {}
    refused: list[LoadError] = []
    sd = dict(keys)
    quiet = logging.getLogger("c10d-NullHandler-dcp_logger")
    was_disabled, quiet.disabled = quiet.disabled, True  # DCP logs failures at ERROR: one line is ours to print
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            dcp.load(sd, storage_reader=_reader(path), planner=_planner(results, refused, path), no_dist=True)
        except LoadError:
            raise
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # DCP's CheckpointException derives from BaseException
            if refused:
                raise refused[0] from None
            raise LoadError(f"{path}: DCP read failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
        finally:
            quiet.disabled = was_disabled
    for k, v in sd.items():
        if isinstance(v, torch.Tensor):
            results[k] = v
    return results


class LazyDCPTensors(Mapping[str, torch.Tensor]):
    """name → tensor for one prefix of a DCP checkpoint; each access reads that one tensor."""

    def __init__(self, path: str, prefix: str, meta: dict[str, TensorMeta], dtypes: dict[str, torch.dtype]):
        self._path, self._prefix, self._meta, self._dtypes = path, prefix, meta, dtypes

    def __getitem__(self, key: str) -> torch.Tensor:
        m = self._meta[key]
        full = self._prefix + key
        out = torch.empty(m.shape, dtype=self._dtypes[key])
        return _dcp_load(self._path, {full: out})[full]

    def __iter__(self) -> Iterator[str]:
        return iter(self._meta)

    def __len__(self) -> int:
        return len(self._meta)


def load_dcp(path: str) -> Checkpoint:
    """A DCP directory as a :class:`Checkpoint`: model tensors lazily, optimizer state FQN-keyed
    (``{"state": {fqn: {...}}, "param_groups": [{..., "params": [fqn, ...]}]}``, as
    ``get_optimizer_state_dict`` returns it), scheduler and extra entries loaded (they are small)."""
    md = read_dcp_metadata(path)
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

    items = md.state_dict_metadata
    mapping: dict[str, tuple[Any, ...]] = dict(md.planner_data or {})
    ck = Checkpoint(path=path, layout="dcp")
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if os.path.isfile(full):
            ck.parts.append(Part(name, "dcp", os.path.getsize(full)))
    tensor_meta: dict[str, TensorMeta] = {}
    dtypes: dict[str, torch.dtype] = {}
    byte_keys: list[str] = []
    for key, m in items.items():
        if isinstance(m, TensorStorageMetadata):
            dt = m.properties.dtype
            numel = 1
            for s in m.size:
                numel *= s
            tensor_meta[key] = TensorMeta(tuple(m.size), str(dt).removeprefix("torch."),
                                          numel * torch.empty(0, dtype=dt).element_size())
            dtypes[key] = dt
        elif isinstance(m, BytesStorageMetadata):
            byte_keys.append(key)
    small = _dcp_load(path, {k: io.BytesIO() for k in byte_keys}) if byte_keys else {}
    # rebuild the nested structure from DCP's flattening (planner_data: flat key -> path tuple)
    tree: dict[str, Any] = {}
    for key in [*tensor_meta, *byte_keys]:
        parts = mapping.get(key) or tuple(key.split("."))
        value: Any = small.get(key) if key in small else ("tensor", key)
        node: Any = tree
        for p in parts[:-1]:
            node = node.setdefault(p if isinstance(p, int) else str(p), {})
        node[parts[-1] if isinstance(parts[-1], int) else str(parts[-1])] = value
    for top, sub in tree.items():
        if not isinstance(sub, dict):
            ck.extras[top] = sub
            continue
        if "state" in sub and "param_groups" in sub:
            ck.optimizers.append(OptimizerState(top, "dcp", (top,), _optimizer(path, top, sub, tensor_meta, dtypes)))
        elif "last_epoch" in sub or "_schedulers" in sub:
            ck.schedulers.append(SchedulerState(top, "dcp", (top,), _listify(sub)))
        elif all(isinstance(v, tuple) and v and v[0] == "tensor" for v in _leaves(sub)):
            keys = {k[len(top) + 1:]: m for k, m in tensor_meta.items() if k.startswith(top + ".")}
            dts = {k[len(top) + 1:]: d for k, d in dtypes.items() if k.startswith(top + ".")}
            ck.models.append(ModelState(top, "dcp", (top,), LazyDCPTensors(path, top + ".", keys, dts), keys,
                                        order_trusted=True))
        else:  # torchtitan's "extra" (and any other small dict): its entries are extras, nested ones included
            for k, v in sub.items():
                ck.extras[str(k) if top == "extra" else f"{top}.{k}"] = _materialize(path, _listify(v), tensor_meta,
                                                                                     dtypes)
    return ck


def _materialize(path: str, node: Any, meta: Mapping[str, TensorMeta], dtypes: Mapping[str, torch.dtype]) -> Any:
    """An extra entry with its tensors read (the ``("tensor", flat_key)`` references of the tree)."""
    if isinstance(node, tuple) and len(node) == 2 and node[0] == "tensor" and node[1] in meta:
        return LazyDCPTensors(path, "", {node[1]: meta[node[1]]}, {node[1]: dtypes[node[1]]})[node[1]]
    if isinstance(node, dict):
        return {k: _materialize(path, v, meta, dtypes) for k, v in node.items()}
    if isinstance(node, list):
        return [_materialize(path, v, meta, dtypes) for v in node]
    return node


def _listify(node: Any) -> Any:
    """DCP flattens lists of dicts by index (``_schedulers.0.base_lrs``): rebuild those lists."""
    if not isinstance(node, dict):
        return node
    out = {k: _listify(v) for k, v in node.items()}
    if out and all(type(k) is int for k in out) and sorted(out) == list(range(len(out))):
        return [out[i] for i in range(len(out))]
    return out


def _leaves(d: Mapping[str, Any]) -> Iterator[Any]:
    for v in d.values():
        if isinstance(v, Mapping):
            yield from _leaves(v)
        else:
            yield v


def _optimizer(path: str, top: str, sub: dict[str, Any], meta: Mapping[str, TensorMeta],
               dtypes: Mapping[str, torch.dtype]) -> dict[str, Any]:
    """The FQN-keyed optimizer state dict; tensors are materialised lazily by ``materialize``."""
    groups_raw = sub["param_groups"]
    groups = [groups_raw[k] for k in sorted(groups_raw, key=lambda x: int(x))] if isinstance(groups_raw, dict) \
        else list(groups_raw)
    state: dict[str, dict[str, Any]] = {}
    for fqn, entry in sub["state"].items():
        state[fqn] = {}
        for k, v in entry.items():
            if isinstance(v, tuple) and v and v[0] == "tensor":
                state[fqn][k] = DCPTensorRef(path, v[1], meta[v[1]], dtypes[v[1]])
            else:
                state[fqn][k] = v
    return {"state": state, "param_groups": groups}


class DCPTensorRef:
    """An optimizer state tensor still on disk: its shape and dtype are known; ``load()`` reads it."""

    def __init__(self, path: str, key: str, meta: TensorMeta, dtype: torch.dtype):
        self.path, self.key, self.meta, self.dtype = path, key, meta, dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self.meta.shape

    def load(self) -> torch.Tensor:
        out = torch.empty(self.meta.shape, dtype=self.dtype)
        return _dcp_load(self.path, {self.key: out})[self.key]


def save_dcp(state: dict[str, Any], out: str) -> None:
    """Write ``state`` (nested dicts of tensors and small values) as a DCP checkpoint at ``out``."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=out, no_dist=True)


_EXTRA_PREFIX = "__optckpt_"


def _link_or_copy(src: str, dst: str) -> None:
    """``dst`` := ``src`` without copying bytes where the filesystem allows (a hard link: the shard
    is read-only content, DCP never rewrites a shard file), else a kernel copy."""
    import shutil

    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EXDEV, errno.ENOTSUP, errno.EMLINK, errno.EOPNOTSUPP, errno.EACCES):
            raise
        shutil.copyfile(src, dst)


def metadata_paths(md: Any) -> dict[str, tuple[Any, ...]]:
    """Flat DCP key → the nested key path it was flattened from (``planner_data``)."""
    paths: dict[str, tuple[Any, ...]] = dict(md.planner_data or {})
    return {k: tuple(paths.get(k) or k.split(".")) for k in md.state_dict_metadata}


def _at(node: Any, path: Sequence[Any]) -> Any:
    for p in path:
        if isinstance(node, Mapping):
            node = node[p] if p in node else node[str(p)]
        else:
            node = node[int(p)]
    return node


def changed_small_values(path: str, top: str, old: Any, new: Any) -> dict[tuple[Any, ...], Any]:
    """The small (non-tensor) entries under ``top`` whose value differs between the nested ``old``
    and ``new`` structures, keyed by DCP key path — exactly DCP's flattening granularity, read off
    the metadata. Param-group keys that ``new`` adds get a path of their own."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    md = read_dcp_metadata(path)
    out: dict[tuple[Any, ...], Any] = {}
    seen: set[tuple[Any, ...]] = set()
    for key, kpath in metadata_paths(md).items():
        if kpath[0] != top or not isinstance(md.state_dict_metadata[key], BytesStorageMetadata):
            continue
        seen.add(kpath)
        try:
            before, after = _at(old, kpath[1:]), _at(new, kpath[1:])
        except (KeyError, IndexError, ValueError, TypeError):
            continue
        if type(before) is not type(after) or repr(before) != repr(after):
            out[kpath] = after
    groups = new.get("param_groups") if isinstance(new, Mapping) else None
    for i, g in enumerate(groups if isinstance(groups, list) else []):
        for k, v in g.items():
            if (top, "param_groups", i, k) not in seen and k not in ("params", "param_names"):
                out[(top, "param_groups", i, k)] = v
    return out


def rewrite_dcp(src: str, tmp: str, rename: Callable[[str], str | None] | None = None, *,
                values: Mapping[tuple[Any, ...], Any] | None = None, fills: Mapping[str, float] | None = None,
                drop: Collection[str] = ()) -> dict[str, int]:
    """An edited DCP checkpoint written into the empty (temp) directory ``tmp``; the caller verifies
    it and commits it.

    ``rename(fqn) -> new fqn | None`` renames (or drops) every entry of a parameter; ``values`` sets
    small entries (key path → value, new paths added); ``fills`` replaces whole tensor entries (flat
    key → the value every element starts at); ``drop`` removes flat keys. Nothing is re-serialised:
    the shard files are hard-linked (copied where links fail) as they are, the metadata's keys are
    edited, and only what changed — small values, re-initialised tensors, renamed
    ``param_groups.*.params`` lists — is written, into one extra shard. Memory stays bounded by the
    metadata plus the largest re-initialised tensor, whatever the checkpoint size."""
    import dataclasses

    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        ChunkStorageMetadata,
        MetadataIndex,
        TensorStorageMetadata,
    )

    md = read_dcp_metadata(src)
    paths = metadata_paths(md)
    values, fills, dropped = dict(values or {}), dict(fills or {}), set(drop)
    unknown = [k for k in (*fills, *dropped) if k not in md.state_dict_metadata]
    if unknown:
        raise WriteError(f"{src}: no DCP entry {unknown[0]!r}")

    def new_path(path: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if rename is None:
            return path
        if len(path) >= 2 and path[0] == "model":
            fqn = rename(str(path[1]))
            return None if fqn is None else ("model", fqn, *path[2:])
        if len(path) >= 4 and path[0] == "optimizer" and path[1] == "state":
            fqn = rename(str(path[2]))
            return None if fqn is None else (*path[:2], fqn, *path[3:])
        return path

    def flat(path: Sequence[Any]) -> str:
        return ".".join(str(p) for p in path)

    key_map: dict[str, str | None] = {}
    for key in md.state_dict_metadata:
        np_ = None if key in dropped else new_path(paths[key])
        key_map[key] = None if np_ is None else flat(np_)
    if rename is not None:
        params_keys = [k for k, p in paths.items() if p[:2] == ("optimizer", "param_groups") and p[-1] == "params"
                       and paths[k] not in values]
        loaded = _dcp_load(src, {k: io.BytesIO() for k in params_keys}) if params_keys else {}
        for k, v in loaded.items():
            values[paths[k]] = [r for r in (rename(str(n)) for n in v) if r is not None]
    counts = {"renamed": sum(1 for k, v in key_map.items() if v is not None and v != k),
              "dropped": sum(1 for v in key_map.values() if v is None), "written": len(values) + len(fills)}
    by_path = {p: k for k, p in paths.items()}
    try:
        names = {info.relative_path for info in md.storage_data.values()}
        for name in sorted(names):
            _link_or_copy(os.path.join(src, name), os.path.join(tmp, name))
        taken = names | set(os.listdir(src))
        extra_name = next(f"{_EXTRA_PREFIX}{i}.distcp" for i in range(len(taken) + 1)
                          if f"{_EXTRA_PREFIX}{i}.distcp" not in taken)
        written_at: dict[str, tuple[int, int]] = {}  # new flat key -> (offset, length) in the extra shard
        sdm: dict[str, Any] = {}
        planner: dict[str, Any] = {}
        for k, v in md.state_dict_metadata.items():
            nk = key_map[k]
            if nk is not None:
                sdm[nk], planner[nk] = v, new_path(paths[k])
        with open(os.path.join(tmp, extra_name), "wb") as f:
            def put(obj: Any) -> tuple[int, int]:
                buf = io.BytesIO()
                torch.save(obj, buf)
                at = (f.tell(), buf.getbuffer().nbytes)
                f.write(buf.getbuffer())
                return at

            for kpath, value in values.items():
                old_key = by_path.get(kpath)
                nk = flat(kpath) if old_key is None else key_map[old_key]
                if nk is None:
                    continue
                if old_key is not None and not isinstance(md.state_dict_metadata[old_key], BytesStorageMetadata):
                    raise WriteError(f"{src}: entry {old_key!r} is a tensor, not a small value")
                written_at[nk] = put(value)
                sdm[nk], planner[nk] = BytesStorageMetadata(), tuple(kpath)
            for key, fill in fills.items():
                nk = key_map[key]
                m = md.state_dict_metadata[key]
                if nk is None or not isinstance(m, TensorStorageMetadata):
                    continue
                written_at[nk] = put(torch.full(tuple(m.size), fill, dtype=m.properties.dtype))
                sdm[nk] = dataclasses.replace(m, chunks=[ChunkStorageMetadata(
                    offsets=torch.Size([0] * len(m.size)), sizes=torch.Size(m.size))])
            f.flush()
            os.fsync(f.fileno())
        storage: dict[Any, Any] = {}
        for idx, info in md.storage_data.items():
            nk = key_map.get(idx.fqn, idx.fqn)
            if nk is None or nk in written_at:
                continue
            storage[MetadataIndex(nk, idx.offset, idx.index)] = info
        for nk, (off, length) in written_at.items():
            m = sdm[nk]
            offset = torch.Size([0] * len(m.size)) if isinstance(m, TensorStorageMetadata) else None
            storage[MetadataIndex(nk, offset, 0 if offset is not None else None)] = _StorageInfo(
                relative_path=extra_name, offset=off, length=length)
        if not written_at:
            os.unlink(os.path.join(tmp, extra_name))
        new_md = dataclasses.replace(md, state_dict_metadata=sdm, storage_data=storage, planner_data=planner)
        if getattr(new_md, "storage_meta", None) is not None:
            new_md.storage_meta = dataclasses.replace(new_md.storage_meta, load_id="")
        with open(os.path.join(tmp, ".metadata"), "wb") as f:
            pickle.dump(new_md, f)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise WriteError(f"{tmp}: write failed: {e.strerror or e}") from None
    return counts


def commit_in_place(src: str, staged: str, *, verify: Callable[[str], None] | None = None,
                    replace_backup: bool = False) -> str:
    """Make the verified edit staged in ``staged`` (a sibling directory from :func:`rewrite_dcp`)
    the content of ``src``: its extra shard is linked in under a name no file there has, the current
    ``.metadata`` is kept as ``.metadata.bak`` (a hard link), and the new ``.metadata`` replaces the
    old one with one atomic rename — a reader sees the old checkpoint or the new one, never a mix.
    The shards the old metadata names are never touched, so ``.metadata.bak`` restores it exactly;
    extra shards referenced by neither metadata are removed. ``staged`` is removed in every case."""
    import shutil

    from .write import _fsync_dir

    meta, bak = os.path.join(src, ".metadata"), os.path.join(src, ".metadata.bak")
    added: list[str] = []
    try:
        if verify is not None:
            verify(staged)
        if os.path.lexists(bak) and not (replace_backup and is_regular(bak)):
            raise WriteError(f"{bak}: a previous backup is in the way; move it away or pass --replace-backup")
        for name in os.listdir(staged):
            if name.startswith(_EXTRA_PREFIX) and not os.path.lexists(os.path.join(src, name)):
                os.link(os.path.join(staged, name), os.path.join(src, name))
                added.append(name)
        _fsync_dir(src)
        tmp_bak = os.path.join(src, f".metadata.bak.optckpt-{os.getpid()}.tmp")
        if os.path.lexists(tmp_bak):
            os.unlink(tmp_bak)
        os.link(meta, tmp_bak)
        os.replace(tmp_bak, bak)
        os.replace(os.path.join(staged, ".metadata"), meta)
    except BaseException as e:
        for name in added:
            try:
                os.unlink(os.path.join(src, name))
            except OSError:
                pass
        if isinstance(e, OSError):
            raise WriteError(f"{src}: in-place write failed: {e.strerror or e}") from None
        raise
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    _fsync_dir(src)
    referenced = {info.relative_path for m in (meta, bak) for info in _storage_of(m)}
    for name in os.listdir(src):
        if name.startswith(_EXTRA_PREFIX) and name.endswith(".distcp") and name not in referenced:
            os.unlink(os.path.join(src, name))
    return src


def _storage_of(meta_path: str) -> Iterator[Any]:
    try:
        with open(meta_path, "rb") as f:
            md = _MetadataUnpickler(f, meta_path).checked_load()
    except Exception:
        return
    yield from (md.storage_data.values() if isinstance(md.storage_data, Mapping) else ())
