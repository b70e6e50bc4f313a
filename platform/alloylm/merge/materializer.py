"""Writing a merge to disk as a complete Hugging Face model folder: mergekit's `run_merge` for the
weights and config, then the tokenizer, chat template, generation config and special token ids of
the parent chosen to speak for the merged model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from transformers import AutoConfig, GenerationConfig

from mergekit.merge import run_merge
from mergekit.options import MergeOptions

from alloylm.merge.mergekit_builder import MergeInputError, mergekit_yaml_text, validate_merge_config
from alloylm.models.loading import replace_folder

# mergekit's own list (mergekit.merge._copy_tokenizer), minus generation_config.json, handled
# separately below so it exists even when the donor has none.
TOKENIZER_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "added_tokens.json",
    "merges.txt",
    "vocab.json",
    "chat_template.jinja",
    "chat_template.json",
)
_TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def materialize(
    config: Mapping[str, Any],
    out_dir: str,
    *,
    tokenizer_from: str,
    trust_remote_code: bool = False,
    copy_tokenizer: bool = True,
    random_seed: int | None = None,
    device: str = "cpu",
) -> str:
    """Run mergekit's `run_merge` for `config` into the local folder `out_dir` (safetensors) and
    make it a complete Hugging Face folder; returns `out_dir`.

    Tokenizer files, chat template, generation_config.json and the bos/eos/pad token ids come from
    the local model folder `tokenizer_from` (the chosen parent). mergekit alone would copy them
    from the base model, which in the paper's SLERP (base = the DPO model) is not necessarily the
    parent whose chat format the merge should speak. A config with `tokenizer_source` keeps the
    tokenizer mergekit builds; only the generation config and token ids are taken from
    `tokenizer_from` then. `random_seed` is `mergekit-yaml --random-seed` (random methods);
    `device` is where mergekit does the arithmetic (`mergekit-yaml --device`, e.g. "cuda"), reading
    the parents' tensors onto it.
    The folder is written beside `out_dir` and renamed into place, replacing what was there.
    """
    merge_config = validate_merge_config(config)
    donor = os.path.abspath(tokenizer_from)
    if not os.path.isfile(os.path.join(donor, "config.json")):
        raise MergeInputError(f"tokenizer_from {tokenizer_from} is not a local model folder (config.json is missing)")
    builds_tokenizer = merge_config.tokenizer_source is not None or merge_config.tokenizer is not None
    if copy_tokenizer and not builds_tokenizer and not os.path.isfile(os.path.join(donor, "tokenizer_config.json")):
        raise MergeInputError(f"tokenizer_from {tokenizer_from} holds no tokenizer (tokenizer_config.json is missing)")

    dest = Path(out_dir).expanduser().absolute()
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.merging-", dir=dest.parent))
    try:
        options = MergeOptions(
            trust_remote_code=trust_remote_code,
            random_seed=random_seed,
            device=device,
            read_to_gpu=device != "cpu",
            # The tokenizer is copied below from tokenizer_from, not from mergekit's donor.
            copy_tokenizer=False,
            quiet=True,
        )
        run_merge(merge_config, str(staging), options=options, config_source=mergekit_yaml_text(config, random_seed=random_seed))
        if copy_tokenizer and not builds_tokenizer:
            for name in TOKENIZER_FILES:
                if os.path.isfile(os.path.join(donor, name)):
                    shutil.copy(os.path.join(donor, name), staging / name)
        _adopt_generation_settings(staging, donor, trust_remote_code, check_vocab=not builds_tokenizer)
        replace_folder(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(dest)


def _adopt_generation_settings(folder: Path, donor: str, trust_remote_code: bool, *, check_vocab: bool) -> None:
    """Special token ids in config.json and generation_config.json as the donor has them."""
    donor_config = AutoConfig.from_pretrained(donor, trust_remote_code=trust_remote_code)
    config_path = folder / "config.json"
    written = json.loads(config_path.read_text(encoding="utf-8"))
    vocab_key = "vocab_size"
    donor_vocab = getattr(donor_config.get_text_config(), vocab_key, None)
    if check_vocab and donor_vocab is not None and written.get(vocab_key) not in (None, donor_vocab):
        raise MergeInputError(
            f"tokenizer_from {donor} has vocab_size {donor_vocab}, the merged model {written[vocab_key]}"
        )
    for key in _TOKEN_ID_KEYS:
        value = getattr(donor_config, key, None)
        if value is not None:
            written[key] = value
    # Edited as JSON rather than round-tripped through PretrainedConfig: every other key stays
    # exactly as mergekit wrote it.
    config_path.write_text(json.dumps(written, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if os.path.isfile(os.path.join(donor, "generation_config.json")):
        shutil.copy(os.path.join(donor, "generation_config.json"), folder / "generation_config.json")
    else:
        GenerationConfig.from_model_config(AutoConfig.from_pretrained(str(folder))).save_pretrained(str(folder))
