"""The shared glue of optckpt.integrations, without any training library."""

from __future__ import annotations

import subprocess
import sys

import pytest
import real_models
import torch

from optckpt import MappingError
from optckpt.integrations._core import load_by_name


def test_importing_optckpt_and_the_package_imports_no_training_library():
    code = ("import sys, optckpt, optckpt.integrations, optckpt.cli; "
            "print([m for m in ('pytorch_lightning', 'lightning', 'accelerate', 'transformers') if m in sys.modules])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


def _stepped():
    model = real_models.build_tinynet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = real_models.synthetic_tinynet_data()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    return model, opt


def test_ambiguous_load_raises_and_leaves_the_optimizer_as_it_was():
    _, old = _stepped()
    saved = old.state_dict()  # index-based, and no model to tell the order: TinyNet has same-shape params
    model, opt = _stepped()
    for p in model.parameters():
        opt.state[p]["exp_avg"].fill_(7.0)
    before = {id(p): opt.state[p]["exp_avg"] for p in model.parameters()}
    with pytest.raises(MappingError, match="allow_ambiguous=True"):
        load_by_name(opt, model, saved, allow_ambiguous=False)
    assert all(opt.state[p]["exp_avg"] is before[id(p)] for p in model.parameters())
    assert all(float(opt.state[p]["exp_avg"].flatten()[0]) == 7.0 for p in model.parameters())
    report = load_by_name(opt, model, saved, allow_ambiguous=True)
    # no model saved: a shape found once on each side names its index (target-shapes, as `optckpt check` and
    # `optckpt remap` name it); the same-shape parameters (2 [8, 8] weights, 4 [8] vectors) start fresh
    assert report.evidence == "target-shapes" and len(report.ambiguous) == 6
    names = [n for n, _ in model.named_parameters()]
    for i, (name, p) in enumerate(model.named_parameters()):
        if name in ("embed.weight", "head.weight", "head.bias"):
            assert torch.equal(opt.state[p]["exp_avg"], saved["state"][i]["exp_avg"]), name
        else:
            assert p not in opt.state or not opt.state[p], name
    assert len(names) == 9
