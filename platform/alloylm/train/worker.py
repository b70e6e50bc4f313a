"""What every Ray Train worker runs for a training stage: load the parent, build the method's
trainer (cpt.py, sft.py, dpo.py, orpo.py), resume from Ray Train's newest whole checkpoint (one
with a truncated file is skipped, named in a warning), train, and (rank 0) save a plain Hugging
Face model folder to the stage's staging location.

Checkpoints are uploaded by AlloyLM (`ray.train.report`'s `checkpoint_upload_fn`), through
`storage.upload_dir`: on S3 an outage within the storage retry window is waited out, and a longer
one fails the worker with a StorageError naming the checkpoint, the URI and the endpoint; on a local
disk a full disk is named as such and the partial copy removed. The checkpoint is only registered
with Ray Train (and so only ever resumed from) once every file of it is stored.

Workers get everything through their config argument (`StageJob`), never through module globals.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from alloylm.timing import PhaseClock
from alloylm.tracking import MlflowTarget, resumable_run

log = logging.getLogger("alloylm.train")


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
    workdir_key: str = Field(
        "",
        description="Names this stage's local working folder the same in every attempt of its Ray Train run "
        "(restarts and reruns), so the trainer's output_dir, which MLflow keeps as a run parameter, is the "
        "same when a resumed stage continues its MLflow run; empty: a fresh temporary folder.",
    )
    storage_env: dict[str, str] = Field(
        default_factory=dict,
        description="The driver's storage settings (S3 endpoint, storage retry window; never credentials), set in the worker.",
    )
    unlisted_checkpoints: list[str] = Field(
        default_factory=list,
        description="Checkpoint folders of this stage's Ray Train run whose list was unreadable and set aside "
        "(`launcher.set_aside_unreadable_snapshot`), newest first: resumed from when Ray Train has none.",
    )


def _stage_config(job: StageJob):
    from alloylm.config import TRAIN_STAGES

    return TRAIN_STAGES[job.stage["kind"]].model_validate(job.stage)


def parent_dtype(stage):
    """The dtype a stage loads its parent model in: float32 for full fine-tuning, whatever the
    parent was saved in; None (the saved dtype) otherwise.

    transformers 5 loads a bf16 checkpoint (the Hub's Llama and Mistral, a stage trained under
    DeepSpeed bf16) as bf16, and nothing after it casts the weights back: `precision: fp32`, or
    plain DDP's bf16 autocast, then trained bf16 weights with bf16 optimizer states, where small
    updates round away. DeepSpeed's bf16 and fp16 cast the model themselves and keep fp32 master
    weights, and LoRA's base is frozen: those keep the saved dtype, and so the memory it saves.
    """
    import torch

    if stage.lora is not None or (stage.deepspeed.stage is not None and stage.deepspeed.precision != "fp32"):
        return None
    return torch.float32


def _load_parent(job: StageJob, tokenizer):
    from alloylm.models.loading import load_model
    from alloylm.models.presets import build_model

    if job.parent_kind == "preset":
        return build_model(job.parent, tokenizer, seed=job.parent_seed)
    model = load_model(job.parent, trust_remote_code=job.trust_remote_code, dtype=parent_dtype(_stage_config(job)))
    embeddings = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > embeddings:
        raise ValueError(
            f"tokenizer/model vocabulary mismatch: the run's tokenizer has {len(tokenizer)} tokens but the "
            f"parent model {job.parent} has {embeddings} embeddings"
        )
    return model


@contextlib.contextmanager
def _deepspeed_aware(arguments: dict[str, Any]):
    """While the model is loaded: the stage's DeepSpeed config made known to transformers (a
    TrainingArguments holds it), so that under ZeRO-3 `from_pretrained`/`from_config` partition the
    weights as they load (`deepspeed.zero.Init`)."""
    if not arguments.get("deepspeed"):
        yield
        return
    from transformers import TrainingArguments
    from transformers.integrations import is_deepspeed_zero3_enabled

    held = TrainingArguments(**arguments)  # noqa: F841 - transformers keeps only a weak reference to its config
    if is_deepspeed_zero3_enabled():
        import deepspeed
        import torch.distributed

        # zero.Init partitions over DeepSpeed's communicator. On GPUs the arguments above set it
        # up (accelerate's state); on CPU (gloo) nothing does until the Trainer is built: set up
        # now, on the process group Ray Train made (DeepSpeed takes it over, it makes no new one).
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())
    yield


def _partitioned(model) -> bool:
    """Whether every parameter of `model` is a ZeRO-3 partition (loaded inside zero.Init)."""
    return all(hasattr(parameter, "ds_id") for parameter in model.parameters())


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
        **({"lr_scheduler_kwargs": {"min_lr_rate": training.min_lr_rate}} if training.min_lr_rate is not None else {}),
        "warmup_steps": int(training.warmup_ratio * max_steps),
        "weight_decay": training.weight_decay,
        "per_device_train_batch_size": training.batch_size,
        "gradient_accumulation_steps": training.gradient_accumulation_steps,
        "max_grad_norm": training.max_grad_norm,
        # transformers' name since 5.24 (`gradient_checkpointing` is its deprecated alias, gone in v6);
        # the stage's config key stays `training.gradient_checkpointing`
        "activation_checkpointing": training.gradient_checkpointing,
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


def steps_after_build(stage, trainer, world_size: int, max_steps: int) -> int:
    """The stage's optimizer steps once its trainer is built. With `packing`, TRL's SFTTrainer packs
    several chats into each `max_length` row while it is built, so `epochs` counts passes over the
    packed rows: steps from the chats themselves would make `epochs: 1` several passes (and stretch
    the schedule). The trainer's `max_steps` and warm-up are set to match; otherwise unchanged."""
    if not getattr(stage, "packing", False) or stage.training.max_steps:
        return max_steps
    from alloylm.train.data import steps_for

    steps = steps_for(len(trainer.train_dataset), stage, world_size)
    trainer.args.max_steps = steps
    trainer.args.warmup_steps = int(stage.training.warmup_ratio * steps)
    return steps


