"""The live names and registration order of a PEFT adapter's trainable parameters.

A PEFT adapter directory (``adapter_model.safetensors`` + ``adapter_config.json``; the transformers
Trainer writes one per ``checkpoint-N/`` for a PEFT model) stores only the trainable parameters,
sorted by name and without the adapter name (``...lora_A.weight`` for the live
``...lora_A.default.weight``). peft and transformers (optional dependencies) rebuild both: the base
model named in ``adapter_config.json`` is instantiated on the ``meta`` device from its locally
available config (never downloaded), the adapter is injected as the config says, and peft's own
saving rule gives each trainable parameter's key in the file. The result is used only when every
trainable parameter's key is in the file with the same shape."""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from ..checkpoint import ModelState, TensorMeta

__all__ = ["ADAPTER_FILES", "peft_adapter_order"]

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")


def peft_adapter_order(directory: str, saved: ModelState, *,
                       trust_code: bool = False) -> tuple[ModelState | None, str]:
    """A model state with the adapter's trainable parameters under their live names, in registration
    order (meta tensors), or None and the reason why not. ``saved`` is the adapter file as read."""
    try:
        with open(os.path.join(directory, "adapter_config.json"), encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError):
        return None, "adapter_config.json is unreadable"
    base = raw.get("base_model_name_or_path") if isinstance(raw, dict) else None
    if not base:
        return None, "adapter_config.json names no base model"
    try:
        import peft
        import transformers
    except ImportError:
        return None, "install peft and transformers to rebuild a PEFT adapter's names and order"
    try:
        config = transformers.AutoConfig.from_pretrained(base, trust_remote_code=trust_code, local_files_only=True)
    except Exception as e:  # not available locally (optckpt never downloads), or custom code not trusted
        return None, f"the base model's config ({base}) is not available locally: {type(e).__name__}"
    if getattr(config, "auto_map", None) and not trust_code:
        return None, (f"the base model ({base}) uses custom model code (auto_map), which optckpt does not run "
                      "unless you pass --trust-pickle")
    arch = ((raw.get("auto_mapping") or {}).get("base_model_class")
            or (getattr(config, "architectures", None) or [None])[0])
    cls: Any = getattr(transformers, arch, None) if isinstance(arch, str) else None
    if cls is None:
        return None, f"transformers {transformers.__version__} has no architecture {arch!r} (the adapter's base model)"
    try:
        peft_config = peft.PeftConfig.from_pretrained(directory)
        peft_config.inference_mode = False  # saved as True; the optimizer held the trainable parameters
        with torch.device("meta"):
            model = peft.get_peft_model(cls(config), peft_config)
        trainable = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
        keys = peft.get_peft_model_state_dict(model, state_dict=model.state_dict(keep_vars=True),
                                              save_embedding_layers=False)
    except Exception as e:  # any failure to rebuild the adapter only means: no order evidence
        return None, f"could not rebuild the {raw.get('peft_type', 'PEFT')} adapter on {arch}: {type(e).__name__}: {e}"
    live = {trainable[id(v)]: k for k, v in keys.items() if id(v) in trainable}
    metas = {n: TensorMeta.of(p) for n, p in model.named_parameters() if p.requires_grad}
    wrong = [n for n in metas if n not in live or (m := saved.meta.get(live[n])) is None or m.shape != metas[n].shape]
    if wrong or len(set(live.values())) != len(live):
        return None, (f"the rebuilt adapter does not match {saved.name}: "
                      f"{len(wrong)} trainable parameters not in it with their shapes (e.g. {wrong[:1]})")
    name = f"adapter_config.json ({raw.get('peft_type')} on {arch}, peft {peft.__version__}, meta device)"
    return ModelState(name, "adapter_config.json", (), {}, metas, order_trusted=True), ""
