"""Every optimizer people train with (issue #28): the community libraries, exact or refused in one
line, never wrong.

The matrix (:mod:`community_zoo`): each optimizer trains a small model with one and two param groups
and saves ``{"model", "optimizer"}``; the new code registers the modules in another order, lists the
two groups the other way round, and (``renamed``) renames a submodule. The file is repaired with
``optckpt remap`` (a real subprocess) and, separately, loaded through the API; the new code resumes
and two more steps must equal the uninterrupted run parameter by parameter (or, where the optimizer
itself depends on parameter order, the saved state laid out by name by the test) — or optckpt
refuses in one line. ``check`` must agree with what a plain ``load_state_dict`` really does.

The default run keeps a representative few (libraries that install light, objects in the state,
the refusals); ``-m matrix`` runs every library of the issue and every pytorch-optimizer optimizer
that runs on a CPU."""

from __future__ import annotations

import io
import json
import os
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch
from community_zoo import (
    VARIANTS,
    Outcome,
    Spec,
    Trained,
    available,
    check_verdict,
    library_specs,
    pytorch_optimizer_specs,
    spec_by_id,
    train,
    via_api,
    via_cli,
    via_plain,
)

REPAIRED = ("reordered", "renamed")


def _train(spec: Spec, ngroups: int, tmp: Path, variants: tuple[str, ...] = VARIANTS[1:]) -> Trained:
    if not available(spec.lib):
        pytest.skip(f"{spec.lib} is not installed (or does not import here)")
    with redirect_stdout(io.StringIO()):  # Adam-mini prints what it found
        return train(spec, ngroups, tmp, variants)


def _record(case: str, got: Outcome) -> None:
    """With OPTCKPT_MATRIX_LOG=path, one line per case (the matrix table of the closing note)."""
    log = os.environ.get("OPTCKPT_MATRIX_LOG")
    if log:
        with open(log, "a") as f:
            f.write(json.dumps({"case": case, "kind": got.kind, "detail": got.detail}) + "\n")


def _assert_exact_or_refused(case: str, got: Outcome) -> None:
    _record(case, got)
    assert got.kind in ("exact", "refused"), f"{case}: {got}"
    if got.kind == "refused":
        assert "\n" not in got.detail and got.detail, f"{case}: {got}"


def _repairs(t: Trained, tmp: Path, *, in_process: bool, variants: tuple[str, ...] = REPAIRED) -> dict[str, Outcome]:
    """Repair for each variant with remap and with the API. ``in_process=False``: the ``renamed``
    variant's remap runs as a real subprocess (the other in process: the same code, a second
    interpreter start saved)."""
    out = {}
    for v in variants:
        out[f"{v}/remap"] = via_cli(t, v, tmp, in_process=in_process or v != "renamed")
        out[f"{v}/api"] = via_api(t, v)
    return out


# --- the default run: representative cases --------------------------------------------------------

@pytest.mark.parametrize("ident, ngroups", [("schedulefree.SGDScheduleFree", 2), ("prodigyopt.Prodigy", 2),
                                            ("came_pytorch.CAME", 2), ("adam_mini.Adam_mini", 1)])
def test_light_libraries_resume_exactly(ident, ngroups, tmp_path):
    """Libraries in the test extra: schedulefree (train() / eval() modes), Prodigy's per-group ``d``,
    CAME's factored rows and columns, Adam-mini's one group per named parameter: all exact."""
    t = _train(spec_by_id(ident), ngroups, tmp_path)
    for case, got in _repairs(t, tmp_path, in_process=True).items():
        assert got.kind == "exact", f"{ident} {case}: {got}"


def test_python_objects_in_state_move_by_name_without_trust(tmp_path):
    """AdaShift keeps a ``collections.deque`` of past gradients per parameter, Conda a projector
    object: read as inert placeholders, moved by name, written back as the opcodes they were read
    from, so the repaired file resumes exactly — without ``--trust-pickle`` (a real subprocess)."""
    for ident in ("pytorch_optimizer.adashift", "pytorch_optimizer.conda"):
        t = _train(spec_by_id(ident), 2, tmp_path)
        got = via_cli(t, "renamed", tmp_path, in_process=ident.endswith("conda"))
        assert got.kind == "exact", f"{ident}: {got}"
        # the API puts the state into a live optimizer, which needs the real object: with trust (as the
        # resume script's own torch.load(weights_only=False)) exact, without it refused in one line
        assert via_api(t, "renamed", trust=True).kind == "exact"
        refused = via_api(t, "renamed", trust=False)
        assert refused.kind == "refused" and "pickled object" in refused.detail, refused


