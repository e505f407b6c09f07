"""The loader: every layout, detection by content, CUDA-saved files, opaque parts."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import FIXTURES

import optckpt
from optckpt.errors import LoadError, UnsafePickleError


def test_seed_pair_joined_with_model():
    ck = optckpt.load(FIXTURES / "seed" / "optimizer_0.pth", model=FIXTURES / "seed" / "model_0.pth")
    assert ck.layout == "torch-optimizer"
    assert [m for m in ck.models[0].meta] == ["linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias"]
    opt = ck.optimizer()
    assert opt.num_params == 4
    assert opt.state[0]["exp_avg"].shape == (3, 2)


def test_bundle_finds_everything():
    ck = optckpt.load(FIXTURES / "bundle.pt")
    assert ck.layout == "torch-bundle"
    assert [m.name for m in ck.models] == ["model"]
    assert [o.name for o in ck.optimizers] == ["optimizer"]
    assert [s.name for s in ck.schedulers] == ["lr_scheduler"]
    assert ck.extras == {"epoch": 3, "global_step": 3, "best_acc1": 0.5}
    assert ck.models[0].order_trusted
    assert "bn.running_mean" in ck.models[0].meta


def test_tensors_are_memory_mapped_not_copied():
    path = str((FIXTURES / "bundle.pt").resolve())
    ck = optckpt.load(path)
    assert ck.models[0].tensors["conv.weight"].shape == (4, 3, 3, 3)
    with open("/proc/self/maps") as f:  # the file itself is mapped into the process
        assert path in f.read()


def test_cuda_saved_file_loads_on_cpu():
    with pytest.raises(RuntimeError):  # plain torch.load on a CPU-only machine refuses it
        torch.load(FIXTURES / "cuda_saved.pt", weights_only=True)
    ck = optckpt.load(FIXTURES / "cuda_saved.pt")
    assert ck.saved_locations == ("cuda:0",)
    assert ck.models[0].tensors["conv.weight"].device.type == "cpu"
    ref = optckpt.load(FIXTURES / "bundle.pt")
    assert torch.equal(ck.models[0].tensors["conv.weight"], ref.models[0].tensors["conv.weight"])


def test_safetensors_is_lazy_and_untrusted_order():
    ck = optckpt.load(FIXTURES / "model.safetensors")
    m = ck.models[0]
    assert ck.layout == "safetensors"
    assert not m.order_trusted
    registration = list(torch.load(FIXTURES / "bundle.pt", weights_only=True)["model"])
    assert set(m.meta) == set(registration) and list(m.meta) != registration
    assert m.meta["conv.weight"].shape == (4, 3, 3, 3)
    assert m.tensors["conv.weight"].shape == (4, 3, 3, 3)


def test_named_optimizer_param_names():
    ck = optckpt.load(FIXTURES / "named_optimizer.pt")
    g = ck.optimizer().groups[0]
    assert g.param_names is not None and g.param_names[0] == "conv.weight"


def test_tsm_groups_keep_custom_keys():
    ck = optckpt.load(FIXTURES / "tsm_sgd.pth.tar")
    assert ck.layout == "timm"
    groups = ck.optimizer().groups
    assert [g.hparams["name"] for g in groups][:2] == ["first_conv_weight", "first_conv_bias"]
    assert groups[1].hparams["lr_mult"] == 2 and groups[1].hparams["decay_mult"] == 0


def test_hf_trainer_directory():
    ck = optckpt.load(FIXTURES / "hf_trainer" / "checkpoint-3")
    assert ck.layout == "hf-trainer"
    assert [o.name for o in ck.optimizers] == ["optimizer.pt"]
    assert [s.name for s in ck.schedulers] == ["scheduler.pt"]
    weights = next(m for m in ck.models if m.name == "model.safetensors")
    assert not weights.order_trusted
    assert ck.extras["global_step"] == 3
    opaque = {o.part for o in ck.opaque}
    assert "training_args.bin" in opaque and "rng_state.pth" in opaque


def test_accelerate_directory():
    ck = optckpt.load(FIXTURES / "accelerate" / "state")
    assert ck.layout == "accelerate"
    assert [o.name for o in ck.optimizers] == ["optimizer.bin"]
    assert [s.name for s in ck.schedulers] == ["scheduler.bin"]
    assert any(o.part.startswith("random_states_") for o in ck.opaque)


def test_lightning_ckpt():
    ck = optckpt.load(FIXTURES / "lightning" / "last.ckpt")
    assert ck.layout == "lightning"
    assert [o.name for o in ck.optimizers] == ["optimizer_states[0]"]
    assert [s.name for s in ck.schedulers] == ["lr_schedulers[0]"]
    assert ck.extras["global_step"] == 3
    assert ck.models[0].name == "state_dict"


def test_nested_tuple_checkpoint(tmp_path):
    """3DGS-style: a tuple whose inner tuple holds bare tensors and an optimizer state dict."""
    xyz = torch.nn.Parameter(torch.randn(5, 3))
    opt = torch.optim.Adam([{"params": [xyz], "lr": 0.1, "name": "xyz"}], lr=0.0, eps=1e-15)
    xyz.sum().backward()
    opt.step()
    torch.save(((3, xyz.detach(), opt.state_dict(), 1.0), 7000), tmp_path / "chkpnt7000.pth")
    ck = optckpt.load(tmp_path / "chkpnt7000.pth")
    assert [o.name for o in ck.optimizers] == ["[0][2]"]
    assert ck.extras["[1]"] == 7000


def test_legacy_format_file(tmp_path):
    sd = {"w": torch.ones(2)}
    torch.save(sd, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    ck = optckpt.load(tmp_path / "legacy.pt")
    assert ck.layout == "torch-model"
    assert torch.equal(ck.models[0].tensors["w"], torch.ones(2))


def test_tied_weights_detected(tmp_path):
    emb = torch.nn.Embedding(4, 3)
    head = torch.nn.Linear(3, 4, bias=False)
    head.weight = emb.weight
    m = torch.nn.ModuleDict({"emb": emb, "head": head})
    torch.save(m.state_dict(), tmp_path / "tied.pt")
    ck = optckpt.load(tmp_path / "tied.pt")
    assert ck.models[0].tied == {"head.weight": "emb.weight"}


def test_hostile_optimizer_in_hf_directory_is_refused(tmp_path):
    d = tmp_path / "checkpoint-3"
    shutil.copytree(FIXTURES / "hf_trainer" / "checkpoint-3", d)
    marker = tmp_path / "PWNED"
    torch.save({"state": {}, "param_groups": [], "x": _Evil(str(marker))}, d / "optimizer.pt")
    with pytest.raises(UnsafePickleError) as e:
        optckpt.load(d)
    assert "posix.system" in str(e.value) or "os.system" in str(e.value)
    assert not marker.exists()


def test_missing_path():
    with pytest.raises(LoadError, match="no such file"):
        optckpt.load("/nonexistent/ckpt.pt")


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))
