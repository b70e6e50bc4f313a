"""Odds-ratio preference optimisation with TRL's ORPOTrainer (in `trl.experimental.orpo` in TRL 1.16).

ORPO needs no reference model: the odds-ratio term is added to the SFT loss of the chosen answer.
"""

from __future__ import annotations

from typing import Any

from alloylm.train.data import read_prepared_table, steps_for
from alloylm.train.dpo import PREFERENCE_COLUMNS


def max_steps(stage, job, world_size: int) -> int:
    return steps_for(job.data_rows, stage, world_size)


def build_trainer(stage, job, model, tokenizer, arguments: dict[str, Any]):
    import datasets
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    table = read_prepared_table(job.data_uri, PREFERENCE_COLUMNS)
    if tokenizer.pad_token is None:
        # Hub tokenizers such as Llama 3.1's have none. TRL's DPOTrainer pads with EOS then (and
        # tells the model); its experimental ORPOTrainer raises on the first batch instead.
        tokenizer.pad_token = tokenizer.eos_token
        model.config.get_text_config().pad_token_id = tokenizer.pad_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    args = ORPOConfig(**arguments, beta=stage.beta, max_length=stage.training.max_length)
    return ORPOTrainer(model=model, args=args, train_dataset=datasets.Dataset(table), processing_class=tokenizer)
