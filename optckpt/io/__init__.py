"""Readers (and later writers) for every checkpoint layout. The only place that touches files."""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping
from typing import Any

from ..checkpoint import Checkpoint, ModelState, OpaquePart, Part, path_str
from ..errors import LoadError, UnsafePickleError
from ..gcpause import gc_paused
from ..kinds import PARAM_SHAPED_KEYS
from .discover import discover
from .jsonfile import load as load_json
from .paths import is_dcp_dir
from .peft import ADAPTER_FILES
from .safepickle import PickledObject, describe, first_placeholder
from .torchfile import load_torch_file, sniff, unsafe_globals

# Readers of directory layouts and of safetensors import torch (DCP's metadata, model classes on the meta
# device): imported where such a checkpoint is read, so that a metadata command on a torch zip file runs
# without torch (optckpt.tensors). The DeepSpeed reader imports torch only to join a piece split between
# ranks (or through the torch-backed readers, for files the lazy reader leaves to them).

__all__ = ["load", "adopt_target_adapter"]

# Files in a directory checkpoint that hold training bookkeeping, not state optckpt edits: when a
# weights_only load refuses them they are kept opaque (listed with the globals they need) instead of
# failing the whole load. Any other refused file is an error: it may be the optimizer itself.
_AUXILIARY = re.compile(
    r"^(rng_state.*\.pth|training_args\.bin|random_states_\d+\.pkl|custom_checkpoint_\d+\.pkl"
    r"|sampler(_\d+)?\.bin|dl_state_dict(_\d+)?\.bin|scaler\.pt)$"
)
_SKIP_SUFFIXES = (".lock", ".tmp")


def load(path: str | os.PathLike[str], *, model: str | os.PathLike[str] | None = None,
         trust_pickle: bool = False, lazy: bool = False) -> Checkpoint:
    """Read a checkpoint file or directory into a :class:`Checkpoint`, detecting its layout by content.

    ``model`` joins a separately saved model state dict (the ``model_0.pth`` + ``optimizer_0.pth``
    case). Tensors are memory-mapped, never copied into private memory, and always loaded onto the
    CPU. Nothing is executed: ``torch.load`` runs with ``weights_only=True`` unless ``trust_pickle``.
    ``lazy``: tensors of torch zip files as :class:`~optckpt.tensors.RecordTensor` where the lazy
    reader can describe them (for commands that need no tensor values: torch is not imported)."""
    p = os.fspath(path)
    try:
        st = os.stat(p)
    except PermissionError:
        raise LoadError(f"{p}: permission denied") from None
    except OSError:
        raise LoadError(f"{p}: no such file or directory") from None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        raise LoadError(f"{p}: not a regular file or directory (a FIFO, socket or device); refused")
    with gc_paused():  # loading builds many small containers and few cycles: no repeated scans of a growing heap
        if is_dcp_dir(p):
            from .dcp import load_dcp

            ckpt = load_dcp(p)
        elif os.path.isdir(p):
            ckpt = _load_directory(p, trust_pickle, lazy)
        else:
            ckpt = _load_file(p, trust_pickle, lazy)
        if model is not None:
            _join_model(ckpt, os.fspath(model), trust_pickle, lazy)
    return ckpt


def _load_file(path: str, trust_pickle: bool, lazy: bool = False) -> Checkpoint:
    if not os.access(path, os.R_OK):
        raise LoadError(f"{path}: permission denied")
    name = os.path.basename(path)
    kind = sniff(path)
    size = os.path.getsize(path)
    if kind == "safetensors":
        from .safetensors_io import open_safetensors

        tensors, meta, extra = open_safetensors(path)
        ck = Checkpoint(path=path, layout="safetensors")
        ck.parts.append(Part(name, "safetensors", size))
        ck.models.append(ModelState(name, name, (), tensors, meta, order_trusted=False))
        ck.extras.update({f"__metadata__.{k}": v for k, v in extra.items()})
        return ck
    if kind in ("zip", "legacy"):
        loaded = load_torch_file(path, trust_pickle=trust_pickle, kind=kind, lazy=lazy)
        found = discover(loaded.obj, name)
        layout = _classify_torch(loaded.obj, found)
        ck = Checkpoint(path=path, layout=layout)
        ck.parts.append(Part(name, "torch", size, loaded.obj, loaded.saved_locations, loaded.zip_format))
        ck.models, ck.optimizers, ck.schedulers = found.models, found.optimizers, found.schedulers
        ck.extras, ck.other_keys, ck.objects = found.extras, found.other_keys, found.objects
        if loaded.placeholders:
            _refuse_placeholders(path, found)
        _check_counts(path, found)
        if not (found.models or found.optimizers or found.schedulers):
            raise LoadError(
                f"{path}: a torch file, but no model, optimizer or scheduler state dict found in it "
                f"(top level: {_describe(loaded.obj)})"
            )
        return ck
    if kind == "empty":
        raise LoadError(f"{path}: empty file (0 bytes): not a checkpoint")
    raise LoadError(f"{path}: not a checkpoint: neither a torch.save file (zip or legacy pickle) nor safetensors")


