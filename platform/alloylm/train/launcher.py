"""The one launcher of every training stage: checks, then Ray Train's TorchTrainer, then the artifact.

`train_stage(config, name)` resolves the parent and the prepared data, refuses what cannot work
before any training (missing parent artifact, data of the wrong shape, resources the cluster
does not have), skips a stage whose fingerprint is unchanged, and otherwise trains on Ray Train
with checkpoints under `<run>/checkpoints/<stage>-<fingerprint>/`, so an interrupted stage resumes
from its last checkpoint when it is run again. The model is written to `<run>/stages/<name>/`
with `metrics.jsonl`, TensorBoard events, the resolved config and a manifest written last.

Storage outages: Ray Train's checkpoint storage is `storage.train_filesystem` and the workers get
the driver's S3 endpoint and retry window (`StageJob.storage_env`), so an S3 outage shorter than
`ALLOYLM_STORAGE_RETRY_S` is waited out wherever it hits (a worker's checkpoint upload, the
controller's checkpoint list); a longer one, or a full local disk, fails the stage with a
StorageError naming the operation and the endpoint, and no manifest is written.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import time
from typing import Any

from alloylm import storage
from alloylm.config import PresetInit, RunConfig, TrainStageConfig
from alloylm import artifact as lifecycle
from alloylm.artifact import fingerprint
from alloylm.errors import StageError
from alloylm.storage import CorruptFileError, StorageError, StorageNotFoundError
from alloylm.layout import RunLayout

log = logging.getLogger("alloylm.train")

REQUIRED_COLUMNS = {"cpt": ["input_ids"], "sft": ["messages"], "dpo": ["prompt", "chosen", "rejected"], "orpo": ["prompt", "chosen", "rejected"]}


def stage_uri(config: RunConfig, name: str) -> str:
    return RunLayout.of(config).stage(name)


def _parent(config: RunConfig, stage: TrainStageConfig) -> tuple[str, str, Any]:
    """(kind, preset name or model URI, what identifies it for the fingerprint)."""
    if isinstance(stage.from_, PresetInit):
        seed = stage.from_.seed if stage.from_.seed is not None else config.seed
        return "preset", stage.from_.init, {"init": stage.from_.init, "seed": seed}
    if stage.from_ in config.stages:
        uri = stage_uri(config, stage.from_)
        manifest = storage.read_manifest(uri)
        if manifest is None:
            raise StageError(
                f"parent stage {stage.from_!r} has no finished artifact at {uri}; run it first "
                f"(alloylm train CONFIG {stage.from_}, or alloylm run CONFIG)"
            )
        return "model", uri, manifest["fingerprint"]
    from alloylm.models.loading import model_source_id

    return "model", stage.from_, model_source_id(stage.from_)


def stage_fingerprint(config: RunConfig, name: str, parent_id: Any, data_fp: str, tokenizer_fp: str, padded_tail: bool = False) -> str:
    stage = config.stages[name]
    # Resources and checkpoint cadence change how a stage runs, not what it learns; except the number
    # of workers, which multiplies the global batch (batch_size x workers x accumulation) and so
    # changes the steps, the schedule and the data each step sees.
    learned = stage.model_dump(mode="json", by_alias=True, exclude={"resources", "checkpoint", "description"})
    learned["workers"] = stage.resources.workers
    learned["training"].pop("logging_steps", None)  # how often the loss is logged, not what is learned
    if stage.kind == "cpt" and padded_tail:
        # CPT has masked a padded tail out of the loss since it reads `attention_mask`; a stage
        # trained before that on data with padding learned it as text: not up to date.
        learned["padded_tail"] = "masked"
    return fingerprint("stage", learned, parent_id, data_fp, tokenizer_fp, config.seed)


def _check_parent_and_tokenizer(config: RunConfig, name: str, parent_kind: str, parent: str) -> None:
    """Before anything of the stage is written: the run's tokenizer loads, the parent's weights are
    whole (a truncated file is named here, not after Ray retried every worker on it), and the
    tokenizer fits the parent's embeddings (its data was tokenized with it)."""
    from transformers import AutoConfig

    from alloylm.models.loading import check_safetensors, load_tokenizer, materialize_model_dir, release_cached

    tokenizer_uri = RunLayout.of(config).tokenizer
    try:
        tokenizer = load_tokenizer(tokenizer_uri, trust_remote_code=config.trust_remote_code)
    except CorruptFileError as exc:
        raise StageError(f"stage {name!r}: the run's tokenizer: {exc}; delete {tokenizer_uri} to rebuild it") from None
    tokens = len(tokenizer)
    if getattr(config.stages[name], "assistant_only_loss", False):
        _check_assistant_masks(name, tokenizer)
    if parent_kind != "model":
        return
    parent_stage = config.stages[name].from_
    local = None
    try:
        local = materialize_model_dir(parent)
        model_config = AutoConfig.from_pretrained(local, trust_remote_code=config.trust_remote_code)
        if os.path.isdir(local):  # not a Hub id: transformers checks the files it downloads itself
            check_safetensors(local, shown_as=parent)
    except CorruptFileError as exc:
        fix = (
            f"retrain stage {parent_stage!r} (delete {parent} first: its manifest says it is complete) or restore the file"
            if parent_stage in config.stages
            else "restore the file or save the model again"
        )
        raise StageError(f"stage {name!r}: its parent {parent_stage!r}: {exc}; {fix}") from None
    except (OSError, ValueError) as exc:
        raise StageError(f"cannot read the parent model {parent}: {exc}") from None
    finally:
        if local is not None:
            release_cached(local)  # checked: the driver does not read it again
    embeddings = getattr(model_config, "vocab_size", None) or getattr(model_config.get_text_config(), "vocab_size", None)
    if embeddings is not None and tokens > embeddings:
        raise StageError(
            f"tokenizer/model vocabulary mismatch: the run's tokenizer has {tokens} tokens but the parent model "
            f"{parent} has {embeddings} embeddings; use the parent's tokenizer (tokenizer.from) or a matching model"
        )