def apply_lora(model, stage, seed: int):
    """The PEFT model of `stage.lora`, its adapters initialised from `seed` (their initialisation is
    random and comes before the Trainer seeds anything)."""
    from peft import LoraConfig, get_peft_model
    from transformers import set_seed

    set_seed(seed)

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


def _resume_dir(
    workdir: str, stage_name: str, announce: bool, max_steps: int, wanted=None, world_size: int | None = None,
    unlisted: list[str] | None = None,
) -> str | None:
    """The newest whole checkpoint Ray Train holds for this stage below step `max_steps`, its files
    `wanted` fetched locally (`copy_first_whole_checkpoint`), or None.

    Ray Train hands every worker its latest checkpoint; the ones it registered before it (as many
    as `checkpoint.keep` leaves) are the fall-backs when a file of the latest is cut short. When it
    holds none because its list of them was unreadable and set aside, the run's checkpoint folders
    (`unlisted`, newest first) are the candidates, checked whole file by file the same way.
    """
    import ray.train

    latest = ray.train.get_checkpoint()
    if latest is not None:
        # Nothing is in flight before this worker's first report, so this returns at once; the timeout
        # only guards against waiting on a report of a dead worker group (then the list is as it stands).
        reported = ray.train.get_all_reported_checkpoints(
            consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED, timeout_s=60
        )
        candidates = [latest, *(r.checkpoint for r in reversed(reported) if r.checkpoint.path != latest.path)]  # newest first
    elif unlisted:
        if announce:
            log.warning("stage %s: resuming from the checkpoint folders of the set-aside checkpoint list: %s", stage_name, ", ".join(unlisted))
        candidates = list(unlisted)
    else:
        return None
    chosen = copy_first_whole_checkpoint(
        candidates, workdir, stage_name, announce=announce, below_step=max_steps, wanted=wanted, world_size=world_size
    )
    _same_choice_on_every_rank(stage_name, chosen)
    return chosen


def _same_choice_on_every_rank(stage_name: str, chosen: str | None) -> None:
    """Raise StageError (the attempt fails, and Ray Train starts it again) unless every worker chose
    the same checkpoint: each chose alone, and ranks resumed from different steps would train on
    mismatched states (under DeepSpeed, hang in its first collective)."""
    import torch.distributed as dist

    from alloylm.errors import StageError

    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return
    choices: list = [None] * dist.get_world_size()
    dist.all_gather_object(choices, os.path.basename(chosen) if chosen else None)
    if len(set(choices)) > 1:
        each = ", ".join(f"rank {rank}: {choice or 'none'}" for rank, choice in enumerate(choices))
        raise StageError(
            f"stage {stage_name!r}: the workers chose different checkpoints to resume from ({each}); see each worker's log for why"
        )