MAX_OPTIMIZER_INDICES = 1_000_000


def _check_counts(path: str, found: Any) -> None:
    """An optimizer of more than a million parameter tensors is not one any model has (the largest
    real ones hold ~10^5): refused before any per-index work, which would take minutes and gigabytes."""
    for o in found.optimizers:
        groups = o.state_dict.get("param_groups", [])
        n = sum(len(g.get("params", ())) for g in groups if isinstance(g, Mapping))
        if n > MAX_OPTIMIZER_INDICES or len(o.state) > MAX_OPTIMIZER_INDICES:
            raise LoadError(f"{path}: optimizer {o.name} lists {max(n, len(o.state)):,} parameter indices "
                            f"(limit {MAX_OPTIMIZER_INDICES:,}); refused")


def _refuse_placeholders(path: str, found: Any) -> None:
    """Optimizer and scheduler state is plain data: a pickled object (read as a placeholder, not
    run) where a number or a tensor belongs is refused here, not misread later."""
    for st in (*found.optimizers, *found.schedulers):
        hit = first_placeholder(_outside_entry_values(st.state_dict) if st in found.optimizers else st.state_dict)
        if hit is not None:
            where = path_str((*st.path, *hit[0]))
            obj = hit[1]
            name = obj.type_name if isinstance(obj, PickledObject) else obj.name
            raise UnsafePickleError(path, [name], f"{where or '(root)'} is a pickled object, {describe(obj)}, where "
                                    "optimizer / scheduler state must be plain data")


def _outside_entry_values(sd: Any) -> Any:
    """An optimizer state dict without the values of its per-parameter entries: a pickled object
    there (GaLore's projector, a ``collections.deque`` of past gradients, a preconditioner) belongs
    to one parameter and moves with it by name as an opaque value, written back as it was read.
    The values of torch's own tensor keys (``exp_avg``, ``momentum_buffer``, ...) stay in: an object
    there is no optimizer's state but a file built to look like one (a pickled call where Adam keeps
    its first moment), refused like any other."""
    if not isinstance(sd, dict) or not isinstance(sd.get("state"), dict):
        return sd
    entries = {k: ([*v, *(v[t] for t in PARAM_SHAPED_KEYS if t in v)] if type(v) is dict else v)
               for k, v in sd["state"].items()}  # keys, and the values of known tensor keys
    return {**sd, "state": entries}


def _describe(obj: Any) -> str:
    if isinstance(obj, dict):
        keys = ", ".join(map(str, list(obj)[:8]))
        return f"dict with keys {keys}" if keys else "empty dict"
    return type(obj).__name__


def _classify_torch(obj: Any, found: Any) -> str:
    if isinstance(obj, dict):
        if "optimizer_states" in obj and "state_dict" in obj:
            return "lightning"
        if "state_dict" in obj and "arch" in obj:
            return "timm"
        if found.optimizers and found.optimizers[0].path == ():
            return "torch-optimizer"
        if found.models and found.models[0].path == ():
            return "torch-model"
    if found.models and found.models[0].path == ():  # torch.save(model): a whole pickled module
        return "torch-model"
    return "torch-bundle"


# files whose names say they hold model / optimizer / scheduler state (transformers, accelerate)
_STATE_FILES = frozenset({"pytorch_model.bin", "optimizer.pt", "optimizer.bin", "scheduler.pt", "scheduler.bin",
                          "adapter_model.bin"})


