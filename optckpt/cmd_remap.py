"""``optckpt remap``: rewrite the optimizer state (and the model state dicts beside it) for new model
code, and its DCP variant (FQN renames and drops in the metadata only)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .checkpoint import Checkpoint
from .edit import commit_dcp, dcp_output, open_for_edit, schedulers_of, source_claim, write_edits
from .errors import WriteError
from .io import load
from .io.paths import is_dcp_dir
from .io.write import WriteOptions, resolve_output
from .mapping import OptimizerMapping, is_lbfgs
from .pickled import module_at, rebuild_module
from .remap import (
    Policy,
    RemapPlan,
    apply_plan,
    attach_lbfgs_layout,
    plan_remap,
    remap_scheduler,
    rewrite_model,
)
from .resolve import resolve
from .target import is_code, parse_rename, resolve_target
from .transforms import TransformRule
from .verify import same_bits

if TYPE_CHECKING:
    import torch

__all__ = ["remap_checkpoint"]


def remap_checkpoint(
    path: str,
    target_spec: str,
    out: str | None,
    *,
    model: str | None = None,
    source: str | None = None,
    renames: Sequence[str] = (),
    policy: Policy = Policy(),
    transforms: Sequence[TransformRule] = (),
    optimizer_key: str | None = None,
    models: Sequence[str] | None = None,
    write: WriteOptions = WriteOptions(),
    trust_pickle: bool = False,
    model_output: str | None = None,
) -> tuple[RemapPlan, str | None]:
    """``optckpt remap``: rewrite the optimizer state so that plain ``load_state_dict`` is right,
    and the model state dicts beside it so that the new code loads them with ``strict=True``
    (a separate ``--model`` file is written to ``model_output``, or rewritten with ``in_place``)."""
    if is_dcp_dir(path):
        if transforms or policy.shape_mismatch == "slice":
            raise WriteError(f"{path}: --fuse / --split / --shape-mismatch slice are not supported for DCP "
                             "checkpoints yet: `optckpt convert --to torch` it first")
        return _remap_dcp(path, target_spec, out, renames=renames, policy=policy, w=write,
                          trust_pickle=trust_pickle)
    # a names file or a checkpoint as the new code, nothing fused, split or sliced: the state is only re-keyed,
    # tensors read lazily (no torch; LBFGS's flat history, permuted, is the one tensor made, then torch comes in)
    lazy = not transforms and policy.shape_mismatch != "slice" and not is_code(target_spec)
    ck, opt, out = open_for_edit(path, out, model, optimizer_key, trust_pickle, write, lazy=lazy)
    target = resolve_target(target_spec, trust_pickle=trust_pickle)
    claim = source_claim(ck, source, trust_pickle, target)
    rules = parse_rename(renames)
    resolution = resolve(ck, opt, target, source=claim, models=models, renames=rules, transforms=transforms,
                         policy=policy, plan=True)
    plan, _ = plan_remap(resolution, policy)
    plan.transforms = resolution.steps
    if is_lbfgs(opt):
        shapes = {n: m.shape for mod in ck.models for n, m in mod.meta.items()}
        attach_lbfgs_layout(plan, resolution.mapping, {**target.shapes, **shapes})
    new_sd = apply_plan(plan, resolution.state_dict)
    model_edits = _model_edits(ck, resolution.saved, plan, target, rules, policy)
    joined = [(m, new) for m, new in model_edits if model is not None and m.name.split(":")[0] == model]
    separate = joined[:1]
    if separate and model_output is None and not write.in_place:
        plan.notes.append(f"model {model}: not rewritten (the new code's strict load needs the "
                          "changes above): pass --model-output PATH to write it")
    if write.dry_run:
        return plan, None
    if separate and (model_output is not None or write.in_place):
        assert model is not None
        _write_model_file(model, separate[0][0], separate[0][1], model_output, w=write, trust_pickle=trust_pickle)
    n_groups = len(opt.state_dict.get("param_groups", []))
    trailing = int(isinstance(opt.state_dict.get("base_param_settings"), Mapping))  # mmengine's, after the groups
    edits = [(opt, new_sd)] + [(s, remap_scheduler(s.state_dict, plan, n_groups, trailing=trailing))
                               for s in schedulers_of(ck, opt)]
    edits += [(m, new) for m, new in model_edits if not any(m is j for j, _ in joined)]
    assert out is not None
    written = write_edits(ck, out, edits, w=write, trust_pickle=trust_pickle, plan=plan)
    return plan, written


def _model_edits(ck: Checkpoint, mapping: OptimizerMapping, plan: RemapPlan, target: Any,
                 renames: Sequence[Any], policy: Policy) -> list[tuple[Any, Any]]:
    """The model state dicts of the optimizer's model (those holding most of its saved names: the
    model itself, an EMA copy), rewritten for the new code (:func:`optckpt.remap.rewrite_model`);
    each one's outcome goes into ``plan.models`` and the notes."""
    names = {e.name for e in mapping.entries if e.name is not None}
    kinds = {p.relpath: p.kind for p in ck.parts}
    edits: list[tuple[Any, Any]] = []
    for m in ck.models:
        if not names or len(m.tensors) != len(m.meta) or 2 * len(names & set(m.meta)) < len(names):
            continue
        kind = kinds.get(m.part, "torch")
        if kind != "torch" and not (kind == "safetensors" and m.part.endswith(".safetensors")):  # one file
            plan.models.append({"name": m.name, "part": m.part, "rewritten": False})
            plan.notes.append(f"model {m.name}: a {kind} file: its keys are not rewritten (not supported yet)")
            continue
        new, info = rewrite_model(m.tensors, plan, target, renames, policy)
        obj = module_at(ck, m)
        if obj is not None and (new is not None or (target.module is not None and list(m.tensors) != list(
                target.module.state_dict()))):  # a whole pickled module: its names and order are the new code's
            edits.append((m, rebuild_module(obj, target.module, new if new is not None else m.tensors, m.name)))
            plan.models.append({"name": m.name, "part": m.part, "rewritten": True, **info})
            plan.notes.append(f"model {m.name}: a pickled nn.Module object, rebuilt as the new code's "
                              f"{type(target.module).__qualname__} with the saved tensors")
            if new is None:
                continue
        else:
            plan.models.append({"name": m.name, "part": m.part, "rewritten": new is not None, **info})
            if new is None:
                continue
            edits.append((m, new))
        said = [f"{info['renamed']} keys renamed"] + [f"{k} {', '.join(info[k][:4])}" + (
            f" and {len(info[k]) - 4} more" if len(info[k]) > 4 else "") for k in
            ("fused", "split", "sliced", "dropped", "added") if info[k]]
        plan.notes.append(f"model {m.name}: " + "; ".join(said))
        if info["shape_mismatch"]:
            plan.notes.append(f"model {m.name}: {', '.join(info['shape_mismatch'][:4])} keep their saved shape: "
                              "the new code's strict load fails on them (--shape-mismatch slice keeps the shared "
                              "region)")
    return edits


