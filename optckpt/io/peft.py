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

import copy
import os
import sys
from typing import Any

from ..checkpoint import ModelState, TensorMeta
from .hf_offline import local_source, model_class, offline
from .jsonfile import load as load_json

__all__ = ["ADAPTER_FILES", "peft_adapter_order", "peft_order_from_target"]

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")


def peft_adapter_order(directory: str, saved: ModelState, *,
                       trust_code: bool = False) -> tuple[ModelState | None, str]:
    """A model state with the adapter's trainable parameters under their live names, in registration
    order (meta tensors), or None and the reason why not. ``saved`` is the adapter file as read."""
    try:
        raw = load_json(os.path.join(directory, "adapter_config.json"))
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
    return _rebuild(directory, saved, raw, arch, config, "default", peft, transformers, "")


def peft_order_from_target(directory: str, saved: ModelState, module: object, *,
                           trust_code: bool = False) -> tuple[ModelState | None, str]:
    """The fallback when ``adapter_config.json`` names no base model (``get_peft_model`` on a model built
    from a config): the base model's config is taken from the target (the live ``PeftModel`` the new code
    builds), everything else from the checkpoint. The adapter is rebuilt on the meta device from the
    registered transformers class the adapter config records (``auto_mapping``; without one, the class of
    the target's base model, only when it is exactly a registered class), with the saved adapter config and
    the target's live adapter name (``.default.`` or another): so the names are the target's own, the
    order is the library class's registration order (a target whose code reorders its modules does not
    pass its own order off as the saved one), and the result is used only under the same checks as
    :func:`peft_adapter_order` (every rebuilt trainable parameter in the file under peft's key, same shape)."""
    peft = sys.modules.get("peft")  # a live PeftModel means its code already imported peft
    if peft is None or not isinstance(module, peft.PeftModel):
        return None, "the target is not a PeftModel"
    try:
        raw = load_json(os.path.join(directory, "adapter_config.json"))
    except (OSError, ValueError):
        return None, "adapter_config.json is unreadable"
    if not isinstance(raw, dict):
        return None, "adapter_config.json is not a JSON object"
    if raw.get("base_model_name_or_path"):
        return None, "adapter_config.json names its base model: the target's config is not used for it"
    try:
        import transformers
    except ImportError:
        return None, "install transformers to rebuild a PEFT adapter's names and order"

    adapter = getattr(module, "active_adapter", None)
    if not isinstance(adapter, str) or not adapter:
        return None, "the target's PeftModel has no single active adapter"
    base = module.get_base_model()
    config = getattr(base, "config", None)
    if not isinstance(config, transformers.PretrainedConfig):
        return None, f"the target's base model ({type(base).__name__}) has no transformers config"
    if getattr(config, "auto_map", None) and not trust_code:
        return None, ("the target's base model uses custom model code (auto_map), which optckpt does not run "
                      "unless you pass --trust-pickle")
    mapping = raw.get("auto_mapping")
    arch = mapping.get("base_model_class") if isinstance(mapping, dict) else None
    if arch is None:  # no class recorded: the target's own, only when it is exactly a registered class
        arch = type(base).__name__
        cls, why = model_class(transformers, arch)
        if cls is not type(base):
            return None, f"the adapter config records no base model class and the target's is not registered ({why})"
    return _rebuild(directory, saved, raw, arch, copy.deepcopy(config), adapter, peft, transformers,
                    ", base model config from the target")


def _rebuild(directory: str, saved: ModelState, raw: dict[str, Any], arch: object, config: Any, adapter: str,
             peft: Any, transformers: Any, how: str) -> tuple[ModelState | None, str]:
    import torch

    cls, why = model_class(transformers, arch)
    if cls is None:
        return None, f"the adapter's base model class: {why}"
    try:
        with offline():
            peft_config = peft.PeftConfig.from_pretrained(directory)
            peft_config.inference_mode = False  # saved as True; the optimizer held the trainable parameters
            with torch.device("meta"):
                model = peft.get_peft_model(cls(config), peft_config, adapter_name=adapter)
            trainable = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
            keys = peft.get_peft_model_state_dict(model, state_dict=model.state_dict(keep_vars=True),
                                                  adapter_name=adapter, save_embedding_layers=False)
    except Exception as e:  # any failure to rebuild the adapter only means: no order evidence
        return None, f"could not rebuild the {raw.get('peft_type', 'PEFT')} adapter on {arch}: {type(e).__name__}: {e}"
    live = {trainable[id(v)]: k for k, v in keys.items() if id(v) in trainable}
    metas = {n: TensorMeta.of(p) for n, p in model.named_parameters() if p.requires_grad}
    wrong = [n for n in metas if n not in live or (m := saved.meta.get(live[n])) is None or m.shape != metas[n].shape]
    if wrong or len(set(live.values())) != len(live):
        return None, (f"the rebuilt adapter does not match {saved.name}: "
                      f"{len(wrong)} trainable parameters not in it with their shapes (e.g. {wrong[:1]})")
    name = f"adapter_config.json ({raw.get('peft_type')} on {arch}{how}, peft {peft.__version__}, meta device)"
    return ModelState(name, "adapter_config.json", (), {}, metas, order_trusted=True), ""