def test_python_objects_with_trust_verify_what_was_written(tmp_path):
    """With ``--trust-pickle`` the real objects are built; the written file's verification compares
    them by what they hold (no false "differs", no unexpected error)."""
    t = _train(spec_by_id("pytorch_optimizer.adashift"), 2, tmp_path)
    got = via_cli(t, "reordered", tmp_path, trust=True, in_process=True)
    assert got.kind == "exact", got


@pytest.mark.parametrize("ident, why", [
    ("pytorch_optimizer.magma", "not torch's layout"),  # state_dict() = {"base": ..., "magma_state": {(g, i): ...}}
    ("pytorch_optimizer.dadaptsgd", "first group"),  # g0_norm lives in param_groups[0] only
])
def test_layouts_that_cannot_be_named_are_refused_in_one_line(ident, why, tmp_path):
    t = _train(spec_by_id(ident), 2, tmp_path)
    for case, got in _repairs(t, tmp_path, in_process=True).items():
        assert got.kind == "refused" and why in got.detail, f"{ident} {case}: {got}"


@pytest.mark.parametrize("ident", ["pytorch_optimizer.ranger21", "pytorch_optimizer.nero",
                                   "pytorch_optimizer.racs", "pytorch_optimizer.sara"])
def test_own_keys_and_misleading_shapes(ident, tmp_path):
    """Ranger21 adds ``lookahead_step`` / ``current_lr`` beside ``state`` (carried, else the next
    step differs); Nero's per-row ``exp_avg_sq`` [6, 1], SARA's empty ``exp_avg`` and RACS' row
    sums are not parameter shapes (before: no name, or a vector's name for a matrix)."""
    t = _train(spec_by_id(ident), 2, tmp_path)
    for case, got in _repairs(t, tmp_path, in_process=True).items():
        assert got.kind == "exact", f"{ident} {case}: {got}"


def _check_agrees(t: Trained, tmp: Path, variants: tuple[str, ...] = VARIANTS) -> list[str]:
    """``check`` says SAFE (exit 0) exactly when a plain ``load_state_dict`` resumes like the
    uninterrupted run, and says it is not when it does not. Allowed besides: a refusal in one line
    (exit 2: Scion's norm objects in its param groups, without trust) and ``cannot_prove_safe``
    (exit 1: names the state cannot show, as for a stateless optimizer whose groups differ — never
    a safe verdict on a wrong load). Returns the disagreements."""
    bad = []
    for v in variants:
        code, verdict = check_verdict(t, v, tmp)
        plain = via_plain(t, v)
        if code == 2:
            if "\n" in verdict or not verdict or verdict.startswith("not JSON"):
                bad.append(f"{t.spec.id} g{t.ngroups} {v}: check exit 2 without one line: {verdict!r}")
        elif code == 1 and verdict == "cannot_prove_safe":
            pass
        elif (code == 0) != (plain.kind == "exact"):
            bad.append(f"{t.spec.id} g{t.ngroups} {v}: check exit {code} ({verdict}), plain load {plain}")
        _record(f"{t.spec.id} g{t.ngroups} {v}/check", Outcome(f"check{code}/plain-{plain.kind}", verdict[:200]))
    return bad


@pytest.mark.parametrize("ident", ["lion_pytorch.Lion", "pytorch_optimizer.sgdw"])
def test_check_predicts_the_plain_load(ident, tmp_path):
    t = _train(spec_by_id(ident), 2, tmp_path)
    assert _check_agrees(t, tmp_path) == []


@pytest.mark.parametrize("name", ["bitsandbytes.Adam8bit-2.pt", "bitsandbytes.AdamW8bit-2.pt",
                                  "galore_torch.GaLoreAdamW-2.pt"])