def check_chat_templates(config: RunConfig, names: list[str]) -> None:
    """Before any data set is prepared (the run's tokenizer step): every SFT stage among `names`
    that learns only the assistant's turns can mark them with the run's tokenizer."""
    from alloylm.models.loading import load_tokenizer

    sft = [name for name in names if getattr(config.stages[name], "assistant_only_loss", False)]
    if sft:
        tokenizer = load_tokenizer(RunLayout.of(config).tokenizer, trust_remote_code=config.trust_remote_code)
        for name in sft:
            _check_assistant_masks(name, tokenizer)


def _check_assistant_masks(name: str, tokenizer) -> None:
    """SFT's `assistant_only_loss` needs a chat template that marks the assistant's tokens
    (`{% generation %}`); TRL's SFTTrainer swaps in a marked copy of the templates it knows and
    raises for any other, but in every worker, after the model has loaded. Asked here, of TRL's
    own functions, before the stage starts. TRL (seconds to import) only for a template without
    the closing marker: most Hub templates, never the one AlloyLM trains."""
    template = tokenizer.chat_template
    if isinstance(template, dict):  # named templates: chats are rendered with the default one
        template = template.get("default")
    if template and "endgeneration" in template:
        return
    if template:
        from trl.chat_template_utils import get_training_chat_template, has_generation_markers

        if has_generation_markers(template):
            return
        try:
            get_training_chat_template(tokenizer)
            return
        except (ValueError, KeyError):
            pass
    raise StageError(
        f"stage {name!r}: stages.{name}.assistant_only_loss is true, but the run's tokenizer has "
        + ("a chat template that marks no assistant tokens ({% generation %}) and that TRL cannot mark" if template else "no chat template")
        + f"; set stages.{name}.assistant_only_loss: false to learn from the whole conversation, or use a tokenizer "
        "whose chat template wraps the assistant's turns in {% generation %} ... {% endgeneration %}"
    )


