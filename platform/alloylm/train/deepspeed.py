"""The DeepSpeed config of a stage, built from its typed options for transformers' Trainer, and
the record of what DeepSpeed actually ran (read back from the engine after training).

"auto" values are filled by transformers from the TrainingArguments, so batch sizes, learning
rate and clipping are stated once, in the stage's `training:` options.
"""

from __future__ import annotations

import sys
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
    elif options.offload_optimizer:
        # With the optimizer states on the CPU, DeepSpeed steps them with its own CPU Adam
        # (DeepSpeedCPUAdam) and refuses the torch AdamW transformers would otherwise hand it
        # (`zero_force_ds_cpu_optimizer`): the optimizer is DeepSpeed's, its values the Trainer's.
        config["optimizer"] = {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}}
    return config


def deepspeed_record(trainer) -> dict[str, Any]:
    """What DeepSpeed ran for `trainer`, read from its engine, not from the config.

    `{"enabled", "zero_stage", "offload": {"optimizer", "params"}, ...}` for `train_summary.json`:
    a stage whose config asked for ZeRO but trained under plain DDP records `enabled: false`.
    """
    engine = _engine(trainer)
    if engine is None:
        return {"enabled": False, "zero_stage": None, "offload": {"optimizer": None, "params": None}}
    precision = "bf16" if engine.bfloat16_enabled() else "fp16" if engine.fp16_enabled() else "fp32"
    return {
        "enabled": True,
        "zero_stage": int(engine.zero_optimization_stage()),
        "offload": {"optimizer": _offload_device(engine.zero_offload_optimizer()), "params": _offload_device(engine.zero_offload_param())},
        "gather_16bit_weights_on_save": bool(engine.zero_gather_16bit_weights_on_model_save()),
        "precision": precision,
        # The ZeRO optimizer class (DeepSpeedZeroOptimizer, ..._Stage3) shows the states were partitioned.
        "optimizer": type(engine.optimizer).__name__,
    }


def _engine(trainer):
    """The trainer's DeepSpeedEngine, or None (DeepSpeed never imported: no engine can exist)."""
    deepspeed = sys.modules.get("deepspeed")
    if deepspeed is None:
        return None
    for candidate in (getattr(trainer, "model_wrapped", None), getattr(trainer, "deepspeed", None)):
        if isinstance(candidate, deepspeed.DeepSpeedEngine):
            return candidate
    return None


def _offload_device(offload) -> str | None:
    """"cpu" / "nvme" for an offload section of the engine's config, None when nothing is offloaded."""
    device = getattr(offload, "device", None)
    device = getattr(device, "value", device)
    return None if device in (None, "none") else str(device)
