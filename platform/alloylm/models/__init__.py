"""Models: the built-in tiny architectures, their tokenizer, and loading/saving from any source.

The names below are loaded on first use (PEP 562): `alloylm.models.presets`, which config
validation reads, must not pull in torch and transformers through this package's import.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "check_safetensors": "loading",
    "check_tokenizer_folder": "loading",
    "classify_source": "loading",
    "load_model": "loading",
    "load_tokenizer": "loading",
    "materialize_model_dir": "loading",
    "save_model": "loading",
    "PRESETS": "presets",
    "build_model": "presets",
    "preset_config": "presets",
    "CHAT_TEMPLATE": "tokenizer",
    "stop_token_ids": "tokenizer",
    "train_tokenizer": "tokenizer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