def _check_data(stage: TrainStageConfig, name: str, data_uri: str, rows: int) -> None:
    from alloylm.train.data import check_prepared_columns

    try:
        check_prepared_columns(data_uri, REQUIRED_COLUMNS[stage.kind])
    except ValueError as exc:
        raise StageError(f"data for a {stage.kind} stage: {exc}") from None
    workers, batch = stage.resources.workers, stage.training.batch_size
    if stage.kind == "cpt" and rows // workers < batch:
        # Ray Data gives each worker rows // workers blocks and the loader drops a last partial
        # batch: with fewer blocks than one batch a worker would get none, and the Trainer would
        # stop at step 0 and save the parent unchanged as the stage's model.
        raise StageError(
            f"stage {name!r}: {rows} packed blocks over {workers} worker(s) give each worker {rows // workers}, fewer "
            f"than one batch (training.batch_size {batch}): lower stages.{name}.training.batch_size or "
            f"stages.{name}.resources.workers, or give more data (or a smaller data.block_size)"
        )


def _alive_nodes() -> dict[str, str]:
    """Alive nodes of the Ray cluster: node id -> how to name it (address, and name where it differs)."""
    import ray

    return {
        n["NodeID"]: n["NodeManagerAddress"] + (f" ({n['NodeName']})" if n.get("NodeName") not in (None, n["NodeManagerAddress"]) else "")
        for n in ray.nodes()
        if n.get("Alive")
    }


def _lost_nodes(before: dict[str, str]) -> str | None:
    """The nodes alive when the stage started that are gone now, named, or None."""
    try:
        now = _alive_nodes()
    except Exception:  # the failure itself is what matters; naming nodes is a courtesy
        return None
    lost = [f"{node_id} at {where}" for node_id, where in before.items() if node_id not in now]
    return ", ".join(lost) or None


def _failure(name: str, exc: Exception, lost: str | None = None) -> StageError | StorageError:
    """What a failed `fit` raises: an AlloyLM error a worker (or Ray Train's controller, through the
    checkpoint filesystem) raised on purpose, which names the file or the cause, as it is rather than
    inside Ray's traceback snippet, which cuts long messages. Storage that stayed unreachable past the
    retry window, or a full disk, is a StorageError; anything else (a corrupt file too) a StageError."""
    from alloylm.errors import AlloyLMError

    failures = list((getattr(exc, "worker_failures", None) or {}).values())
    failures.append(getattr(exc, "controller_failure", None))
    ours = [e for e in failures if isinstance(e, AlloyLMError)]
    if not ours and lost:
        return StageError(
            f"stage {name!r} failed: the Ray cluster lost node(s) {lost} during the stage, and Ray Train could not"
            " start the workers again on the nodes left; the checkpoints are kept: rerun when the node is back to"
            f" resume from the last one. Ray Train: {exc}"
        )
    if not ours:
        return StageError(f"stage {name!r} failed: {exc}")
    unreachable = [e for e in ours if isinstance(e, StorageError) and not isinstance(e, CorruptFileError)]
    first = (unreachable or ours)[0]
    message = str(first)
    where = "in Ray Train's controller" if first is failures[-1] else "on a worker"
    message = message if message.startswith(f"stage {name!r}") else f"stage {name!r} failed {where}: {message}"
    return StorageError(message) if unreachable else StageError(message)


# Ray Train settings (its documented environment variables) for stages that may last seconds;
# a value set in the environment wins. Ray Train reads them in the driver and passes them on.
RAY_TRAIN_ENVIRONMENT = {
    # The controller polls the workers every 2 s by default, so a finished stage waited 1 s on
    # average (2 s at worst) to be noticed; a poll is one small actor call per worker.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    # Ray Train's print patch sends every print of a worker through its logger. Under it, dill's
    # stdout capture (datasets hashes the map functions of TRL's tokenization with it) cannot
    # capture, and each SFT/DPO/ORPO stage logged ~1,700 lines of disassembled bytecode through
    # Ray's log pipeline. Without it, prints go to the worker's stdout, which Ray forwards as usual.
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
}


