"""What every Ray Train worker runs for a training stage: load the parent, build the method's
trainer (cpt.py, sft.py, dpo.py, orpo.py), resume from Ray Train's checkpoint, train, and (rank 0)
save a plain Hugging Face model folder to the stage's staging location.

Workers get everything through their config argument (`StageJob`), never through module globals.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from alloylm.tracking import MlflowTarget


class StageJob(BaseModel):
    """The config argument of the train loop: one stage, with every URI resolved by the driver."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    stage_name: str
    stage: dict[str, Any] = Field(description="The stage's config, as in the run config.")
    seed: int
    trust_remote_code: bool
    tokenizer_uri: str
    data_uri: str
    parent_kind: Literal["preset", "model"]
    parent: str = Field(description="Preset name or model URI.")
    parent_seed: int = 0
    output_uri: str = Field(description="Where rank 0 writes the finished model (the artifact's staging location).")
    data_rows: int = Field(description="Rows in the prepared data set (packed blocks for CPT).")
    mlflow: MlflowTarget | None = Field(None, description="Where rank 0 logs the metrics to MLflow; None: not at all.")


def _stage_config(job: StageJob):
    from alloylm.config import TRAIN_STAGES

    return TRAIN_STAGES[job.stage["kind"]].model_validate(job.stage)


def _load_parent(job: StageJob, tokenizer):
    from alloylm.models.loading import load_model
    from alloylm.models.presets import build_model

    if job.parent_kind == "preset":
        return build_model(job.parent, tokenizer, seed=job.parent_seed)
    model = load_model(job.parent, trust_remote_code=job.trust_remote_code)
    embeddings = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > embeddings:
        raise ValueError(
            f"tokenizer/model vocabulary mismatch: the run's tokenizer has {len(tokenizer)} tokens but the "
            f"parent model {job.parent} has {embeddings} embeddings"
        )
    return model


def common_arguments(job: StageJob, stage, workdir: str, max_steps: int) -> dict[str, Any]:
    """TrainingArguments shared by every method; each method adds its own."""
    from alloylm.train.deepspeed import deepspeed_config

    training, on_gpu = stage.training, stage.resources.use_gpu
    every = stage.checkpoint.every_steps
    return {
        "output_dir": os.path.join(workdir, "trainer"),
        "max_steps": max_steps,
        "learning_rate": training.learning_rate,
        "lr_scheduler_type": training.lr_scheduler,
        "warmup_steps": int(training.warmup_ratio * max_steps),
        "weight_decay": training.weight_decay,
        "per_device_train_batch_size": training.batch_size,
        "gradient_accumulation_steps": training.gradient_accumulation_steps,
        "max_grad_norm": training.max_grad_norm,
        "gradient_checkpointing": training.gradient_checkpointing,
        "logging_steps": training.logging_steps,
        "logging_first_step": True,
        "save_strategy": "steps" if every else "no",
        "save_steps": every or 500,
        "save_total_limit": stage.checkpoint.keep,
        "seed": training.seed if training.seed is not None else job.seed,
        "data_seed": training.seed if training.seed is not None else job.seed,
        "use_cpu": not on_gpu,
        "bf16": stage.deepspeed.precision == "bf16",
        "fp16": stage.deepspeed.precision == "fp16",
        "deepspeed": deepspeed_config(stage.deepspeed, on_gpu=on_gpu),
        "ddp_backend": None if on_gpu else "gloo",
        # transformers' MLflowCallback logs on the world process zero only, from the MLFLOW_* variables.
        "report_to": ["tensorboard", "mlflow"] if job.mlflow is not None else ["tensorboard"],
        **({"run_name": job.mlflow.run_name} if job.mlflow is not None else {}),
        "include_num_input_tokens_seen": "non_padding",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "remove_unused_columns": False,
    }


def _apply_lora(model, stage):
    from peft import LoraConfig, get_peft_model

    lora = stage.lora
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def _worker_nodes() -> list[str]:
    """The Ray node ids the workers ran on (gathered over the process group), for the manifest."""
    import ray
    import torch.distributed as dist

    node = ray.get_runtime_context().get_node_id()
    if not dist.is_available() or not dist.is_initialized():
        return [node]
    nodes: list = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, node)
    return sorted(set(nodes))


