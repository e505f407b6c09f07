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

import io
import logging
import os
import pickle
import stat
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from ..checkpoint import Checkpoint, ModelState, OptimizerState, Part, SchedulerState, TensorMeta
from ..errors import LoadError, UnsafePickleError, WriteError
from .bounds import check_bounds
from .paths import member_path, require_regular

__all__ = ["is_dcp_dir", "load_dcp", "read_dcp_metadata", "save_dcp"]

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

    def find_class(self, module: str, name: str) -> Any:
        obj = metadata_globals().get((module, name))
        if obj is not None:
            return obj
        if module == "torch" and name.isidentifier() and isinstance(vars(torch).get(name), _TORCH_VALUE_TYPES):
            return vars(torch)[name]
        raise UnsafePickleError(self._path, [f"{module}.{name}"])

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(self._path, ["(persistent id)"])


def _is_regular(path: str) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def is_dcp_dir(path: str) -> bool:
    """A DCP checkpoint directory: a regular ``.metadata`` file beside ``.distcp`` shards and no
    files of other layouts (a ``.metadata`` dropped into a HF / accelerate directory does not turn
    it into DCP)."""
    if not os.path.isdir(path) or not _is_regular(os.path.join(path, ".metadata")):
        return False
    try:
        names = os.listdir(path)
    except OSError:
        return False
    if any(n.endswith(_OTHER_LAYOUT_SUFFIXES) or n in _OTHER_LAYOUT_FILES for n in names):
        return False
    return any(n.endswith(".distcp") for n in names)


_OTHER_LAYOUT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".pkl", ".tar")
_OTHER_LAYOUT_FILES = frozenset({"config.json", "trainer_state.json", "adapter_config.json"})


def read_dcp_metadata(path: str) -> Any:
    meta_path = os.path.join(path, ".metadata")
    if not _is_regular(meta_path):
        raise LoadError(f"{meta_path}: not a regular file")
    try:
        with open(meta_path, "rb") as f:
            md = _MetadataUnpickler(f, meta_path).load()
    except UnsafePickleError:
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
                results[fqn] = torch.load(value, weights_only=True)
                check_bounds(results[fqn], f"{path} (DCP entry {fqn})")
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
            node = node.setdefault(str(p), {})
        node[str(parts[-1])] = value
    for top, sub in tree.items():
        if not isinstance(sub, dict):
            ck.extras[top] = sub
            continue
        if "state" in sub and "param_groups" in sub:
            ck.optimizers.append(OptimizerState(top, "dcp", (top,), _optimizer(path, top, sub, tensor_meta, dtypes)))
        elif "last_epoch" in sub or "_schedulers" in sub:
            ck.schedulers.append(SchedulerState(top, "dcp", (top,), sub))
        elif all(isinstance(v, tuple) and v and v[0] == "tensor" for v in _leaves(sub)):
            keys = {k[len(top) + 1:]: m for k, m in tensor_meta.items() if k.startswith(top + ".")}
            dts = {k[len(top) + 1:]: d for k, d in dtypes.items() if k.startswith(top + ".")}
            ck.models.append(ModelState(top, "dcp", (top,), LazyDCPTensors(path, top + ".", keys, dts), keys,
                                        order_trusted=True))
        else:  # torchtitan's "extra" (and any other small dict): its scalars are extras
            for k, v in sub.items():
                if not isinstance(v, dict):
                    ck.extras[k if top == "extra" else f"{top}.{k}"] = v
    return ck


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


def rewrite_dcp(src: str, tmp: str, rename: Any) -> dict[str, int]:
    """A DCP checkpoint with parameter FQNs renamed (``rename(fqn) -> new fqn``, or None to drop the
    parameter's entries), written into the empty (temp) directory ``tmp``; the caller verifies it
    and renames it into place.

    Nothing is re-serialised: the shard files are copied as they are (``shutil.copyfile``: a kernel
    copy), the metadata's keys are renamed, dropped entries simply lose their metadata, and only the
    small ``param_groups.*.params`` lists are rewritten — into one extra shard file. Memory stays
    bounded by the metadata, whatever the checkpoint size."""
    import dataclasses
    import shutil

    from torch.distributed.checkpoint.metadata import MetadataIndex

    md = read_dcp_metadata(src)
    paths: dict[str, tuple[Any, ...]] = dict(md.planner_data or {})

    def new_path(path: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if len(path) >= 2 and path[0] == "model":
            fqn = rename(str(path[1]))
            return None if fqn is None else ("model", fqn, *path[2:])
        if len(path) >= 4 and path[0] == "optimizer" and path[1] == "state":
            fqn = rename(str(path[2]))
            return None if fqn is None else (*path[:2], fqn, *path[3:])
        return path

    def flat(path: tuple[Any, ...]) -> str:
        return ".".join(str(p) for p in path)

    key_map: dict[str, str | None] = {}
    for key in md.state_dict_metadata:
        path = paths.get(key, tuple(key.split(".")))
        np_ = new_path(path)
        key_map[key] = None if np_ is None else flat(np_)
    params_keys = [k for k in md.state_dict_metadata
                   if paths.get(k, ())[:2] == ("optimizer", "param_groups") and paths[k][-1] == "params"]
    new_params = {k: [r for r in (rename(str(n)) for n in v) if r is not None]
                  for k, v in _dcp_load(src, {k: io.BytesIO() for k in params_keys}).items()} if params_keys else {}
    counts = {"renamed": sum(1 for k, v in key_map.items() if v is not None and v != k),
              "dropped": sum(1 for v in key_map.values() if v is None)}
    try:
        for name in {info.relative_path for info in md.storage_data.values()}:
            shutil.copyfile(os.path.join(src, name), os.path.join(tmp, name))
        names = {info.relative_path for info in md.storage_data.values()}
        extra_name = next(f"__optckpt_{i}.distcp" for i in range(len(names) + 1)
                          if f"__optckpt_{i}.distcp" not in names)
        extra_info: dict[str, tuple[int, int]] = {}
        with open(os.path.join(tmp, extra_name), "wb") as f:
            for k, value in new_params.items():
                buf = io.BytesIO()
                torch.save(value, buf)
                extra_info[k] = (f.tell(), buf.getbuffer().nbytes)
                f.write(buf.getbuffer())
        sdm = {key_map[k]: v for k, v in md.state_dict_metadata.items() if key_map[k] is not None}
        storage: dict[Any, Any] = {}
        for idx, info in md.storage_data.items():
            nk = key_map.get(idx.fqn, idx.fqn)
            if nk is None:
                continue
            if idx.fqn in extra_info:
                off, length = extra_info[idx.fqn]
                info = dataclasses.replace(info, relative_path=extra_name, offset=off, length=length)
            storage[MetadataIndex(nk, idx.offset, idx.index)] = info
        planner = {key_map[k]: new_path(v) for k, v in paths.items() if key_map.get(k) is not None}
        new_md = dataclasses.replace(md, state_dict_metadata=sdm, storage_data=storage, planner_data=planner)
        if hasattr(new_md, "storage_meta") and new_md.storage_meta is not None:
            new_md.storage_meta = dataclasses.replace(new_md.storage_meta, load_id="")
        with open(os.path.join(tmp, ".metadata"), "wb") as f:
            pickle.dump(new_md, f)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise WriteError(f"{tmp}: write failed: {e.strerror or e}") from None
    return counts
