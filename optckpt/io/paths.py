"""Paths that a checkpoint names (DCP shards, safetensors index shards): kept inside the directory
the user gave, and only ever regular files (a FIFO or a device would hang or flood a read)."""

from __future__ import annotations

import os
import stat

from ..errors import LoadError

__all__ = ["member_path", "require_regular", "is_dcp_dir"]


def member_path(root: str, rel: object, what: str) -> str:
    """``root/rel`` for a relative name the checkpoint gives, refusing absolute paths, ``..``
    components, empty parts and NUL bytes (``what`` names the file that gave it, for the error)."""
    if not isinstance(rel, str) or not rel or "\0" in rel or os.path.isabs(rel) \
            or any(part in ("..", "") for part in rel.replace("\\", "/").split("/")):
        raise LoadError(f"{what}: names the path {rel!r}, which leaves the checkpoint directory; refused")
    return os.path.join(root, rel)


def require_regular(path: str, what: str) -> int:
    """The size of ``path``, which must exist and be a regular file (after symlinks); else one line."""
    try:
        st = os.stat(path)
    except OSError:
        raise LoadError(f"{what}: {os.path.basename(path)!r} is missing") from None
    if not stat.S_ISREG(st.st_mode):
        raise LoadError(f"{what}: {os.path.basename(path)!r} is not a regular file; refused")
    return st.st_size


def is_regular(path: str) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def is_dcp_dir(path: str) -> bool:
    """A DCP checkpoint directory: a regular ``.metadata`` file beside ``.distcp`` shards and no
    files of other layouts (a ``.metadata`` dropped into a HF / accelerate directory does not turn
    it into DCP)."""
    if not os.path.isdir(path) or not is_regular(os.path.join(path, ".metadata")):
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
