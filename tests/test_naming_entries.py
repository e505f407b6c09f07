"""How often a CLI ``remap`` enters the naming code (``optckpt/mapping.py``): counted, not guessed.

A profile hook records every call into a function of ``mapping.py`` made from outside that module
during one in-process ``optckpt remap --dry-run`` (generator expressions and calls inside the module
do not count). Today the naming is computed by ``infer_mapping`` once and settled by the new code's
grouping (``settle_by_grouping``, from ``check``) at most once; ``is_lbfgs`` is a kind predicate, not
naming. The issue's goal (one ``resolve`` pass) would bring the naming entries to one; until then this
keeps them from growing back (the issue counted five)."""

from __future__ import annotations

import sys
from collections import Counter
from types import FrameType
from typing import Any

import pytest
from conftest import FIXTURES, ROOT, invoke

import optckpt.mapping

NAMING = {"infer_mapping", "settle_by_grouping", "name_by_target_shapes", "pair_groups"}
PREDICATES = {"is_lbfgs"}  # what kind of optimizer it is: asked once by the command, names nothing


def _entries(*args: str) -> tuple[int, Counter[str]]:
    here = optckpt.mapping.__file__
    seen: Counter[str] = Counter()

    def hook(frame: FrameType, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code.co_filename == here and not frame.f_code.co_name.startswith("<"):
            caller = frame.f_back
            if caller is not None and caller.f_code.co_filename != here:
                seen[frame.f_code.co_name] += 1

    old = sys.getprofile()
    sys.setprofile(hook)
    try:
        r = invoke(*args)
    finally:
        sys.setprofile(old)
    return r.exit_code, seen


@pytest.mark.parametrize("ckpt, target", [
    ("bundle.pt", "models.py:build_cnn_head_first"),
    ("tsm_sgd.pth.tar", "seed_systems.py:tsm_new"),  # names settled by the new code's policy groups
    ("nerf/000003.tar", "seed_systems.py:nerf_new"),
])
def test_cli_remap_enters_the_naming_code_once_plus_the_grouping_settle(ckpt, target, monkeypatch):
    monkeypatch.chdir(ROOT)
    code, seen = _entries("remap", str(FIXTURES / ckpt), "--target", str(FIXTURES / target), "--dry-run",
                          "--format", "json")
    assert code == 0, seen
    assert set(seen) <= NAMING | PREDICATES, seen  # a new entry point: fold it into the one pass
    assert seen["infer_mapping"] == 1, seen
    assert all(seen[n] <= 1 for n in seen), seen
    assert sum(seen[n] for n in NAMING) <= 2, seen
