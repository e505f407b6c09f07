"""Strictly offline use of transformers / peft / huggingface_hub, and the model classes optckpt may
instantiate from a name a checkpoint gives.

``local_files_only=True`` alone does not keep huggingface_hub off the network (it still resolves
``huggingface.co`` for a hub id missing from the cache). :func:`offline` sets the libraries'
offline switches (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` and huggingface_hub's constant) for
the duration of a call and restores them afterwards.

A name from a checkpoint (``architectures`` in ``config.json``, ``auto_mapping.base_model_class``
in ``adapter_config.json``) is only ever looked up among transformers' registered model classes:
the exact names in its auto-model mappings, and a subclass of ``PreTrainedModel``. Anything else
(``pipeline``, ``Trainer``, a function) is refused, never called."""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Iterator
from typing import Any

__all__ = ["local_source", "model_class", "offline"]

_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """The Hugging Face libraries offline (environment and huggingface_hub's constant) within."""
    saved_env = {k: os.environ.get(k) for k in _ENV}
    constants: Any = sys.modules.get("huggingface_hub.constants")
    if constants is None:
        with contextlib.suppress(ImportError):
            constants = importlib.import_module("huggingface_hub.constants")
    saved_const = getattr(constants, "HF_HUB_OFFLINE", None) if constants is not None else None
    try:
        for k in _ENV:
            os.environ[k] = "1"
        if constants is not None and hasattr(constants, "HF_HUB_OFFLINE"):
            constants.HF_HUB_OFFLINE = True
        yield
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if constants is not None and saved_const is not None:
            constants.HF_HUB_OFFLINE = saved_const


def local_source(name: str) -> str | None:
    """None when ``name`` is a local directory or a hub id already in the local cache (with its
    ``config.json``); else the one-line reason it is not available (nothing is downloaded)."""
    if os.path.isdir(name):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return f"{name!r} is not a local directory"
    try:
        with offline():
            got = try_to_load_from_cache(name, "config.json")
    except Exception:  # not a valid hub id either
        return f"{name!r} is neither a local directory nor a model id"
    if isinstance(got, str) and os.path.isfile(got):
        return None
    return f"{name!r} is not a local directory and not in the local Hugging Face cache (optckpt never downloads)"


def _registered_names(transformers: Any) -> frozenset[str]:
    from transformers.models.auto import modeling_auto

    names: set[str] = set()
    for attr, table in vars(modeling_auto).items():
        if attr.endswith("_MAPPING_NAMES") and isinstance(table, dict):
            for v in table.values():
                names.update(x for x in (v if isinstance(v, (tuple, list)) else (v,)) if isinstance(x, str))
    return frozenset(names)


def model_class(transformers: Any, name: object) -> tuple[Any, str]:
    """transformers' model class called exactly ``name`` when it is a registered model class, else
    (None, why not)."""
    if not isinstance(name, str) or not name.isidentifier():
        return None, f"{name!r} is not a model class name"
    try:
        allowed = _registered_names(transformers)
    except Exception as e:  # a transformers without the auto mappings: nothing is instantiated
        return None, f"transformers {transformers.__version__} lists no model classes ({type(e).__name__})"
    if name not in allowed:
        return None, (f"{name!r} is not one of transformers {transformers.__version__}'s registered model classes; "
                      "refused (optckpt instantiates only those)")
    cls = getattr(transformers, name, None)
    base = getattr(transformers, "PreTrainedModel", None)
    if not (isinstance(cls, type) and isinstance(base, type) and issubclass(cls, base)):
        return None, f"transformers {transformers.__version__} has no model class {name!r}"
    return cls, ""
