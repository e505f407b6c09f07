"""``optckpt convert``: between layouts (DCP in torchtitan's keys, one torch file, safetensors: one
file or HF-style shards), carrying every entry beside the model / optimizer / schedulers or refusing."""

from __future__ import annotations

import os
import shutil
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .checkpoint import Checkpoint, ModelState, OptimizerState, SchedulerState
from .edit import schedulers_of, source_claim
from .errors import FormatError, MappingError, WriteError
from .io import load
from .io.safepickle import PickledGlobal, PickledObject
from .io.write import commit_dir, commit_file, copy_mode, new_output, temp_dir, temp_file
from .mapping import OptimizerMapping
from .resolve import resolve
from .verify import same_bits, verify_converted

__all__ = ["convert_checkpoint", "fqn_optimizer_state", "carried_entries"]


def convert_checkpoint(path: str, to: str, out: str, *, model: str | None = None, source: str | None = None,
                       optimizer_key: str | None = None, models: Sequence[str] | None = None,
                       trust_pickle: bool = False, max_shard_size: int | None = None) -> str:
    """``optckpt convert``: between layouts. ``dcp`` follows torchtitan's top-level keys (``model``,
    ``optimizer`` FQN-keyed as ``get_state_dict`` produces it, ``lr_scheduler``, ``extra``);
    ``torch`` writes one ``torch.save`` file of the same structure (DCP → single file);
    ``safetensors`` writes the model weights (tied duplicates once): one file, or with
    ``max_shard_size`` (bytes) a directory in Hugging Face's sharded layout."""
    from .io.dcp import save_dcp
    from .io.write import atomic_torch_save

    ck = load(path, model=model, trust_pickle=trust_pickle)
    out = new_output(out)
    dest_dir, final = os.path.dirname(os.path.abspath(out)), os.path.basename(out.rstrip(os.sep))
    data_models = [m for m in ck.models if len(m.tensors) == len(m.meta)]
    if not data_models:
        raise FormatError(f"{path}: no model weights to convert")
    main = data_models[0]
    mode_from = path if os.path.isfile(path) else None
    if max_shard_size is not None and to != "safetensors":
        raise FormatError("--max-shard-size applies to --to safetensors only")
    if to == "safetensors" and max_shard_size is not None:
        return _convert_sharded_safetensors(main, out, max_shard_size, mode_from)
    if to == "safetensors":
        from .io.safetensors_io import save_safetensors

        tensors = {k: main.tensors[k] for k in main.meta if k not in main.tied}
        tmp = temp_file(dest_dir, final)
        try:
            save_safetensors(tensors, tmp)
        except BaseException:
            _remove(tmp)
            raise
        if mode_from:
            copy_mode(mode_from, tmp)
        return commit_file(tmp, out, verify=lambda t: verify_converted(t, {"model": tensors}), no_clobber=True)
    state: dict[str, Any] = {"model": {k: main.tensors[k] for k in main.meta}}
    if ck.optimizers:
        opt = ck.optimizer(optimizer_key)
        mapping = resolve(ck, opt, source=source_claim(ck, source, trust_pickle), models=models).mapping
        state["optimizer"] = _materialize(fqn_optimizer_state(ck, opt, mapping))
        scheds = schedulers_of(ck, opt)
        if len(scheds) == 1:
            state["lr_scheduler"] = _materialize(dict(scheds[0].state_dict))
    extra, lost = carried_entries(ck, placeholders=to == "torch")
    if lost:
        raise FormatError(f"{path}: convert would not carry {', '.join(lost[:4])}"
                          f"{f' and {len(lost) - 4} more' if len(lost) > 4 else ''}: nothing was written "
                          "(convert the model and optimizer of a directory's main file, or keep the originals)")
    if extra:
        state["extra"] = extra
    if to == "dcp":
        from .io.dcp import save_dcp

        tmpdir = temp_dir(dest_dir, final)
        try:
            save_dcp(state, tmpdir)
        except (KeyboardInterrupt, SystemExit):
            shutil.rmtree(tmpdir, ignore_errors=True)
            raise
        except BaseException as e:  # DCP's CheckpointException derives from BaseException
            shutil.rmtree(tmpdir, ignore_errors=True)
            raise WriteError(f"{out}: DCP write failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
        copy_mode(path, tmpdir)
        return commit_dir(tmpdir, out, verify=lambda t: verify_converted(t, state))
    if to == "torch":
        from .io.write import atomic_torch_save

        return atomic_torch_save(state, out, verify=lambda t: verify_converted(t, state), mode_from=mode_from)
    raise FormatError(f"--to {to!r}: expected dcp, torch or safetensors")


def fqn_optimizer_state(ck: Checkpoint, opt: OptimizerState, mapping: OptimizerMapping) -> dict[str, Any]:
    """The optimizer state keyed by parameter name, exactly as
    ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` returns it."""
    if mapping.ambiguous:
        bad = mapping.ambiguous[0]
        raise MappingError(f"{opt.name}: index {bad.index} has no certain name "
                           f"({', '.join(bad.candidates[:4]) or 'no candidate'}); pass --source")
    name_of = {e.index: e.name for e in mapping.entries}
    state = {name_of[i]: dict(entry) for i, entry in opt.state.items() if i in name_of}
    groups = []
    for g in opt.state_dict.get("param_groups", []):
        hp = {k: v for k, v in g.items() if k not in ("params", "param_names")}
        groups.append({**hp, "params": [name_of[i] for i in g["params"]]})
    return {"state": state, "param_groups": groups}


def _materialize(v: Any) -> Any:
    if hasattr(v, "load") and hasattr(v, "key"):
        return v.load()
    if isinstance(v, Mapping):
        return {k: _materialize(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_materialize(x) for x in v]
    return v


_GONE = object()  # a subtree another section of the output carries


def _without(obj: Any, paths: Sequence[tuple[Any, ...]]) -> Any:
    """``obj`` with the subtrees at ``paths`` (key paths) removed; ``_GONE`` when nothing is left."""
    if any(not p for p in paths):
        return _GONE
    if isinstance(obj, Mapping):
        out: dict[Any, Any] = OrderedDict() if isinstance(obj, OrderedDict) else {}
        for k, v in obj.items():
            sub = [p[1:] for p in paths if p[0] == k]
            rest = _without(v, sub) if sub else v
            if rest is not _GONE:
                out[k] = rest
        return out if out else _GONE
    if isinstance(obj, (list, tuple)):
        items = [_without(v, [p[1:] for p in paths if p[0] == i]) if any(p[0] == i for p in paths) else v
                 for i, v in enumerate(obj)]
        kept = [v for v in items if v is not _GONE]
        return type(obj)(kept) if kept else _GONE
    return obj


def _plain(v: Any, placeholders: bool) -> bool:
    """What the output can hold as it was read: tensors, scalars, strings, containers of them; with
    ``placeholders`` (a torch file: written back as the exact opcodes read) also pickled objects."""
    if v is None or isinstance(v, (bool, int, float, complex, str, bytes, torch.Tensor, torch.dtype, torch.device,
                                   torch.Size)):
        return True
    if placeholders and isinstance(v, (PickledObject, PickledGlobal)):
        return True
    if isinstance(v, Mapping):
        return all(_plain(k, placeholders) and _plain(x, placeholders) for k, x in v.items())
    if isinstance(v, (list, tuple, set, frozenset)):
        return all(_plain(x, placeholders) for x in v)
    return False


def carried_entries(ck: Checkpoint, *, placeholders: bool = False) -> tuple[dict[str, Any], list[str]]:
    """Everything a checkpoint holds beside its model, optimizer and scheduler sections, for a
    conversion to carry under ``extra`` (top-level keys it does not know, nested extras, tensors such
    as an RNG state, JSON files of a directory), and what it cannot carry (files that are neither,
    objects the output format cannot hold: ``placeholders`` says whether pickled objects can be
    written back as read): nothing is dropped silently."""
    consumed: dict[str, list[tuple[Any, ...]]] = {}
    sections: list[ModelState | OptimizerState | SchedulerState] = [*ck.models, *ck.optimizers, *ck.schedulers]
    for x in sections:
        consumed.setdefault(x.part, []).append(tuple(x.path))
    torch_parts = [p for p in ck.parts if p.kind == "torch" and p.obj is not None]
    extra: dict[str, Any] = {}
    lost: list[str] = [f"{o.part} (objects: {', '.join(o.unsafe_globals[:2]) or o.reason})" for o in ck.opaque]
    opaque = {o.part for o in ck.opaque}
    for part in ck.parts:
        if part.relpath in opaque or part.kind in ("safetensors", "dcp") or (part.kind == "json" and part.relpath in (
                "config.json", "generation_config.json")):
            continue  # a model's weights / config, DCP's own files (its extras are on the checkpoint)
        if part.kind == "json" and part.obj is not None:
            extra[part.relpath] = part.obj
            continue
        if part not in torch_parts:
            lost.append(f"{part.relpath} ({part.kind})")
            continue
        rest = _without(part.obj, consumed.get(part.relpath, []))
        if rest is _GONE:
            continue
        entries = dict(rest) if isinstance(rest, Mapping) else {part.relpath: rest}
        if isinstance(entries.get("extra"), Mapping):  # torchtitan's / convert's own container: its entries
            inner = dict(entries.pop("extra"))
            entries = {**inner, **{k: v for k, v in entries.items() if k not in inner}}
        for k, v in entries.items():
            key = str(k) if str(k) not in extra and len(torch_parts) == 1 else f"{part.relpath}:{k}"
            if _plain(v, placeholders):
                extra[key] = v
            else:
                lost.append(f"{part.relpath}:{k} ({type(v).__name__})")
    if not torch_parts:  # DCP and other layouts keep their extras on the checkpoint
        extra.update({k: v for k, v in ck.extras.items() if _plain(v, placeholders)})
        lost += [k for k, v in ck.extras.items() if not _plain(v, placeholders)]
    return extra, lost


def _convert_sharded_safetensors(main: Any, out: str, max_bytes: int, mode_from: str | None) -> str:
    """The model weights as a new directory of HF-style shards (``from_pretrained`` reads it once
    the model's ``config.json`` sits beside them); one shard's tensors in memory at a time."""
    from .io.safetensors_io import save_sharded_safetensors

    if max_bytes <= 0:
        raise FormatError(f"--max-shard-size {max_bytes}: expected a positive size")
    sizes = {k: main.meta[k].nbytes for k in main.meta if k not in main.tied}
    dest_dir, final = os.path.dirname(os.path.abspath(out)), os.path.basename(out.rstrip(os.sep))
    tmpdir = temp_dir(dest_dir, final)
    try:
        save_sharded_safetensors(sizes, lambda k: main.tensors[k], tmpdir, max_bytes)
    except BaseException as e:
        shutil.rmtree(tmpdir, ignore_errors=True)
        if isinstance(e, OSError):
            raise WriteError(f"{out}: write failed: {e.strerror or e}") from None
        raise
    if mode_from:
        copy_mode(mode_from, tmpdir)

    def check(tmp: str) -> None:
        got = load(tmp)
        model = next((m for m in got.models if len(m.meta)), None)
        if model is None or set(model.meta) != set(sizes):
            raise WriteError(f"{tmp}: verification failed: the model tensors read back differ (nothing was written)")
        for k in sizes:
            if not same_bits(model.tensors[k], main.tensors[k]):
                raise WriteError(f"{tmp}: verification failed for {k} (nothing was written)")

    return commit_dir(tmpdir, out, verify=check)


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass

