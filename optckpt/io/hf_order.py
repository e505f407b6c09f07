"""The registration order of a Hugging Face model, rebuilt from its ``config.json``.

Safetensors weights are sorted by name, so a HF Trainer / accelerate directory does not keep the
order the optimizer saw. transformers (an optional dependency) can rebuild it: the architecture
named in ``config.json`` is instantiated on the ``meta`` device (no memory, no weights) and its
``named_parameters()`` give the order, each tied weight once. Custom code (``auto_map``) is never
imported unless the user trusts the checkpoint."""

from __future__ import annotations

import os
from typing import Any

from ..checkpoint import ModelState, TensorMeta
from .hf_offline import model_class, offline
from .jsonfile import load as load_json

__all__ = ["hf_model_order"]


def hf_model_order(directory: str, *, trust_code: bool = False) -> tuple[ModelState | None, str]:
    """A model state in trusted registration order (meta tensors), or None and the reason why not."""
    import torch

    path = os.path.join(directory, "config.json")
    try:
        raw = load_json(path)
    except (OSError, ValueError):
        return None, "config.json is missing or unreadable"
    if not isinstance(raw, dict):
        return None, "config.json is not a JSON object"
    archs = raw.get("architectures") or []
    if not isinstance(archs, list) or not archs or not all(isinstance(a, str) for a in archs):
        return None, "config.json names no architecture"
    if raw.get("auto_map") and not trust_code:
        return None, ("config.json points at custom model code (auto_map), which optckpt does not run "
                      "unless you pass --trust-pickle")
    try:
        import transformers
    except ImportError:
        return None, "install transformers (pip install 'optckpt[hf]') to rebuild the order from config.json"
    try:
        with offline():
            config = transformers.AutoConfig.from_pretrained(directory, trust_remote_code=trust_code,
                                                             local_files_only=True)
            cls: Any
            if raw.get("auto_map"):
                cls = transformers.AutoModelForCausalLM if "AutoModelForCausalLM" in raw["auto_map"] else \
                    transformers.AutoModel
                with torch.device("meta"):
                    model = cls.from_config(config, trust_remote_code=True)
            else:
                cls, why = model_class(transformers, archs[0])
                if cls is None:
                    return None, f"config.json's architecture: {why}"
                with torch.device("meta"):
                    model = cls(config)
    except Exception as e:  # any failure to build the model only means: no order evidence
        return None, f"could not instantiate {archs[0]} from config.json: {type(e).__name__}: {e}"
    meta = {n: TensorMeta.of(p) for n, p in model.named_parameters()}
    name = f"config.json ({archs[0]}, transformers {transformers.__version__}, meta device)"
    return ModelState(name, "config.json", (), {}, meta, order_trusted=True), ""