def _read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _resume_dir(workdir: str) -> str | None:
    """Ray Train's latest checkpoint (a HF Trainer checkpoint folder), copied locally, or None."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        source = os.path.join(folder, "checkpoint")
        # Keep transformers' name (checkpoint-<step>): it reads the step from it.
        with open(os.path.join(source, "trainer_state.json"), encoding="utf-8") as f:
            step = json.load(f)["global_step"]
        target = os.path.join(workdir, f"checkpoint-{step}")
        shutil.copytree(source, target)
    return target


SUMMARY_NAME = "train_summary.json"


def _save_output(trainer, stage, tokenizer, workdir: str, job: StageJob, metrics_path: str, summary: dict) -> None:
    """Every rank takes part (ZeRO-3 gathers weights); rank 0 writes the plain model and uploads it."""
    from alloylm import storage

    model_dir = os.path.join(workdir, "model")
    trainer.save_model(model_dir)  # collective under ZeRO-3
    if not trainer.is_world_process_zero():
        return
    if stage.lora is not None:
        from peft import AutoPeftModelForCausalLM

        shutil.move(model_dir, os.path.join(workdir, "adapter"))
        merged = AutoPeftModelForCausalLM.from_pretrained(os.path.join(workdir, "adapter")).merge_and_unload()
        merged.save_pretrained(model_dir)
        shutil.copytree(os.path.join(workdir, "adapter"), os.path.join(model_dir, "adapter"))
    tokenizer.save_pretrained(model_dir)
    for leftover in ("training_args.bin",):
        if os.path.exists(os.path.join(model_dir, leftover)):
            os.remove(os.path.join(model_dir, leftover))
    if os.path.exists(metrics_path):
        shutil.copy(metrics_path, os.path.join(model_dir, "metrics.jsonl"))
    with open(os.path.join(model_dir, SUMMARY_NAME), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    runs = os.path.join(workdir, "trainer", "runs")
    if os.path.isdir(runs):
        shutil.copytree(runs, os.path.join(model_dir, "tensorboard"))
    if storage.is_remote(job.output_uri):
        storage.upload_dir(model_dir, job.output_uri)
    else:
        shutil.copytree(model_dir, storage.resolve(job.output_uri), dirs_exist_ok=True)


def train_loop_per_worker(payload: dict[str, Any]) -> None:
    """Ray Train's train loop for every stage kind."""
    import ray.train
    from ray.train.huggingface.transformers import RayTrainReportCallback, prepare_trainer

    from alloylm.models.loading import load_tokenizer
    from alloylm.train import STAGE_TRAINERS
    from alloylm.train.callbacks import MetricsLogCallback
    from alloylm.train.deepspeed import deepspeed_record

    job = StageJob.model_validate(payload)
    if job.mlflow is not None:
        from alloylm.tracking import require_mlflow

        require_mlflow()
        os.environ.update(job.mlflow.environment())  # this worker process runs this one stage
    stage = _stage_config(job)
    method = STAGE_TRAINERS[stage.kind]
    context = ray.train.get_context()
    tokenizer = load_tokenizer(job.tokenizer_uri, trust_remote_code=job.trust_remote_code)
    model = _load_parent(job, tokenizer)
    if stage.lora is not None:
        model = _apply_lora(model, stage)
    workdir = tempfile.mkdtemp(prefix=f"alloylm-{job.stage_name}-rank{context.get_world_rank()}-")
    try:
        max_steps = method.max_steps(stage, job, context.get_world_size())
        arguments = common_arguments(job, stage, workdir, max_steps)
        trainer = method.build_trainer(stage, job, model, tokenizer, arguments)
        metrics_path = os.path.join(workdir, "metrics.jsonl")
        trainer.add_callback(MetricsLogCallback(metrics_path, job.stage_name, max_steps))
        trainer.add_callback(RayTrainReportCallback())
        trainer = prepare_trainer(trainer)
        resume = _resume_dir(workdir)
        if resume and context.get_world_rank() == 0:
            print(f"[{job.stage_name}] resuming from checkpoint {os.path.basename(resume)}", flush=True)
        result = trainer.train(resume_from_checkpoint=resume)
        summary = {
            "nodes": _worker_nodes(),
            "global_step": trainer.state.global_step,
            "max_steps": max_steps,
            "train_loss": result.training_loss,
            "tokens_seen": trainer.state.num_input_tokens_seen,
            "resumed_from_step": int(resume.rsplit("-", 1)[-1]) if resume and resume.rsplit("-", 1)[-1].isdigit() else None,
            "world_size": context.get_world_size(),
            "first_loss": next((r["loss"] for r in _read_jsonl(metrics_path) if "loss" in r), None),
            "last_loss": next((r["loss"] for r in reversed(_read_jsonl(metrics_path)) if "loss" in r), None),
            "deepspeed": deepspeed_record(trainer),
        }
        _save_output(trainer, stage, tokenizer, workdir, job, metrics_path, summary)
        ray.train.report({"final": True, **summary})
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
