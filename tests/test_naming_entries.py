"""How often each verb enters the naming code (``optckpt/mapping.py`` and ``optckpt/resolve.py``):
counted, not guessed.

A profile hook records every call into a function of those modules made from outside them during
one in-process command (generator expressions and calls among the naming modules do not count):
the CLI's ``remap --dry-run``, ``check``, ``reset --dry-run``, ``set --dry-run``, ``diff``,
``inspect``, the public verb ``optckpt.check`` and the resume API ``optckpt.load_optimizer_state_dict``.
Each names a checkpoint's optimizer in one pass, :func:`optckpt.resolve.resolve`, and reads the
:class:`~optckpt.resolve.Resolution` it returns: the issue counted five entries into ``mapping.py``
for a ``remap``, the last landing two (``infer_mapping`` + ``settle_by_grouping``). ``is_lbfgs`` is a
kind predicate, not naming. ``diff`` names both of its checkpoints, once each."""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable
from types import FrameType
from typing import Any

import pytest
import torch
from conftest import FIXTURES, ROOT, invoke

import optckpt
import optckpt.mapping
import optckpt.resolve

NAMING_FILES = {optckpt.mapping.__file__, optckpt.resolve.__file__}
PREDICATES = {"is_lbfgs"}  # what kind of optimizer it is: asked once by the command, names nothing
BUNDLE = str(FIXTURES / "bundle.pt")
SEED_OPT = str(FIXTURES / "seed" / "optimizer_0.pth")


def _entries(run: Callable[[], Any]) -> tuple[Any, Counter[str]]:
    seen: Counter[str] = Counter()

    def hook(frame: FrameType, event: str, arg: Any) -> None:
        code = frame.f_code
        if event == "call" and code.co_filename in NAMING_FILES and not code.co_name.startswith("<"):
            caller = frame.f_back
            if caller is not None and caller.f_code.co_filename not in NAMING_FILES:
                seen[code.co_name] += 1

    old = sys.getprofile()
    sys.setprofile(hook)
    try:
        result = run()
    finally:
        sys.setprofile(old)
    return result, seen


def _cli(*args: str) -> tuple[int, Counter[str]]:
    r, seen = _entries(lambda: invoke(*args))
    return r.exit_code, seen


def _once(seen: Counter[str], times: int = 1) -> None:
    assert set(seen) <= {"resolve"} | PREDICATES, seen  # a new entry point: fold it into the one pass
    assert seen["resolve"] == times, seen
    assert all(seen[p] <= 1 for p in PREDICATES), seen


def test_the_hook_sees_a_naming_entry():
    ck = optckpt.load(BUNDLE)
    _, seen = _entries(lambda: optckpt.mapping.infer_mapping(ck))
    assert seen == Counter({"infer_mapping": 1})  # what the assertions below would catch


@pytest.mark.parametrize("ckpt, target", [
    ("bundle.pt", "models.py:build_cnn_head_first"),
    ("tsm_sgd.pth.tar", "seed_systems.py:tsm_new"),  # names settled by the new code's policy groups
    ("nerf/000003.tar", "seed_systems.py:nerf_new"),
])
def test_cli_remap_and_check_enter_the_naming_code_once(ckpt, target, monkeypatch):
    monkeypatch.chdir(ROOT)
    path, spec = str(FIXTURES / ckpt), str(FIXTURES / target)
    code, seen = _cli("remap", path, "--target", spec, "--dry-run", "--format", "json")
    assert code == 0, seen
    _once(seen)
    code, seen = _cli("check", path, "--target", spec, "--format", "json")
    assert code in (0, 1), seen
    _once(seen)


def test_the_other_verbs_enter_the_naming_code_once_per_checkpoint(monkeypatch):
    monkeypatch.chdir(ROOT)
    code, seen = _cli("reset", BUNDLE, "--params", "conv.*", "--dry-run", "--format", "json")
    assert code == 0, seen
    _once(seen)
    code, seen = _cli("set", BUNDLE, "--params", "*", "--lr", "0.5", "--dry-run", "--format", "json")
    assert code == 0, seen
    _once(seen)
    code, seen = _cli("inspect", BUNDLE, "--format", "json")
    assert code == 0, seen
    _once(seen)
    code, seen = _cli("diff", BUNDLE, str(FIXTURES / "tsm_sgd.pth.tar"), "--format", "json")
    assert code == 1, seen
    _once(seen, times=2)  # two checkpoints, each named once


def test_an_optimizer_saved_alone_enters_once_for_check_and_remap(monkeypatch):
    monkeypatch.chdir(ROOT)
    spec = str(FIXTURES / "models.py:build_model2")
    code, seen = _cli("check", SEED_OPT, "--target", spec, "--format", "json")
    assert code == 1, seen
    _once(seen)
    code, seen = _cli("remap", SEED_OPT, "--target", spec, "--dry-run", "--format", "json")
    assert code == 0, seen
    _once(seen)


def test_the_python_verbs_and_the_resume_api_enter_the_naming_code_once(monkeypatch):
    monkeypatch.chdir(ROOT)
    report, seen = _entries(lambda: optckpt.check(BUNDLE, target=str(FIXTURES / "models.py:build_cnn_head_first")))
    assert report.exit_code == 1
    _once(seen)
    monkeypatch.syspath_prepend(str(FIXTURES))
    import models  # type: ignore[import-not-found]

    model = models.build_cnn_head_first()
    optimizer = torch.optim.Adam(model.parameters())
    loaded, seen = _entries(lambda: optckpt.load_optimizer_state_dict(optimizer, model, BUNDLE))
    assert loaded.moved and not loaded.ambiguous
    _once(seen)