def _load_directory(path: str, trust_pickle: bool, lazy: bool = False) -> Checkpoint:
    from .deepspeed import deepspeed_dir, deepspeed_stage0_dir, load_deepspeed

    step = deepspeed_dir(path)  # ZeRO stage 1-3: flat partitions cut back by parameter
    if step is not None:
        return load_deepspeed(path, step, trust_pickle, lazy)
    from .safetensors_io import open_safetensors, open_sharded_index  # (imports torch)
    try:
        names = sorted(os.listdir(path))
    except OSError as e:
        raise LoadError(f"{path}: cannot list directory: {e.strerror or e}") from None
    files = [n for n in names if os.path.isfile(os.path.join(path, n)) and not n.endswith(_SKIP_SUFFIXES)]
    stage0 = deepspeed_stage0_dir(path)  # a DeepSpeed stage-0 save: its step directory's files, under <tag>/
    if stage0 is not None:
        tag = os.path.relpath(stage0, path)
        files += [os.path.join(tag, n) for n in sorted(os.listdir(stage0))
                  if os.path.isfile(os.path.join(stage0, n)) and not n.endswith(_SKIP_SUFFIXES)]
    if "trainer_state.json" in files or ("optimizer.pt" in files and "scheduler.pt" in files):
        layout = "hf-trainer"
    elif any(re.fullmatch(r"(optimizer(_\d+)?\.bin|random_states_\d+\.pkl)", n) for n in files):
        layout = "accelerate"
    else:
        layout = "directory"
    ck = Checkpoint(path=path, layout=layout)
    sharded: set[str] = set()
    for n in files:
        if n.endswith(".safetensors.index.json"):
            tensors, meta, shards = open_sharded_index(os.path.join(path, n))
            ck.models.append(ModelState(n, n, (), tensors, meta, order_trusted=False))
            sharded.update(shards)
            ck.parts.append(Part(n, "json", os.path.getsize(os.path.join(path, n))))
    for n in files:
        full = os.path.join(path, n)
        size = os.path.getsize(full)
        if n in sharded:
            ck.parts.append(Part(n, "safetensors", size))
            continue
        if n.endswith(".safetensors.index.json"):
            continue
        if n.startswith("."):  # hidden files (a stray DCP .metadata, editor state) are carried, never parsed
            ck.parts.append(Part(n, "other", size))
            continue
        kind = sniff(full)
        if kind not in ("safetensors", "zip", "legacy") and (n.endswith(".safetensors") or n in _STATE_FILES):
            # a weights / optimizer file by its name that does not read as one: an error, never a part
            # silently listed as "other" while the checkpoint it belongs to is used without it
            what = "empty (0 bytes)" if kind == "empty" else "truncated or corrupt (its header does not read as " + \
                ("safetensors)" if n.endswith(".safetensors") else "a torch.save file)")
            raise LoadError(f"{full}: {what}; refused (move it aside to use the rest of {path})")
        if kind == "safetensors":
            tensors, meta, _extra = open_safetensors(full)
            ck.parts.append(Part(n, "safetensors", size))
            ck.models.append(ModelState(n, n, (), tensors, meta, order_trusted=False))
        elif kind in ("zip", "legacy"):
            _load_dir_torch_part(ck, path, n, size, kind, trust_pickle, lazy)
        elif kind == "json":
            ck.parts.append(Part(n, "json", size))
            if n == "trainer_state.json":
                ck.extras.update(_trainer_state_extras(full))
        else:
            ck.parts.append(Part(n, "other", size))
    if not (ck.models or ck.optimizers or ck.schedulers):
        raise LoadError(f"{path}: a directory, but no model, optimizer or scheduler files found in it")
    adapter = next((m for m in ck.models if m.part in ADAPTER_FILES), None)
    if ck.optimizers and adapter is not None and "adapter_config.json" in files and \
            not any(m.order_trusted for m in ck.models):
        from .peft import peft_adapter_order

        order, why = peft_adapter_order(path, adapter, trust_code=trust_pickle)
        if order is not None:
            ck.models.insert(0, order)
        else:
            ck.notes.append(f"PEFT adapter names and order unknown: {why}")
    elif ck.optimizers and ck.models and not any(m.order_trusted for m in ck.models) and "config.json" in files:
        from .hf_order import hf_model_order

        order, why = hf_model_order(path, trust_code=trust_pickle)
        if order is not None:
            ck.models.insert(0, order)
        else:
            ck.notes.append(f"registration order unknown: {why}")
    return ck