def _write_model_file(path: str, m: Any, new: dict[str, torch.Tensor], model_output: str | None, *,
                      w: WriteOptions, trust_pickle: bool) -> str:
    """A separately saved model file (``--model``), rewritten in its own layout."""
    mck = load(path, trust_pickle=trust_pickle, lazy=True)  # its objects are replaced: none of its values is read
    mm = next(x for x in mck.models if x.path == m.path)
    out = resolve_output(path, model_output, w.in_place, replace_backup=w.replace_backup, backup=w.backup)
    return write_edits(mck, out, [(mm, new)], w=w, trust_pickle=trust_pickle)


def _remap_dcp(path: str, target_spec: str, out: str | None, *, renames: Sequence[str], policy: Policy,
               w: WriteOptions, trust_pickle: bool) -> tuple[RemapPlan, str | None]:
    """DCP is keyed by name: a remap renames FQNs (``--rename`` or a detected wrapper prefix) and
    drops the state of parameters that are gone or reshaped, in the metadata only; the shard files
    are hard-linked as they are, so memory stays bounded by the metadata. ``in_place`` replaces
    only the input's ``.metadata`` (kept as ``.metadata.bak``)."""
    from .check import guess_prefix_rename

    ck = load(path, trust_pickle=trust_pickle)
    opt = ck.optimizer()
    target = resolve_target(target_spec, trust_pickle=trust_pickle)
    rules = parse_rename(renames)
    resolution = resolve(ck, opt, target, renames=rules, policy=policy, plan=True)
    plan, report = plan_remap(resolution, policy)
    if not rules:
        auto = guess_prefix_rename([e.name for e in resolution.mapping.entries if e.name], target.names)
        rules = [auto] if auto is not None else []
    by_source: dict[str, str | None] = {}
    for p in report.params:
        if p.source_index is None:
            continue
        keep = p.status in ("ok", "moved")
        by_source[str(p.source_index)] = p.name if keep else None

    def rename(fqn: str) -> str | None:
        if fqn in by_source:
            return by_source[fqn]
        from .check import apply_renames

        return apply_renames(fqn, rules)

    if w.dry_run:
        return plan, None
    dcp_output(path, out, w.in_place)

    def check(tmp: str) -> None:
        if not w.verify:
            return
        new = load(tmp)
        old_models = {m.name: m for m in ck.models}
        for m in new.models:
            src_model = old_models.get(m.name)
            if src_model is None:
                continue
            back = {rename(k): k for k in src_model.meta}
            for k in m.meta:
                if not same_bits(m.tensors[k], src_model.tensors[back[k]]):
                    raise WriteError(f"{out or path}: verification failed for {k} (nothing was written)")

    return plan, commit_dcp(path, out, w.in_place, w.replace_backup, check, rename=rename)

