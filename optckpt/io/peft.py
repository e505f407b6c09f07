"""The live names and registration order of a PEFT adapter's trainable parameters.

A PEFT adapter directory (``adapter_model.safetensors`` + ``adapter_config.json``; the transformers
Trainer writes one per ``checkpoint-N/`` for a PEFT model) stores only the trainable parameters,
sorted by name and without the adapter name (``...lora_A.weight`` for the live
``...lora_A.default.weight``). peft and transformers (optional dependencies) rebuild both: the base
model named in ``adapter_config.json`` is instantiated on the ``meta`` device from its locally
available config (never downloaded), the adapter is injected as the config says, and peft's own
saving rule gives each trainable parameter's key in the file. Strictly offline: the base model must be
a local directory or already in the local cache (the libraries' offline mode is on for the call), and
the base model class is only ever one of transformers' registered model classes. The result is used only when every
trainable parameter's key is in the file with the same shape."""

from __future__ import annotations

import json
import os

import torch

from ..checkpoint import ModelState, TensorMeta
from .hf_offline import local_source, model_class, offline

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
    if not base or not isinstance(base, str):
        return None, "adapter_config.json names no base model"
    missing = local_source(base)
    if missing is not None:
        return None, f"the base model's config is not available locally: {missing}"
    try:
        import peft
        import transformers
    except ImportError:
        return None, "install peft and transformers to rebuild a PEFT adapter's names and order"
    try:
        with offline():
            config = transformers.AutoConfig.from_pretrained(base, trust_remote_code=trust_code,
                                                             local_files_only=True)
    except Exception as e:  # not available locally (optckpt never downloads), or custom code not trusted
        return None, f"the base model's config ({base}) is not available locally: {type(e).__name__}"
    if getattr(config, "auto_map", None) and not trust_code:
        return None, (f"the base model ({base}) uses custom model code (auto_map), which optckpt does not run "
                      "unless you pass --trust-pickle")
    mapping = raw.get("auto_mapping")
    arch = ((mapping.get("base_model_class") if isinstance(mapping, dict) else None)
            or (getattr(config, "architectures", None) or [None])[0])
    cls, why = model_class(transformers, arch)
    if cls is None:
        return None, f"the adapter's base model class: {why}"
    try:
        with offline():
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