def _checkpoint_uri(checkpoint) -> str:
    """Where a Ray Train checkpoint lives, as AlloyLM names storage (pyarrow drops `s3://`)."""
    from alloylm import storage

    return storage.arrow_uri(checkpoint.filesystem, checkpoint.path)


def upload_checkpoint(stage_name: str):
    """The `checkpoint_upload_fn` of `ray.train.report`: copy the checkpoint to Ray Train's storage
    through `storage.upload_dir`, and return it as the Ray Train checkpoint stored there."""

    def upload(checkpoint, checkpoint_dir_name: str):
        import ray.train

        from alloylm import storage

        train_storage = ray.train.get_context().get_storage()
        fs = train_storage.storage_filesystem
        path = train_storage.build_checkpoint_path_from_name(checkpoint_dir_name)
        uri = storage.arrow_uri(fs, path)
        try:
            storage.upload_dir(checkpoint.path, uri, action=f"upload checkpoint {checkpoint_dir_name} of stage {stage_name!r} to")
        except storage.StorageError:
            if not storage.is_remote(uri):  # e.g. a full disk: give back what the partial copy took
                shutil.rmtree(storage.resolve(uri), ignore_errors=True)
            raise
        return ray.train.Checkpoint(path=path, filesystem=fs)

    return upload


def _workdir(job: StageJob, rank: int) -> str:
    """This worker's local folder for the stage: named by `job.workdir_key` when it has one (what a
    killed attempt left there is removed first), else a fresh temporary one."""
    if not job.workdir_key:
        return tempfile.mkdtemp(prefix=f"alloylm-{job.stage_name}-rank{rank}-")
    path = os.path.join(tempfile.gettempdir(), f"alloylm-{job.stage_name}-{job.workdir_key}-rank{rank}")
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path, mode=0o700)
    return path


# In a checkpoint beside the Trainer's files: the MLflow run its metrics went to, which a resume continues.
TRACKING_NAME = "alloylm_tracking.json"


def _tracked_run(checkpoint_dir: str) -> str | None:
    """The MLflow run id a checkpoint recorded (`report_callback`), or None."""
    try:
        with open(os.path.join(checkpoint_dir, TRACKING_NAME), encoding="utf-8") as f:
            return json.load(f).get("mlflow_run_id")
    except (OSError, ValueError, AttributeError):
        return None


def report_callback(stage_name: str, tracked: bool = False):
    """Ray Train's Hugging Face report callback, uploading checkpoints with `upload_checkpoint`.

    `tracked`: rank 0 logs to MLflow, and each checkpoint records that MLflow run's id, so a resume
    from it continues the same run (transformers' MLflowCallback resumes the run `MLFLOW_RUN_ID` names)."""
    import ray.train
    import transformers
    from ray.train.huggingface.transformers import RayTrainReportCallback

    class ReportCallback(RayTrainReportCallback):
        def on_save(self, args, state, control, **kwargs):
            # Beside the Trainer's output folder, so that the move below is a rename on one file system.
            with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(args.output_dir))) as tmpdir:
                metrics: dict[str, Any] = {}
                for entry in state.log_history:
                    metrics.update(entry)
                source = transformers.trainer.get_last_checkpoint(args.output_dir)
                checkpoint = None
                if source is not None:
                    # Moved, where Ray's own callback copies: once uploaded, Ray Train's storage holds
                    # the checkpoint (keeping `checkpoint.keep` of them) and a resume reads it from
                    # there. A copy left the local one for the Trainer's rotation, which only the world
                    # process zero runs: every other rank kept each checkpoint's ZeRO shards on its
                    # node's disk until the stage ended (for an 8B model under ZeRO-3, GBs per rank
                    # per checkpoint), and the copy itself doubled the disk and time a save takes.
                    shutil.move(source, os.path.join(tmpdir, self.CHECKPOINT_NAME))
                    if tracked and state.is_world_process_zero:
                        import mlflow

                        run = mlflow.active_run()
                        if run is not None:
                            with open(os.path.join(tmpdir, self.CHECKPOINT_NAME, TRACKING_NAME), "w", encoding="utf-8") as f:
                                json.dump({"mlflow_run_id": run.info.run_id}, f)
                    checkpoint = ray.train.Checkpoint.from_directory(tmpdir)
                ray.train.report(metrics=metrics, checkpoint=checkpoint, checkpoint_upload_fn=upload_checkpoint(stage_name))

    return ReportCallback()


