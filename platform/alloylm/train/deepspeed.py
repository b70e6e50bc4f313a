"""The DeepSpeed config of a stage, built from its typed options for transformers' Trainer.

"auto" values are filled by transformers from the TrainingArguments, so batch sizes, learning
rate and clipping are stated once, in the stage's `training:` options.
"""

from __future__ import annotations

from typing import Any

from alloylm.train.options import DeepSpeedOptions


def deepspeed_config(options: DeepSpeedOptions, *, on_gpu: bool) -> dict[str, Any] | None:
    """The dict for `TrainingArguments(deepspeed=...)`, or None for plain DDP."""
    if options.stage is None:
        return None
    zero: dict[str, Any] = {"stage": options.stage}
    if options.stage >= 2:
        zero.update(overlap_comm=on_gpu, contiguous_gradients=True, reduce_scatter=True)
    if options.stage == 3:
        zero.update(
            stage3_gather_16bit_weights_on_model_save=options.gather_16bit_weights_on_save,
            stage3_param_persistence_threshold="auto",
            stage3_prefetch_bucket_size="auto",
            reduce_bucket_size="auto",
        )
    if options.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if options.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    config: dict[str, Any] = {
        "zero_optimization": zero,
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": options.precision == "bf16"},
        "fp16": {"enabled": options.precision == "fp16"},
        "wall_clock_breakdown": False,
    }
    if not on_gpu:
        # DeepSpeed's fused Adam is a CUDA/C++ op that it would JIT-compile for minutes on CPU;
        # torch's own AdamW does the same maths.
        config["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto", "torch_adam": True},
        }
    return config