def test_files_of_libraries_the_extra_does_not_install(name, tmp_path, fixtures):
    """bitsandbytes (8-bit blockwise state, its quant-state dicts) and GaLore (projector objects)
    are not in the test extra: files they wrote (``fixtures/gen_community.py``) are repaired by a
    real ``optckpt remap`` without either library, and the result must be the saved state laid out
    by name, bit for bit (placeholders op for op); GaLore's without ``--trust-pickle``."""
    from community_zoo import HERE, RENAME, by_name, index_names, plain_target
    from conftest import invoke, run_cli

    from optckpt.io import load
    from optckpt.io.safepickle import same

    galore = name.startswith("galore")
    src = fixtures / "community" / name
    spec = tmp_path / "new_code.py"
    spec.write_text(f"import sys\nsys.path.insert(0, {str(HERE)!r})\nfrom community_zoo import plain_target\n"
                    f"def build():\n    return plain_target(2, 'renamed', galore={galore})\n")
    out = tmp_path / "fixed.pt"
    args = ("remap", str(src), "--target", f"{spec}:build", "--rename", RENAME, "-o", str(out))
    if galore:  # a real subprocess, no trust
        r = run_cli(*args)
        assert r.returncode == 0, r.stderr
    else:  # in process: the same code, an interpreter start saved
        assert invoke(*args).exit_code == 0
    saved = load(str(src)).optimizers[0].state_dict
    old_model, old_opt = plain_target(2, "same", galore)
    new_model, new_opt = plain_target(2, "renamed", galore)
    truth = by_name(saved, index_names(old_model, old_opt), index_names(new_model, new_opt))
    got = load(str(out)).optimizers[0].state_dict
    for g in got["param_groups"]:
        assert g.pop("param_names") == [n for n, p in new_model.named_parameters()
                                        if any(p is q for q in new_opt.param_groups[got["param_groups"].index(g)]
                                               ["params"])]
    assert same(got, truth)
    assert not same(saved, truth)  # (the comparison can fail: the unrepaired state is not it)


# --- -m matrix: the whole held-out matrix (minutes; re-run for each landing, not in CI) ----------

def _lib_cases() -> list:
    return [pytest.param(s.id, n, id=f"{s.id}-g{n}") for s in library_specs() for n in s.ngroups]


@pytest.mark.matrix
@pytest.mark.parametrize("ident, ngroups", _lib_cases())
def test_library_matrix(ident, ngroups, tmp_path):
    """Every library of the issue: remap as a real subprocess and the API, one and two groups, the
    new code reordered with the groups the other way round, with and without a renamed submodule;
    and ``check`` against the plain load."""
    t = _train(spec_by_id(ident), ngroups, tmp_path)
    for case, got in _repairs(t, tmp_path, in_process=False).items():
        _assert_exact_or_refused(f"{ident} g{ngroups} {case}", got)
    assert _check_agrees(t, tmp_path) == []


@pytest.mark.slow
@pytest.mark.parametrize("ident", ["galore_torch.GaLoreAdamW", "galore_torch.GaLoreAdafactor"])
def test_galore_projector_groups_exact_without_trust(ident, tmp_path):
    """GaLore with a projection group: its ``GaLoreProjector`` objects move by name (no trust), and
    with ``--trust-pickle`` the verification does not report a false difference."""
    t = _train(spec_by_id(ident), 2, tmp_path)
    for v in REPAIRED:
        assert via_cli(t, v, tmp_path).kind == "exact"
        assert via_cli(t, v, tmp_path, trust=True, in_process=True).kind == "exact"
        assert via_api(t, v, trust=True).kind == "exact"


def _po_cases() -> list:
    if not available("pytorch_optimizer"):
        return []
    return [pytest.param(s.name, id=s.name) for s in pytorch_optimizer_specs()]


@pytest.mark.matrix
@pytest.mark.parametrize("name", _po_cases())
def test_pytorch_optimizer_matrix(name, tmp_path):
    """Every optimizer pytorch-optimizer registers that runs on this CPU with two param groups and a
    plain ``step()`` (those needing a closure, ``use_muon`` groups, a process group or 2-D-only
    parameters are skipped, with their reason): remap (in process: 100+ optimizers) and the API."""
    spec = spec_by_id(f"pytorch_optimizer.{name}")
    try:
        t = _train(spec, 2, tmp_path, ("renamed",))
    except Exception as e:  # the optimizer cannot train this model with a plain step() here
        pytest.skip(f"{name}: cannot run here: {type(e).__name__}: {str(e)[:100]}")
    # "renamed" is the harder case (reordered, groups the other way, a submodule renamed)
    for case, got in _repairs(t, tmp_path, in_process=True, variants=("renamed",)).items():
        _assert_exact_or_refused(f"{name} {case}", got)
    assert _check_agrees(t, tmp_path, ("same", "renamed")) == []


def test_matrix_compares_against_something_that_differs(tmp_path):
    """The comparison can fail: the plain load into the reordered code (no repair) is caught."""
    t = _train(spec_by_id("lion_pytorch.Lion") if available("lion_pytorch") else
               spec_by_id("pytorch_optimizer.lion"), 2, tmp_path)
    assert via_plain(t, "reordered").kind == "wrong"
    assert t.control_diff == 0.0 and torch.isfinite(torch.tensor(t.control_diff))
