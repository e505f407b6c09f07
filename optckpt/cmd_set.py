"""``optckpt set``: change param-group hyperparameters (and the schedulers that drive them), and its
DCP variant (only the changed small values written, into one extra shard)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .checkpoint import OptimizerState
from .edit import commit_dcp, dcp_output, open_for_edit, schedulers_of, write_edits
from .errors import FormatError, WriteError
from .io import load
from .io.paths import is_dcp_dir
from .io.write import WriteOptions
from .mapping import infer_mapping
from .verify import same_bits

__all__ = ["set_checkpoint"]


def set_checkpoint(
    path: str,
    out: str | None,
    changes: Sequence[Any],
    *,
    groups: Sequence[str] = (),
    params: Sequence[str] = (),
    raw_sets: Sequence[str] = (),
    follow: bool = True,
    model: str | None = None,
    optimizer_key: str | None = None,
    models: Sequence[str] | None = None,
    write: WriteOptions = WriteOptions(),
    trust_pickle: bool = False,
) -> tuple[Any, str | None]:
    """``optckpt set``: change group hyperparameters so the resumed run really uses them."""
    from .hparams import SetResult, parse_set, rewrite, scheduler_changes, select_groups

    dcp = is_dcp_dir(path)
    if dcp:
        ck = load(path)
        opt = ck.optimizer(optimizer_key)
    else:
        ck, opt, out = open_for_edit(path, out, model, optimizer_key, trust_pickle, write, lazy=True)
    sd_groups = opt.state_dict.get("param_groups", [])
    all_changes = list(changes) + [parse_set(s, sd_groups) for s in raw_sets]
    if not all_changes:
        raise FormatError("nothing to change: give --lr, --scale-lr, --weight-decay, --scale-weight-decay or --set")
    mapping = infer_mapping(ck, opt, models=models) if params else None
    selected = select_groups(sd_groups, mapping, groups, params)  # type: ignore[arg-type]
    scheds = schedulers_of(ck, opt)
    new_opt, new_scheds, notes = rewrite(opt.state_dict, [s.state_dict for s in scheds], selected, all_changes,
                                         follow=follow)
    keys = sorted({k for g in sd_groups for k in g if k not in ("params", "param_names")})
    result = SetResult(opt.name, selected,
                       [{k: sd_groups[i].get(k) for k in keys} for i in selected],
                       [{k: new_opt["param_groups"][i].get(k) for k in keys} for i in selected], notes,
                       [c for s, new in zip(scheds, new_scheds) for c in scheduler_changes(s.name, s.state_dict, new)])
    if write.dry_run:
        return result, None
    if dcp:
        return result, _set_dcp(path, out, opt, new_opt, scheds, new_scheds, w=write)
    assert out is not None
    written = write_edits(ck, out, [(opt, new_opt), *zip(scheds, new_scheds)], w=write, trust_pickle=trust_pickle)
    return result, written


def _set_dcp(path: str, out: str | None, opt: OptimizerState, new_opt: Mapping[str, Any], scheds: Sequence[Any],
             new_scheds: Sequence[Mapping[str, Any]], *, w: WriteOptions) -> str:
    """``set`` on DCP: only the changed param-group and scheduler entries are written (into one extra
    shard, under a new ``.metadata``); every shard file is carried over as it is."""
    from .io.dcp import changed_small_values

    dcp_output(path, out, w.in_place)
    values: dict[tuple[Any, ...], Any] = {}
    old_groups = {"param_groups": opt.state_dict.get("param_groups", [])}
    values.update(changed_small_values(path, opt.path[0], old_groups, {"param_groups": new_opt["param_groups"]}))
    for s, new in zip(scheds, new_scheds):
        values.update(changed_small_values(path, s.path[0], s.state_dict, new))

    def check(tmp: str) -> None:
        if not w.verify:
            return
        got = load(tmp)
        g_opt = next(o for o in got.optimizers if o.name == opt.name)
        want = [{k: v for k, v in g.items()} for g in new_opt["param_groups"]]
        if not same_bits(g_opt.state_dict["param_groups"], want):
            raise WriteError(f"{out or path}: verification failed: param groups differ (nothing was written)")
        got_s = {s.name: s.state_dict for s in got.schedulers}
        for s, new in zip(scheds, new_scheds):
            if not same_bits(got_s.get(s.name), new):
                raise WriteError(f"{out or path}: verification failed: scheduler {s.name} differs "
                                 "(nothing was written)")

    return commit_dcp(path, out, w.in_place, w.replace_backup, check, values=values)