def checkpoint_problem(uri: str, world_size: int | None = None) -> str | None:
    """None when every file a resume reads from the HF Trainer checkpoint folder `uri` (local or
    s3://) is whole, else a sentence naming the first one that is not.

    Checked where the checkpoint is stored, reading only the ends of its files (every rank checks
    every rank's files, so all ranks pick the same checkpoint, then fetches its own):
    `trainer_state.json` parses, each safetensors file is as long as its header says, a sharded
    model's index lists no missing shard, DeepSpeed's ZeRO shards are there for every rank (of
    `world_size` workers, when given), and each PyTorch file (optimizer, scheduler, RNG states, ZeRO
    shards) ends with its zip directory, which a truncated file has lost.

    Every read is retried within the storage retry window and a storage that stays unreachable
    raises StorageError: a read that failed is never taken for a file cut short (a rank whose read
    was throttled would otherwise resume from an older checkpoint than the others).
    """
    import posixpath
    import zipfile

    from alloylm import storage

    state = storage.join(uri, "trainer_state.json")
    try:
        text = storage.read_text(state)
    except storage.StorageNotFoundError as err:
        return f"{state} is missing or unreadable ({type(err).__name__}: {err})"
    try:
        int(json.loads(text)["global_step"])
    except (ValueError, KeyError, TypeError) as err:
        return f"{state} is missing or unreadable ({type(err).__name__}: {err})"
    fs, root = storage.fsspec_filesystem(uri)
    files = sorted(
        (posixpath.relpath(path, root) if storage.is_remote(uri) else os.path.relpath(path, root).replace(os.sep, "/"), path, info)
        for path, info in storage.retrying("list", uri, lambda: fs.find(root, detail=True)).items()
        if not path.endswith("/")
    )
    present = {rel for rel, _, _ in files}
    missing_shard = _missing_zero_shard(present, world_size)
    if missing_shard:
        return f"{storage.join(uri, missing_shard)} is missing: a checkpoint of this stage has one per worker"
    for rel, path, info in files:
        name, shown = posixpath.basename(rel), storage.join(uri, rel)
        stored = io.BufferedReader(_StoredFile(fs, path, shown, int(info["size"])), buffer_size=1 << 16)
        try:
            if name.endswith(".safetensors.index.json"):
                shards = sorted(set(json.load(stored)["weight_map"].values()))
                folder = posixpath.dirname(rel)
                missing = [s for s in shards if posixpath.join(folder, s) not in present]
                if missing:
                    return f"{storage.join(uri, posixpath.join(folder, missing[0]))} is missing: {name} lists it as a shard"
            elif name.endswith(".safetensors"):
                problem = _safetensors_length_problem(stored, int(info["size"]))
                if problem:
                    return f"{shown} is truncated or corrupt ({problem})"
            elif name.endswith((".pt", ".pth", ".bin")):
                with zipfile.ZipFile(stored):  # reads the zip directory at the end, never the whole file
                    pass
        except storage.StorageError:
            raise
        except zipfile.BadZipFile as err:
            return f"{shown} is truncated or corrupt (not a whole PyTorch archive: {err})"
        except (OSError, ValueError, KeyError, TypeError, AttributeError, EOFError) as err:
            return f"{shown} is truncated or corrupt ({type(err).__name__}: {err})"
    return None


class _StoredFile(io.RawIOBase):
    """A stored file (local or S3) read by ranges, each read retried within the storage retry
    window (`storage.retrying`, StorageError past it), for the checks of `checkpoint_problem`."""

    def __init__(self, fs, path: str, uri: str, size: int):
        super().__init__()
        self._fs, self._path, self._uri, self._size, self._pos = fs, path, uri, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer) -> int:
        from alloylm import storage

        start, end = self._pos, min(self._pos + len(buffer), self._size)
        if start >= end:
            return 0
        data = storage.retrying("read", self._uri, lambda: self._fs.cat_file(self._path, start=start, end=end))
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)