_NO_BASE = "PEFT adapter names and order unknown: adapter_config.json names no base model"


def adopt_target_adapter(ck: Checkpoint, module: object, *, trust_pickle: bool = False) -> None:
    """A PEFT adapter directory whose config names no base model, checked against a live target: the
    adapter's names and order rebuilt with the base model config of the target (see
    :func:`~optckpt.io.peft.peft_order_from_target`) become its first model state; otherwise the note
    says why not. Nothing happens for any other checkpoint."""
    if _NO_BASE not in ck.notes or module is None or any(m.order_trusted for m in ck.models):
        return
    adapter = next((m for m in ck.models if m.part in ADAPTER_FILES), None)
    if adapter is None:
        return
    from .peft import peft_order_from_target

    order, why = peft_order_from_target(ck.path, adapter, module, trust_code=trust_pickle)
    at = ck.notes.index(_NO_BASE)
    if order is not None:
        ck.models.insert(0, order)
        del ck.notes[at]
    else:
        ck.notes[at] = f"{_NO_BASE}, and the target's config cannot stand in for it: {why}"


def _load_dir_torch_part(ck: Checkpoint, root: str, name: str, size: int, kind: str, trust_pickle: bool,
                         lazy: bool = False) -> None:
    full = os.path.join(root, name)
    auxiliary = bool(_AUXILIARY.match(name))
    if auxiliary and not trust_pickle:
        bad = unsafe_globals(full) if kind == "zip" else []
        if bad or kind == "legacy":
            ck.parts.append(Part(name, "opaque", size))
            ck.opaque.append(OpaquePart(name, size, "needs non-tensor globals", tuple(bad)))
            return
    try:
        loaded = load_torch_file(full, trust_pickle=trust_pickle, kind=kind, lazy=lazy)
    except UnsafePickleError as e:
        if not auxiliary:
            raise
        ck.parts.append(Part(name, "opaque", size))
        ck.opaque.append(OpaquePart(name, size, "needs non-tensor globals", tuple(e.unsafe_globals)))
        return
    part = Part(name, "torch", size, loaded.obj, loaded.saved_locations, loaded.zip_format)
    ck.parts.append(part)
    if auxiliary:
        ck.opaque.append(OpaquePart(name, size, "training bookkeeping (kept as is)"))
        return
    found = discover(loaded.obj, name, name_prefix=name)
    if loaded.placeholders:
        _refuse_placeholders(full, found)
    _check_counts(full, found)
    ck.models.extend(found.models)
    ck.optimizers.extend(found.optimizers)
    ck.schedulers.extend(found.schedulers)
    for k, v in found.extras.items():
        ck.extras[f"{name}:{k}"] = v
    for k, v in found.objects.items():
        ck.objects[f"{name}:{k}"] = v


def _trainer_state_extras(path: str) -> dict[str, Any]:
    try:
        state = load_json(path)
    except (OSError, ValueError):
        raise LoadError(f"{path}: not valid JSON") from None
    if not isinstance(state, dict):
        return {}
    return {k: v for k, v in state.items() if isinstance(v, (int, float, str, bool)) or v is None}


def _join_model(ck: Checkpoint, model_path: str, trust_pickle: bool, lazy: bool = False) -> None:
    """Add the model state dict(s) of a separately saved file (``--model``) to ``ck``."""
    other = load(model_path, trust_pickle=trust_pickle, lazy=lazy)
    if not other.models:
        raise LoadError(f"{model_path}: --model names a file with no model state dict in it")
    for m in other.models:
        m.name = model_path if m.name in ("(root)", os.path.basename(model_path)) else f"{model_path}:{m.name}"
        if m.part == os.path.basename(model_path):
            m.part = model_path
    ck.models = other.models + ck.models
    for part in other.parts:
        part.relpath = model_path if part.relpath == os.path.basename(model_path) else part.relpath
        ck.parts.append(part)
