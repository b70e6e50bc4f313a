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
    return _counting(ORPOTrainer)(model=model, args=args, train_dataset=datasets.Dataset(table), processing_class=tokenizer)


def _counting(trainer_class):
    """`trainer_class` counting the tokens it trains on. The Trainer counts a batch's `input_ids`
    (`include_num_input_tokens_seen`), which ORPO's batches do not have: they hold prompt+chosen
    and prompt+rejected sequences, so it counted none (and warned on every step). Counted here as
    TRL's DPOTrainer's batches are: every non-padding token of both sequences."""

    class CountingTrainer(trainer_class):
        def _track_num_input_tokens(self, inputs):
            if self.args.include_num_input_tokens_seen == "no" or "chosen_attention_mask" not in inputs:
                return super()._track_num_input_tokens(inputs)
            import torch

            masks = (inputs["chosen_attention_mask"], inputs["rejected_attention_mask"])
            if self.args.include_num_input_tokens_seen == "non_padding":
                tokens = sum(mask.sum() for mask in masks)
            else:
                tokens = sum(mask.numel() for mask in masks)
            tokens = torch.as_tensor(tokens, device=self.args.device, dtype=torch.int64)
            self.state.num_input_tokens_seen += self.accelerator.gather(tokens).sum().item()

    CountingTrainer.__name__ = CountingTrainer.__qualname__ = trainer_class.__name__
    return CountingTrainer