# safetensors refuses a header larger than this (its MAX_HEADER_SIZE): a corrupt length above it is
# named without reading that much.
_SAFETENSORS_MAX_HEADER = 100_000_000


def _safetensors_length_problem(stored, size: int) -> str | None:
    """What is wrong with the stored safetensors file's length, reading its header only. By hand
    because safetensors reads local files only (`safe_open` needs a path), and this must not
    download the file: its 8-byte header length, then the JSON header, whose largest data offset
    ends the file."""
    head = stored.read(8)
    if len(head) < 8:
        return f"{size} bytes, shorter than a header"
    length = int.from_bytes(head, "little")
    if length > min(size - 8, _SAFETENSORS_MAX_HEADER):
        return f"its header claims {length} bytes, the file has {size}"
    header = json.loads(stored.read(length))
    end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    if 8 + length + end != size:
        return f"{size} bytes where its header says {8 + length + end}"
    return None


_ZERO_SHARD = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_")


def _missing_zero_shard(files: set[str], world_size: int | None) -> str | None:
    """The first ZeRO shard (`zero_pp_rank_<r>_...`, relative path) missing from a checkpoint's
    `files`: each kind of shard is written once per rank, 0 to `world_size` - 1 (or to the highest
    rank present). Otherwise every rank would pass a checkpoint whose other ranks' shards are gone
    (each fetches only its own), and the rank whose shard is missing fail inside DeepSpeed's load on
    every attempt, the checkpoint before it never tried."""
    kinds: dict[tuple[str, str, str], set[int]] = {}
    for rel in files:
        folder, _, name = rel.rpartition("/")
        shard = _ZERO_SHARD.match(name)
        if shard is not None:
            kinds.setdefault((folder, name[: shard.start(1)], name[shard.end(1) :]), set()).add(int(shard.group(1)))
    for (folder, before, after), ranks in sorted(kinds.items()):
        for rank in range(max(world_size or 0, max(ranks) + 1)):
            if rank not in ranks:
                return f"{folder}/{before}{rank}{after}" if folder else f"{before}{rank}{after}"
    return None


def checkpoint_files_for(rank: int | None, deepspeed: bool):
    """Which files of a checkpoint worker `rank` reads to resume (None: all): under DeepSpeed, its
    own ZeRO shards (not the other ranks', unless elastic checkpoints, which AlloyLM does not set)
    and no safetensors weights (DeepSpeed resumes the engine's states; the Trainer loads no
    model file then). For an 8B model under ZeRO-3 every rank fetched every rank's optimizer
    states: about 100 GB per rank at each resume."""

    def wanted(rel: str) -> bool:
        if rank is None:
            return True
        name = rel.rsplit("/", 1)[-1]
        shard = _ZERO_SHARD.match(name)
        if shard is not None:
            return int(shard.group(1)) == rank
        return not (deepspeed and (name.endswith(".safetensors") or name.endswith(".safetensors.index.json")))

    return wanted


def _link_files(source: str, target: str, wanted=None) -> None:
    """`target` as a folder of symbolic links to the files of the local (or shared) checkpoint
    folder `source` that `wanted` keeps. The Trainer only reads them, before its first save (and
    Ray Train deletes an old checkpoint only once a newer one is reported): a copy per rank was a
    whole checkpoint per rank on the node's disk. Removing the workdir unlinks the links only."""
    source = os.path.abspath(source)
    for folder, _, names in os.walk(source):
        rel = os.path.relpath(folder, source)
        os.makedirs(os.path.normpath(os.path.join(target, rel)), exist_ok=True)
        for name in names:
            relative = name if rel == "." else f"{rel.replace(os.sep, '/')}/{name}"
            if wanted is None or wanted(relative):
                os.symlink(os.path.join(folder, name), os.path.join(target, rel, name))


