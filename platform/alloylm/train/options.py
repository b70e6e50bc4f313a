"""Typed options of a training stage: hyperparameters, DeepSpeed, LoRA, resources, checkpoints.

They are part of the run config (`stages.<name>.training`, `.deepspeed`, `.lora`, `.resources`,
`.checkpoint`) and travel to every Ray Train worker inside its config argument.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from alloylm.schema import SEED_MAX
from alloylm.schema import Frozen as _Frozen


class TrainingOptions(_Frozen):
    """Optimisation hyperparameters (the names follow transformers' TrainingArguments)."""

    epochs: float = Field(1.0, gt=0, description="Passes over the stage's data (ignored when max_steps is set).")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps (overrides epochs).")
    learning_rate: float = Field(2e-5, gt=0, description="Peak learning rate.")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup", "cosine_with_min_lr"] = Field(
        "linear", description="Learning-rate schedule (transformers' lr_scheduler_type)."
    )
    min_lr_rate: float | None = Field(
        None, gt=0, lt=1, description="cosine_with_min_lr: the floor of the cosine, as a fraction of learning_rate (required there)."
    )
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Fraction of the steps spent warming the learning rate up.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    batch_size: int = Field(8, ge=1, description="Sequences per worker per micro-batch.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    max_length: int = Field(1024, ge=8, description="Longest sequence (SFT, DPO, ORPO); CPT uses the packed block size.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass to save memory.")
    logging_steps: int = Field(5, ge=1, description="Log loss, learning rate and tokens/s every this many steps.")
    seed: int | None = Field(None, ge=0, le=SEED_MAX, description="Training seed (default: the run's seed).")

    @model_validator(mode="after")
    def _check_schedule(self) -> TrainingOptions:
        # transformers builds cosine_with_min_lr only with its floor given (else it fails inside
        # train(), on every worker, naming neither key).
        if self.lr_scheduler == "cosine_with_min_lr" and self.min_lr_rate is None:
            raise ValueError("lr_scheduler cosine_with_min_lr needs min_lr_rate (its floor, a fraction of learning_rate, e.g. 0.1)")
        if self.min_lr_rate is not None and self.lr_scheduler != "cosine_with_min_lr":
            raise ValueError(f"min_lr_rate is used by lr_scheduler cosine_with_min_lr only, not {self.lr_scheduler}")
        return self


class DeepSpeedOptions(_Frozen):
    """DeepSpeed ZeRO; `stage: null` trains with plain DDP instead."""

    stage: Literal[0, 1, 2, 3] | None = Field(None, description="ZeRO stage 0-3, or null for plain DDP without DeepSpeed.")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="Training precision. fp16 needs GPUs (DeepSpeed's fp16 fails on CPU)."
    )
    offload_optimizer: bool = Field(False, description="ZeRO-Offload: optimizer states in CPU memory (stage >= 1).")
    offload_params: bool = Field(False, description="ZeRO-Infinity: parameters in CPU memory (stage 3 only).")
    gather_16bit_weights_on_save: bool = Field(
        True, description="ZeRO-3: gather full weights when saving, so the output is a plain model (as the paper did)."
    )

    @model_validator(mode="after")
    def _check(self) -> DeepSpeedOptions:
        if self.offload_params and self.stage != 3:
            raise ValueError("offload_params needs stage 3")
        if self.offload_optimizer and not self.stage:
            raise ValueError("offload_optimizer needs stage 1, 2 or 3")
        if self.stage == 3 and not self.gather_16bit_weights_on_save:
            # Measured: the stage committed a folder with only global_step*/ and zero_to_fp32.py,
            # which no later stage, merge or server can load.
            raise ValueError(
                "gather_16bit_weights_on_save: false with stage 3 saves only sharded ZeRO checkpoints, "
                "not the plain model every later stage, merge and server reads; keep it true"
            )
        return self


class LoraOptions(_Frozen):
    """Low-rank adaptation with PEFT; the stage's output is also saved merged into a plain model."""

    r: int = Field(16, ge=1, description="Rank of the update matrices.")
    alpha: int = Field(32, ge=1, description="Scaling numerator (lora_alpha).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA path.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt, or all-linear."
    )


class ResourceOptions(_Frozen):
    """Ray Train workers and what each one reserves."""

    workers: int = Field(1, ge=1, description="Training workers (data-parallel ranks).")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per worker.")
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs per worker: 0 trains on CPU with gloo, 1 on one GPU per worker.")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="How workers are placed on nodes (STRICT_SPREAD: one per node)."
    )

    @field_validator("gpus_per_worker")
    @classmethod
    def _one_gpu_per_rank(cls, value: float) -> float:
        # Each worker is one DDP/DeepSpeed rank, which trains on one device (accelerate binds it to
        # cuda:LOCAL_RANK): two ranks sharing a GPU fail in NCCL, and a second GPU would sit idle.
        if value not in (0, 1):
            raise ValueError(f"must be 0 (CPU) or 1: each worker is one rank on one GPU, got {value:g}; for more GPUs raise `workers`")
        return value

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0


class CheckpointOptions(_Frozen):
    """Checkpoints for resuming a stage after a failure or an interruption."""

    every_steps: int | None = Field(None, ge=1, description="Checkpoint every this many optimizer steps (null: none).")
    keep: int = Field(2, ge=1, description="Checkpoints kept (the newest ones).")
    max_failures: int = Field(2, ge=0, description="Worker-group failures tolerated; each resumes from the last checkpoint.")
    max_start_failures: int = Field(
        5,
        ge=-1,
        description=(
            "Worker-group starts that may time out (each waits RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S, Ray's"
            " setting, 60 s by default) before the stage fails: bounds the wait after a node is lost (about"
            " 6 min by default). On an autoscaling cluster whose new nodes take longer to come up, raise it;"
            " -1 waits forever (Ray's own default)."
        ),
    )