def _cpt_columns(data_uri: str) -> list[str]:
    """`input_ids`, and `attention_mask` where the data set has one: `data.tail: pad` writes the
    padded last block with a mask in `shards/tail.parquet` (the other shards have none: Ray Data reads
    it as null there, and `cpt._collate` masks nothing in those blocks). Without the mask, CPT
    trained on the padding as if it were text."""
    import pyarrow.parquet as pq

    from alloylm import storage

    tail_fs, tail_path = storage.arrow_filesystem(storage.join(data_uri, "shards", "tail.parquet"))
    try:
        names = pq.read_schema(tail_path, filesystem=tail_fs).names
    except FileNotFoundError:  # `tail: drop` with a corpus that filled whole blocks: no tail file
        return ["input_ids"]
    return ["input_ids", "attention_mask"] if "attention_mask" in names else ["input_ids"]


def cpt_blocks(data_uri: str):
    """A CPT data set's packed blocks as a Ray Data set that yields them in file order.

    Ray Data's default lets a block whose read task finishes first overtake the blocks before it.
    Each epoch's local shuffle (`cpt.epoch_shuffled_batches`) permutes the blocks in the order they
    arrive, so the packed tail (a file of its own, read by its own task) landing first now and then
    changed that epoch's order: measured on the quickstart's general text, 3 epochs read 20 times,
    9 of the 20 gave another order in at least one epoch (none of 20 with the order kept); and two
    runs of the quickstart's `base` stage on the same data parted at step 40, the third epoch's first.
    """
    import ray.data

    from alloylm import storage

    shards_fs, shards_path = storage.arrow_filesystem(storage.join(data_uri, "shards"))
    blocks = ray.data.read_parquet(shards_path, filesystem=shards_fs, columns=_cpt_columns(data_uri))
    blocks.context.execution_options.preserve_order = True  # this data set's own copy of the context
    # No progress bars in the streaming split the workers read: Ray Data 2.60's bar has a race (its
    # `update` checks the bar, then a `close` from another thread sets it to None before the call),
    # which failed a 20-epoch CPT of `configs/science.yaml` in epoch 14 with "'NoneType' object has
    # no attribute 'update'" inside SplitCoordinator.get(); Ray Train restarted and resumed it.
    blocks.context.enable_progress_bars = False
    return blocks


# A CPT data set read more than once is read into the object store first when its blocks take at
# most this share of the cluster's object store memory (Ray Train's guidance: materialize a data set
# that fits, rather than execute its read again each epoch).
MATERIALIZE_SHARE = 0.1


def read_more_than_once(stage: TrainStageConfig, data_manifest: dict, block_size: int) -> str | None:
    """Why the stage's CPT blocks are better read once, before training, or None: the stage passes
    over them more than once, and they are small beside the object store.

    Streamed, each epoch is a new execution of the read; on the quickstart's `base` stage (1 worker,
    2 CPUs) each took 3-5.4 s, and the trainer waited for it: 5 steps at 800-1300 tokens/s at every
    epoch's start against 5,300-7,000 tokens/s between.
    """
    import ray

    training = stage.training
    blocks = int((data_manifest.get("counts") or {}).get("blocks") or 0)
    if not blocks:
        return None
    per_step = training.batch_size * training.gradient_accumulation_steps * stage.resources.workers
    passes = training.max_steps * per_step / blocks if training.max_steps else training.epochs
    size = blocks * block_size * 5  # int32 ids, and room for the tail's int8 mask
    if passes <= 1 or size > MATERIALIZE_SHARE * ray.cluster_resources().get("object_store_memory", 0):
        return None
    return f"its {size / 2**20:.1f} MiB of blocks are read {passes:.3g} times"