def copy_first_whole_checkpoint(
    candidates: list, workdir: str, stage_name: str, *, announce: bool = True, below_step: int | None = None, wanted=None,
    world_size: int | None = None,
) -> str | None:
    """Take the first of Ray Train's `candidates` (newest first) whose files are whole
    (`checkpoint_problem`) and whose step is below `below_step` (the stage's max_steps) into
    `workdir` as `checkpoint-<step>`, and return that folder; None when every whole one is at or
    past it. Only the files `wanted` keeps (`checkpoint_files_for`) are taken: downloaded from S3,
    linked from a local (or shared) folder.

    A skipped checkpoint is logged with the file that is not whole; every rank checks the same files,
    so all ranks pick the same checkpoint. Raises StageError naming each bad file when none is whole.
    A checkpoint at the last step (the stage died after it, while saving the model) is passed over:
    the Trainer resumed from it takes one step more than `max_steps` (it checks the count only after
    a step: always for CPT's stream, whose one epoch is max_steps; for a data set with a length when
    max_steps is not a whole number of epochs). From the one before it, it trains the last steps
    again with the same schedule and data, or from the start (`checkpoint.keep: 1`). `world_size`:
    the workers resuming, each of which needs its ZeRO shards.
    """
    from alloylm import storage
    from alloylm.errors import StageError

    problems: list[str] = []
    at_the_end = False
    # Ray Train checkpoints, or checkpoint folders' URIs (`_resume_dir`'s unlisted folders)
    uris = [c if isinstance(c, str) else _checkpoint_uri(c) for c in candidates]
    for uri in uris:
        source = storage.join(uri, "checkpoint")
        problem = checkpoint_problem(source, world_size)
        if problem is None:
            step = json.loads(storage.read_text(storage.join(source, "trainer_state.json")))["global_step"]
            if below_step is not None and step >= below_step:
                at_the_end = True
                if announce:
                    log.warning(
                        "stage %s: checkpoint %s is at the stage's last step (%d); resuming from the one before it",
                        stage_name, source, step,
                    )
                continue
            # Keep transformers' name (checkpoint-<step>): it reads the step from it.
            target = os.path.join(workdir, f"checkpoint-{step}")
            os.makedirs(workdir, exist_ok=True)
            if storage.is_remote(source):
                partial = target + ".downloading"
                storage.download_dir(source, partial, wanted=wanted)
                os.rename(partial, target)
            else:
                _link_files(storage.resolve(source), target, wanted)
            return target
        problems.append(problem)
        if announce:
            log.warning("stage %s: cannot resume from checkpoint %s: %s; trying the checkpoint before it", stage_name, source, problem)
    if at_the_end:
        if announce:
            log.warning("stage %s: no whole checkpoint before its last step; training it from the start", stage_name)
        return None
    experiment = os.path.dirname(uris[0].rstrip("/"))
    raise StageError(
        f"stage {stage_name!r} cannot resume: no checkpoint of it is whole ({'; '.join(problems)}); "
        f"restore the file, or delete {experiment} to train the stage from the start"
    )


SUMMARY_NAME = "train_summary.json"


def _save_output(trainer, stage, tokenizer, workdir: str, job: StageJob, metrics_path: str, summary: dict) -> None:
    """Every rank takes part (ZeRO-3 gathers weights); rank 0 writes the plain model and uploads it."""
    from alloylm import storage

    model_dir = os.path.join(workdir, "model")
    trainer.save_model(model_dir)  # collective under ZeRO-3
    if not trainer.is_world_process_zero():
        return
    if stage.lora is not None:
        from peft import PeftModel

        shutil.move(model_dir, os.path.join(workdir, "adapter"))
        # The base is built again the way the stage got it, not from the adapter's
        # `base_model_name_or_path`: a preset parent has none (PEFT then fails after training).
        # Outside ZeRO-3's zero.Init, which the finished trainer leaves on: it would partition
        # the base (empty weights with one worker; with more, a broadcast only rank 0 makes hangs).
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        base = _load_parent(job, tokenizer)
        merged = PeftModel.from_pretrained(base, os.path.join(workdir, "adapter")).merge_and_unload()
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
    # Retried within the storage retry window on S3; a full local disk is named as such.
    storage.upload_dir(model_dir, job.output_uri, action=f"upload the trained model of stage {job.stage_name!r} to")


