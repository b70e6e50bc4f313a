"""The schema of training stages (cpt, sft, dpo, orpo) and their registration as stage kinds.

The code that runs them is `alloylm.train.launcher` (imported only when a stage runs: this module
stays light, because loading any run config imports it).
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import Field, field_validator, model_validator

from alloylm.schema import SEED_MAX
from alloylm.schema import Frozen as _Frozen
from alloylm.schema import StageConfigBase as _StageBase
from alloylm.stages import StageKind, register_stage_kind
from alloylm.train.options import CheckpointOptions, DeepSpeedOptions, LoraOptions, ResourceOptions, TrainingOptions

class PresetInit(_Frozen):
    """Start from a freshly initialised model of a named preset architecture."""

    init: str = Field(description="Preset name, e.g. tiny-llama, small-llama, tiny-mistral.")
    seed: int | None = Field(None, ge=0, le=SEED_MAX, description="Initialisation seed (default: the run's seed).")

    @field_validator("init")
    @classmethod
    def _known_preset(cls, value: str) -> str:
        from alloylm.models.presets import PRESETS

        if value not in PRESETS:
            raise ValueError(f"unknown preset {value!r}; known: {', '.join(sorted(PRESETS))}")
        return value


ModelFrom = Union[PresetInit, str]


class TrainStageConfig(_StageBase):
    """A training stage run on Ray Train; one subclass per method (cpt, sft, dpo, orpo)."""

    kind: str
    from_: ModelFrom = Field(
        alias="from",
        description="Parent: a stage name of this run, a model (local path, s3:// URI, Hugging Face id) or {init: PRESET}.",
    )
    data: str = Field(description="Name of a data set under `datasets:`.")
    training: TrainingOptions = Field(default_factory=TrainingOptions, description="Optimisation hyperparameters.")
    deepspeed: DeepSpeedOptions = Field(default_factory=DeepSpeedOptions, description="DeepSpeed ZeRO (null stage: DDP).")
    lora: LoraOptions | None = Field(None, description="Train LoRA adapters instead of all weights (null: full fine-tuning).")
    resources: ResourceOptions = Field(default_factory=ResourceOptions, description="Workers and their resources.")
    checkpoint: CheckpointOptions = Field(default_factory=CheckpointOptions, description="Checkpointing and failure handling.")

    def parent_refs(self) -> list[str]:
        return [] if isinstance(self.from_, PresetInit) else [self.from_]

    def dataset_refs(self) -> list[str]:
        return [self.data]

    def resource_needs(self) -> dict[str, tuple[float, str]]:
        res = self.resources
        needs = {}
        for resource, per_worker in (("CPU", res.cpus_per_worker), ("GPU", res.gpus_per_worker)):
            total = res.workers * per_worker
            needs[resource] = (total, f"{res.workers} workers x {per_worker:g} {resource}s = {total:g} {resource}s")
        return needs

    @model_validator(mode="after")
    def _hardware(self) -> TrainStageConfig:
        if self.deepspeed.precision == "fp16" and not self.resources.use_gpu:
            raise ValueError(
                "deepspeed.precision: fp16 needs GPUs (resources.gpus_per_worker > 0); on CPU use bf16 or fp32"
            )
        if self.deepspeed.stage is None and self.deepspeed.precision != "fp32" and not self.resources.use_gpu:
            raise ValueError("deepspeed.precision: without DeepSpeed (stage: null) CPU training runs in fp32")
        return self


class CptStageConfig(TrainStageConfig):
    """Continued pretraining: causal-LM loss on packed token blocks."""

    kind: Literal["cpt"] = Field(description="cpt")


class SftStageConfig(TrainStageConfig):
    """Supervised fine-tuning with TRL's SFTTrainer on chats."""

    kind: Literal["sft"] = Field(description="sft")
    assistant_only_loss: bool = Field(True, description="Learn only the assistant turns (needs {% generation %} in the chat template).")
    packing: bool = Field(False, description="Pack several chats into one sequence (TRL's packing).")


# TRL's DPO loss types. DPOConfig takes any string, and DPOTrainer rejects an unknown one only at
# its first step, after the workers have started and loaded the model; this config checks it when
# it loads instead (without importing TRL, which loading a config must not). A test compares this
# list with the one TRL documents on `DPOConfig.loss_type`, so a TRL upgrade that adds one fails there.
DPO_LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
    "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)


class DpoStageConfig(TrainStageConfig):
    """Direct preference optimisation with TRL's DPOTrainer; the parent is the reference model."""

    kind: Literal["dpo"] = Field(description="dpo")
    beta: float = Field(0.1, gt=0, description="KL penalty strength (the paper uses 0.05).")
    loss_type: str | list[str] = Field(
        "sigmoid",
        description="TRL DPO loss type (sigmoid is the original DPO loss), or several combined by loss_weights: "
        "[sigmoid, sft] adds the chosen answers' negative log-likelihood (RPO, Pang et al. 2024).",
    )
    loss_weights: list[float] | None = Field(None, description="One weight per loss_type entry (default: 1 each).")

    @property
    def losses(self) -> list[str]:
        """`loss_type` as the list TRL's DPOConfig takes."""
        return [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)

    @model_validator(mode="after")
    def _known_losses_and_their_weights(self):
        losses = self.losses
        if not losses:
            raise ValueError("loss_type: give at least one TRL DPO loss type")
        unknown = [loss for loss in losses if loss not in DPO_LOSS_TYPES]
        if unknown:
            raise ValueError(f"loss_type: unknown TRL DPO loss type(s) {unknown}; known: {', '.join(DPO_LOSS_TYPES)}")
        if self.loss_weights is not None and len(self.loss_weights) != len(losses):
            raise ValueError(f"loss_weights has {len(self.loss_weights)} entries for {len(losses)} loss_type entries {losses}")
        return self


class OrpoStageConfig(TrainStageConfig):
    """Odds-ratio preference optimisation (TRL's experimental ORPOTrainer); no reference model."""

    kind: Literal["orpo"] = Field(description="orpo")
    beta: float = Field(0.1, gt=0, description="Weight of the odds-ratio term (lambda in the ORPO paper).")



TRAIN_STAGES = {"cpt": CptStageConfig, "sft": SftStageConfig, "dpo": DpoStageConfig, "orpo": OrpoStageConfig}
STAGE_DATA_FORMAT = {"cpt": "text", "sft": "chat", "dpo": "preference", "orpo": "preference"}


def _run(config, name: str) -> dict:
    from alloylm.train.launcher import train_stage

    return train_stage(config, name)


for _kind, _config in TRAIN_STAGES.items():
    register_stage_kind(
        StageKind(
            name=_kind,
            config=_config,
            run=_run,
            data_format=STAGE_DATA_FORMAT[_kind],
            command="train",
            description=(_config.__doc__ or "").split("\n")[0],
        )
    )
