"""Reading safetensors files lazily: header first, tensor data only when indexed."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping

import torch

from ..checkpoint import TensorMeta
from ..errors import LoadError
from .jsonfile import load as load_json
from .jsonfile import loads as loads_json
from .paths import member_path, require_regular

__all__ = ["LazySafetensors", "read_header", "open_safetensors", "open_sharded_index", "save_safetensors",
           "shard_plan", "save_sharded_safetensors"]

_DTYPE_SIZES = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1), "U8": ("uint8", 1),
    "BOOL": ("bool", 1), "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
    "U16": ("uint16", 2), "U32": ("uint32", 4), "U64": ("uint64", 8), "C64": ("complex64", 8),
}
_MAX_HEADER = 16 << 20  # ~200k tensors; real shards hold a few thousand (the format allows 100 MB)


def read_header(path: str) -> tuple[dict[str, TensorMeta], dict[str, str]]:
    """Parse and validate a safetensors header without reading tensor data.

    Returns the tensors' metadata in file (= name-sorted) order and the ``__metadata__`` dict.
    Every declared offset is checked against the file size, so a hostile header declaring huge
    tensors is rejected here instead of allocating."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if _MAX_HEADER < n <= size - 8:
                raise LoadError(f"{path}: safetensors header of {n:,} bytes (limit {_MAX_HEADER >> 20} MiB, about "
                                "200,000 tensors); refused")
            if n < 2 or n > size - 8:
                raise LoadError(f"{path}: not a valid safetensors file (header length {n} vs file size {size})")
            raw = f.read(n)
    except OSError as e:
        raise LoadError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        header = loads_json(raw)
    except ValueError as e:  # (UnicodeDecodeError and JSONDecodeError are ValueErrors)
        raise LoadError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise LoadError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_size = size - 8 - n
    meta: dict[str, TensorMeta] = {}
    extra = header.pop("__metadata__", None) or {}
    for name, info in header.items():
        try:
            dtype, itemsize = _DTYPE_SIZES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise LoadError(f"{path}: corrupt safetensors header entry for {name!r}") from None
        numel = 1
        for s in shape:
            if s < 0:
                raise LoadError(f"{path}: tensor {name!r} declares a negative dimension {shape}")
            numel *= s
        if not (0 <= begin <= end <= data_size) or end - begin != numel * itemsize:
            raise LoadError(
                f"{path}: tensor {name!r} declares {numel * itemsize} bytes at [{begin}, {end}) "
                f"but the file holds {data_size} data bytes: truncated or corrupt"
            )
        meta[name] = TensorMeta(shape, dtype, numel * itemsize)
    return meta, {str(k): str(v) for k, v in extra.items()}


class LazySafetensors(Mapping[str, torch.Tensor]):
    """A read-only mapping name → tensor over one or more safetensors files; data is read on access."""

    def __init__(self, files: dict[str, str], meta: dict[str, TensorMeta]):
        self._files = files  # tensor name -> file path
        self._meta = meta

    def __getitem__(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        path = self._files[key]
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                return f.get_tensor(key)
        except Exception as e:  # safetensors raises its own error types
            raise LoadError(f"{path}: cannot read tensor {key!r}: {e}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._meta)

    def __len__(self) -> int:
        return len(self._meta)


def open_safetensors(path: str) -> tuple[LazySafetensors, dict[str, TensorMeta], dict[str, str]]:
    meta, extra = read_header(path)
    return LazySafetensors({k: path for k in meta}, meta), meta, extra


def open_sharded_index(index_path: str) -> tuple[LazySafetensors, dict[str, TensorMeta], list[str]]:
    """A ``*.safetensors.index.json`` and its shards, as one lazy mapping (shards must exist)."""
    base = os.path.dirname(index_path)
    try:
        index = load_json(index_path)
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        raise LoadError(f"{index_path}: not a valid safetensors index (needs a 'weight_map' object)") from None
    shards = sorted(set(weight_map.values()))
    files: dict[str, str] = {}
    meta: dict[str, TensorMeta] = {}
    for shard in shards:
        shard_path = member_path(base, shard, index_path)
        require_regular(shard_path, index_path)
        shard_meta, _ = read_header(shard_path)
        for k, m in shard_meta.items():
            files[k] = shard_path
            meta[k] = m
    missing = [k for k in weight_map if k not in meta]
    if missing:
        raise LoadError(f"{index_path}: {len(missing)} tensors listed but absent from their shards, "
                        f"e.g. {missing[0]!r}")
    return LazySafetensors(files, meta), meta, shards


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str, metadata: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` as a safetensors file at ``path`` (an existing temp file), fsynced.

    Written here rather than with ``safetensors.torch.save_file``, which needs numpy (not a
    dependency of optckpt). The format: an 8-byte little-endian header length, a JSON header
    (dtype, shape, data offsets per tensor, padded with spaces to 8 bytes), then the raw bytes in
    header order. Each tensor's bytes are written straight from its memory (no copy)."""
    import ctypes
    import sys

    if sys.byteorder != "little":
        raise LoadError("writing safetensors needs a little-endian machine")
    codes = {name: code for code, (name, _) in _DTYPE_SIZES.items()}
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    order: list[tuple[str, torch.Tensor]] = []
    offset = 0
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype not in codes:
            raise LoadError(f"{name}: dtype {dtype} has no safetensors code")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": codes[dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        order.append((name, t))
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for _, t in order:
            n = t.numel() * t.element_size()
            if n:
                f.write((ctypes.c_char * n).from_address(t.data_ptr()))
        f.flush()
        os.fsync(f.fileno())


def shard_plan(sizes: Mapping[str, int], max_bytes: int) -> list[list[str]]:
    """Names grouped into shards of at most ``max_bytes`` each, in the given order, the way
    ``transformers`` cuts them (a tensor larger than the limit gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, n in sizes.items():
        if shards[-1] and used + n > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += n
    return [s for s in shards if s]


def save_sharded_safetensors(names: Mapping[str, int], get: Callable[[str], torch.Tensor], directory: str,
                             max_bytes: int) -> list[str]:
    """Hugging Face's sharded layout in the (empty, temp) ``directory``: ``model-0000X-of-0000N.safetensors``
    plus ``model.safetensors.index.json`` (``metadata.total_size``, ``weight_map``), or one
    ``model.safetensors`` when everything fits in one shard. ``names`` maps each tensor to its byte
    size; ``get(name)`` reads it. One shard's tensors are held at a time. Returns the files written."""
    plan = shard_plan(names, max_bytes)
    if len(plan) == 1:
        save_safetensors({k: get(k) for k in plan[0]}, os.path.join(directory, "model.safetensors"))
        return ["model.safetensors"]
    files = [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))]
    weight_map: dict[str, str] = {}
    for fname, keys in zip(files, plan):
        save_safetensors({k: get(k) for k in keys}, os.path.join(directory, fname))
        weight_map.update({k: fname for k in keys})
    index = {"metadata": {"total_size": sum(names.values())}, "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(directory, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    return [*files, "model.safetensors.index.json"]