def ingest_config():
    """Ray Train's data config: its default ingest options (from the driver's Ray Data context), with
    the blocks kept in order as in `cpt_blocks` (Ray Train sets these on its copy of each data set)."""
    import ray.train

    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True
    return ray.train.DataConfig(execution_options=options)


_STATE_API: dict[str, bool] = {}  # GCS address -> whether the cluster's State API answered


def state_api_answers() -> bool:
    """Whether the connected cluster's State API (served by the Ray dashboard) answers; asked once
    per cluster. A local cluster started without the dashboard (as `alloylm` starts one) has none."""
    import ray
    from ray.util.state import list_nodes

    address = ray.get_runtime_context().gcs_address
    if address not in _STATE_API:
        try:
            list_nodes(limit=1, timeout=10, raise_on_missing_output=False)
            _STATE_API[address] = True
        except Exception:  # ServerUnavailable, or any other way of not answering
            _STATE_API[address] = False
    return _STATE_API[address]


def trainer_class():
    """Ray Train's TorchTrainer less two of its default callbacks where they have nothing to do.

    - Its `PlacementGroupCleaner`, where the cluster has no State API. Ray Train starts that helper
      actor (one more process) with every `fit` to remove the placement group should the
      controller die ungracefully; it learns whether the controller lives through the State API
      alone. Without one it cannot tell, and warns every second that the State API "may be
      temporarily unavailable" (288 such lines in one quickstart run). Measured on the reduced
      quickstart's `base` stage, interleaved pairs on a quiet machine (1-minute load 0.1-1.4 before
      each): 13.1 and 11.9 s outside training without it against 15.3 and 13.5 s with it.
    - Its `DatasetsCallback`, for a stage that passes Ray Train no data set (every kind but CPT
      reads its data in the worker). The callback starts a `DatasetManager` actor with every
      `fit` all the same: one more process that imports Ray Data, for nothing. Measured with an
      empty train loop, 1 worker, 6 interleaved pairs on this 2-core machine (1-minute load 2.0
      before, 1.5 after): `fit` took 8.0 s against 8.8 s (medians) and 12.0 against 15.2
      CPU-seconds; less CPU in all 6 pairs.

    Ray Train has no setting for either, hence the override of its (private) default callbacks;
    if Ray changes them, this falls back to the plain trainer.
    """
    from ray.train.torch import TorchTrainer

    try:
        from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    except ImportError:
        return TorchTrainer
    if not callable(getattr(TorchTrainer, "_create_default_callbacks", None)):
        return TorchTrainer
    cleaner_useless = not state_api_answers()

    class Trainer(TorchTrainer):
        def _create_default_callbacks(self):
            idle = [PlacementGroupCleanerCallback] if cleaner_useless else []
            if not getattr(self, "datasets", True):
                idle.append(DatasetsCallback)
            return [c for c in super()._create_default_callbacks() if not isinstance(c, tuple(idle))]

    return Trainer


# Ray Train's list of the checkpoints a run reported, in the run's folder (Ray's
# `CHECKPOINT_MANAGER_SNAPSHOT_FILENAME`, written out here to keep off Ray's private modules).
RAY_TRAIN_SNAPSHOT = "checkpoint_manager_snapshot.json"


def set_aside_unreadable_snapshot(run_uri: str) -> str | None:
    """Move Ray Train's checkpoint list of an interrupted run at `run_uri` aside if it is not a
    JSON object; returns where it went, or None when it is readable or absent.

    Ray Train's controller rewrites that file in place after every checkpoint (the file is
    truncated, then written: `CheckpointManager._write_state_to_storage`), so a controller killed
    between the two on a local or shared disk leaves it empty or cut. Ray Train then refuses to
    start the run (`CheckpointManagerInitializationError`), on every later attempt too: the stage
    could never run again until somebody deleted the file. Set aside (kept, never deleted), Ray
    Train starts the run with an empty list, and the stage resumes from the newest whole one of the
    run's checkpoint folders (`checkpoint_folders`, handed to the workers; `worker._resume_dir`).
    (On S3 an object is written whole or not at all, so this is a local-disk failure; the check
    reads either.)
    """
    snapshot = storage.join(run_uri, RAY_TRAIN_SNAPSHOT)
    try:
        data = storage.read_bytes(snapshot)
    except StorageNotFoundError:
        return None
    try:
        if isinstance(json.loads(data), dict):
            return None
    except ValueError:  # not UTF-8, or not JSON
        pass
    aside = storage.aside_uri(snapshot, "unreadable")
    storage.write_bytes(aside, data)
    storage.remove(snapshot)
    return aside