def train_loop_per_worker(payload: dict[str, Any]) -> dict[str, Any]:
    """Ray Train's train loop for every stage kind. Returns (as Ray Train's `Result.return_value`,
    rank 0's is the one the driver gets) when this worker started, wall clock, and the seconds it
    spent in each phase, for the manifest's breakdown (`launcher.stage_breakdown`)."""
    started_at, clock = time.time(), PhaseClock()
    import ray.train
    from ray.train.huggingface.transformers import prepare_trainer
    from transformers.integrations import TensorBoardCallback

    from alloylm.models.loading import load_tokenizer
    from alloylm.train import STAGE_TRAINERS
    from alloylm.train.callbacks import MetricsLogCallback
    from alloylm.train.deepspeed import deepspeed_record
    from alloylm.warm import use_package_ninja

    job = StageJob.model_validate(payload)
    os.environ.update(job.storage_env)  # this worker process runs this one stage
    use_package_ninja()  # DeepSpeed's CPU op: the ninja `make setup` built it with (alloylm.warm)
    if job.mlflow is not None:
        from alloylm.tracking import require_mlflow

        require_mlflow()
        os.environ.update(job.mlflow.environment())  # this worker process runs this one stage
    stage = _stage_config(job)
    method = STAGE_TRAINERS[stage.kind]
    context = ray.train.get_context()
    clock.lap("imports")
    tokenizer = load_tokenizer(job.tokenizer_uri, trust_remote_code=job.trust_remote_code)
    workdir = _workdir(job, context.get_world_rank())
    try:
        max_steps = method.max_steps(stage, job, context.get_world_size())
        arguments = common_arguments(job, stage, workdir, max_steps)
        # The TrainingArguments first: under ZeRO-3 they make transformers build and load the
        # model inside deepspeed.zero.Init, each rank holding only its partition. Loaded before
        # them, every rank held the whole model first (8 x 16 GB of host memory on a node for 8B).
        with _deepspeed_aware(arguments):
            model = _load_parent(job, tokenizer)
        partitioned = _partitioned(model)  # what happened, not what the config asked for
        if stage.lora is not None:
            model = apply_lora(model, stage, stage.training.seed if stage.training.seed is not None else job.seed)
        trainer = method.build_trainer(stage, job, model, tokenizer, arguments)
        max_steps = steps_after_build(stage, trainer, context.get_world_size(), max_steps)
        metrics_path = os.path.join(workdir, "metrics.jsonl")
        metrics_log = MetricsLogCallback(metrics_path, job.stage_name, max_steps)
        trainer.add_callback(metrics_log)
        trainer.add_callback(report_callback(job.stage_name, tracked=job.mlflow is not None))
        trainer = prepare_trainer(trainer)
        resume = _resume_dir(
            workdir, job.stage_name, announce=context.get_world_rank() == 0, max_steps=max_steps,
            wanted=checkpoint_files_for(context.get_world_rank(), deepspeed=trainer.is_deepspeed_enabled),
            world_size=context.get_world_size(), unlisted=job.unlisted_checkpoints,
        )
        if resume and context.get_world_rank() == 0:
            print(f"[{job.stage_name}] resuming from checkpoint {os.path.basename(resume)}", flush=True)
            metrics_log.restore(resume)  # the steps before it, which the checkpoint's state keeps
            # TensorBoard's events were in the killed attempt's local folder: the steps before the
            # checkpoint are logged again through transformers' own TensorBoard callback.
            metrics_log.replay_to = [c for c in trainer.callback_handler.callbacks if isinstance(c, TensorBoardCallback)]
            run_id = _tracked_run(resume) if job.mlflow is not None else None
            if run_id and resumable_run(job.mlflow, run_id):
                os.environ["MLFLOW_RUN_ID"] = run_id  # MLflow already holds the steps before the checkpoint
            elif run_id:
                log.warning("stage %s: the MLflow run %s of checkpoint %s is not in %s, experiment %s: logging to a new run",
                            job.stage_name, run_id, os.path.basename(resume), job.mlflow.tracking_uri, job.mlflow.experiment)
        clock.lap("load")
        result = trainer.train(resume_from_checkpoint=resume)
        # The Trainer builds its engine (DeepSpeed, accelerate's DDP wrapper, optimizer, data
        # loader) inside train(), before the first callback: that part is engine_init.
        clock.split("engine_init", "training", at=metrics_log.began_at)
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
            "deepspeed": {**deepspeed_record(trainer), "loaded_partitioned": partitioned},
        }
        _save_output(trainer, stage, tokenizer, workdir, job, metrics_path, summary)
        ray.train.report({"final": True, **summary})
        clock.lap("save")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {"started_at": started_at, "seconds": clock.seconds}
