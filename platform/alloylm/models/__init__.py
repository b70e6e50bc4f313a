"""Models: the built-in tiny architectures, their tokenizer, and loading/saving from any source."""

from alloylm.models.loading import (
    check_safetensors,
    check_tokenizer_folder,
    classify_source,
    load_model,
    load_tokenizer,
    materialize_model_dir,
    save_model,
)
from alloylm.models.presets import PRESETS, build_model, preset_config
from alloylm.models.tokenizer import CHAT_TEMPLATE, stop_token_ids, train_tokenizer

__all__ = [
    "CHAT_TEMPLATE",
    "PRESETS",
    "build_model",
    "check_safetensors",
    "check_tokenizer_folder",
    "classify_source",
    "load_model",
    "load_tokenizer",
    "materialize_model_dir",
    "preset_config",
    "save_model",
    "stop_token_ids",
    "train_tokenizer",
]