def checkpoint_folders(run_uri: str) -> list[str]:
    """The checkpoint folders (Ray Train's `checkpoint_<time>`) in the Ray Train run folder
    `run_uri` that hold a trainer state, newest first (their names sort by time)."""
    states = storage.list_files(run_uri, "checkpoint_*/checkpoint/trainer_state.json")
    return sorted({posixpath.dirname(posixpath.dirname(state)) for state in states}, reverse=True)


# The manifest's `breakdown`: where a stage's wall time (`seconds`) went, in this order.
BREAKDOWN_PHASES = {
    "prepare": "driver: imports, parent/data/resource checks, Ray Data set-up, until Ray Train starts",
    "worker_start": "Ray Train: controller, placement group, worker processes, process group (and any restarts)",
    "imports": "worker: importing torch, transformers, Ray Train's integration",
    "load": "worker: tokenizer, parent model, data, the method's trainer, resume checkpoint",
    "engine_init": "worker: Trainer.train until the first step: DeepSpeed/DDP engine, optimizer, data loader",
    "training": "worker: the trainer loop (transformers' train_runtime), checkpoints included",
    "save": "worker: saving the model, tokenizer and metrics, uploading them to the staging location",
    "finish": "Ray Train noticing the end and stopping the workers; the driver reading the summary",
}


def stage_breakdown(prepare: float, fit_seconds: float, fit_started_at: float, worker: dict | None, finish: float) -> dict[str, float]:
    """The breakdown of a stage's wall time from the driver's clock and rank 0's phases.

    `worker` is rank 0's return value (`worker.train_loop_per_worker`): its wall-clock start and
    the seconds of its phases on its own monotonic clock. What `fit` took beyond those phases is
    Ray Train's: before the worker started (cut by wall clock, clamped so a skewed clock on
    another node cannot make it negative) and after it returned.
    """
    phases = {key: float(value) for key, value in ((worker or {}).get("seconds") or {}).items()}
    outside = max(fit_seconds - sum(phases.values()), 0.0)
    started_at = (worker or {}).get("started_at")
    start = min(max(started_at - fit_started_at, 0.0), outside) if started_at is not None else outside
    values = {"prepare": prepare, "worker_start": start, **phases, "finish": outside - start + finish}
    return {key: round(values.get(key, 0.0), 2) for key in BREAKDOWN_PHASES}


def format_breakdown(manifest: dict) -> str:
    """One line: the stage's wall time, the part outside training and each phase."""
    breakdown = manifest.get("breakdown") or {}
    outside = manifest.get("seconds", 0.0) - breakdown.get("training", 0.0)
    parts = " ".join(f"{key} {value:.1f}" for key, value in breakdown.items())
    return f"{manifest.get('seconds', 0.0):.1f} s, {outside:.1f} s outside training ({parts})"


def train_stage(config: RunConfig, name: str) -> dict:
    """Train stage `name` (preparing its data first if needed); returns its manifest."""
    entered = time.monotonic()
    import ray.train
    from ray.train.torch import TorchConfig

    from alloylm.data.prepare import content_fingerprint, dataset_uri, prepare_dataset, prepare_tokenizer
    from alloylm.train.worker import SUMMARY_NAME, StageJob, train_loop_per_worker

    from alloylm.cluster import check_storage_shared
    from alloylm.pipeline import check_stage_resources
    from alloylm.stages import kind_of
    from alloylm.tracking import ensure_experiment, mlflow_target

    kind_of(config, name, command="train")  # UsageError (exit 2): no such stage, or not a training stage
    check_storage_shared(config.storage)  # again for nodes that joined since the run started (autoscaling)
    stage = config.stages[name]
    layout = RunLayout.of(config)
    parent_kind, parent, parent_id = _parent(config, stage)
    preparing = time.monotonic()
    tokenizer_manifest = prepare_tokenizer(config)
    data_manifest = prepare_dataset(config, stage.data, tokenizer_manifest)
    entered += time.monotonic() - preparing  # making the data (`alloylm train` alone) is the data's step, not the stage's
    uri = stage_uri(config, name)
    padded = bool(data_manifest["counts"].get("tail_padded_tokens"))
    fp = stage_fingerprint(config, name, parent_id, content_fingerprint(data_manifest), tokenizer_manifest["fingerprint"], padded)
    inputs = lifecycle.input_versions({stage.from_: parent} if stage.from_ in config.stages else {})
    manifest = lifecycle.up_to_date(uri, fp, inputs)
    if manifest:
        log.info("stage %s: up to date, not retrained (%s)", name, uri)
        return manifest
    build = lifecycle.build_key(fp, inputs)  # the checkpoints of this build of the stage, and of no other
    data_uri = dataset_uri(config, stage.data)
    rows = data_manifest["counts"].get("blocks") or data_manifest["counts"].get("records_out") or 0
    _check_data(stage, name, data_uri, rows)
    check_stage_resources(config, [name])
    _check_parent_and_tokenizer(config, name, parent_kind, parent)
    mlflow = mlflow_target(config, step=f"stage:{name}")
    if mlflow is not None:
        ensure_experiment(mlflow)  # here, once: parallel stages' workers would race to create it
    with lifecycle.begin(uri, fp, config) as artifact:
        run_uri = storage.join(layout.checkpoints_root, f"{name}-{build}")  # Ray Train's run folder (`run_config` below)
        aside = set_aside_unreadable_snapshot(run_uri)
        unlisted = checkpoint_folders(run_uri) if aside is not None else []
        if aside is not None:
            log.warning(
                "stage %s: Ray Train's list of this stage's checkpoints was cut short (its controller stopped while "
                "writing it) and cannot be read; moved to %s. %s", name, aside,
                f"Resuming from the newest whole one of its {len(unlisted)} checkpoint folder(s) instead." if unlisted
                else "It has no checkpoint folder: the stage starts from its first step.",
            )
        job = StageJob(
            stage_name=name,
            stage=stage.model_dump(mode="json", by_alias=True),
            seed=config.seed,
            trust_remote_code=config.trust_remote_code,
            tokenizer_uri=layout.tokenizer,
            data_uri=data_uri,
            parent_kind=parent_kind,
            parent=parent,
            parent_seed=parent_id["seed"] if parent_kind == "preset" else 0,
            output_uri=artifact.staging_uri,
            data_rows=rows,
            mlflow=mlflow,
            storage_env=storage.storage_environment(),
            # the same for every attempt of this stage's Ray Train run (`run_config.name` below, in
            # the run's checkpoints folder), and for no other
            workdir_key=fingerprint(layout.checkpoints_root, f"{name}-{build}")[:12],
            unlisted_checkpoints=unlisted,
        )
        # Retries within the storage retry window in Ray Train's controller too (see storage.py).
        fs, checkpoints_path = storage.train_filesystem(layout.checkpoints_root)
        datasets = {}
        if stage.kind == "cpt":
            blocks = cpt_blocks(data_uri)
            from alloylm.pipeline import unreserved_resources

            unreserved = unreserved_resources()  # inside a run: this stage's share is already reserved
            if unreserved is not None:
                spare = unreserved.get("CPU", 0)
            else:
                spare = ray.cluster_resources().get("CPU", 0) - stage.resources.workers * stage.resources.cpus_per_worker
            reread = read_more_than_once(stage, data_manifest, config.data.block_size)
            if spare < 1 or reread:
                # The workers will hold every CPU, and Ray Data's read tasks need one to run; or the
                # blocks are read again every epoch (Ray Train runs the data set's read once per
                # epoch) and are small: read the (compact, already packed) blocks into the object
                # store now, before the workers start, once.
                # Through Ray Data's own read (not pyarrow + from_arrow_refs, which is faster): its
                # block boundaries decide which worker trains on which blocks, so another reader
                # would change every 2-worker CPT result.
                log.info("stage %s: %s; loading the data set first", name, "no CPU left for streaming reads" if spare < 1 else reread)
                blocks = blocks.materialize()
            datasets["train"] = blocks
        for key, value in RAY_TRAIN_ENVIRONMENT.items():
            os.environ.setdefault(key, value)  # Ray Train passes these on to its controller and workers
        trainer = trainer_class()(
            train_loop_per_worker=train_loop_per_worker,
            train_loop_config=job.model_dump(),
            torch_config=TorchConfig(backend="nccl" if stage.resources.use_gpu else "gloo"),
            scaling_config=ray.train.ScalingConfig(
                num_workers=stage.resources.workers,
                use_gpu=stage.resources.use_gpu,
                resources_per_worker={"CPU": stage.resources.cpus_per_worker, **({"GPU": stage.resources.gpus_per_worker} if stage.resources.use_gpu else {})},
                placement_strategy=stage.resources.placement_strategy,
            ),
            run_config=ray.train.RunConfig(
                name=f"{name}-{build}",
                storage_path=checkpoints_path,
                storage_filesystem=fs,
                # After a lost node, Ray Train keeps trying to start the worker group again; each start
                # waits RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S for its placement group, and by default
                # (controller_failure_limit=-1) it tries forever. Ray's own limit bounds the wait.
                failure_config=ray.train.FailureConfig(
                    max_failures=stage.checkpoint.max_failures,
                    controller_failure_limit=stage.checkpoint.max_start_failures,
                ),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=stage.checkpoint.keep),
            ),
            datasets=datasets or None,
            # Ray Train's ingest options, in order as above (its default takes the driver's context's).
            dataset_config=ingest_config() if datasets else None,
        )
        log.info("stage %s: %s from %s on %d worker(s) -> %s", name, stage.kind, parent, stage.resources.workers, uri)
        nodes = _alive_nodes()
        fit_started, fit_started_at = time.monotonic(), time.time()
        try:
            result = trainer.fit()
        except Exception as exc:  # Ray wraps worker errors; show the cause, keep the checkpoints
            raise _failure(name, exc, _lost_nodes(nodes)) from exc
        fit_ended = time.monotonic()
        final = storage.read_json(storage.join(artifact.staging_uri, SUMMARY_NAME))
        breakdown = stage_breakdown(
            prepare=fit_started - entered,
            fit_seconds=fit_ended - fit_started,
            fit_started_at=fit_started_at,
            worker=result.return_value,
            finish=time.monotonic() - fit_ended,
        )
        manifest = artifact.commit(
            {
                "kind": "stage",
                "stage_kind": stage.kind,
                "name": name,
                "parent": parent,
                "inputs": inputs,
                "data": stage.data,
                "data_fingerprint": data_manifest["fingerprint"],
                "tokenizer_fingerprint": tokenizer_manifest["fingerprint"],
                "metrics": final,
                "workers": stage.resources.workers,
                "seconds": round(sum(breakdown.values()), 1),
                "breakdown": breakdown,
            }
        )
    log.info("stage %s: done, %s steps, train loss %s -> %s", name, final.get("global_step"), final.get("train_loss"), uri)
    log.info("stage %s: %s", name, format_breakdown(manifest))
    return manifest
