"""Training stages on a real local Ray cluster with tiny models: every method learns, the output
is a plain Hugging Face model that generates, DeepSpeed ZeRO-2/3 with 2 workers, LoRA, S3
checkpoints, a killed worker resumes from its checkpoint, reruns do no training, and bad input
fails before training."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import tempfile
import threading
import time

import pytest
import torch

from alloylm import storage
from alloylm.config import ConfigError, validate_config
from alloylm.train.launcher import StageError, stage_uri, train_stage

pytestmark = pytest.mark.slow

FAST = {"batch_size": 4, "learning_rate": 3.0e-3, "logging_steps": 2}


def run_config(storage_uri: str, stages: dict, **extra) -> dict:
    return {
        "experiment": "tr",
        "storage": storage_uri,
        "builtin": {"materials": 4, "documents_per_material": 2, "general_documents": 80, "general_chats": 60},
        "tokenizer": {"train": {"vocab_size": 400}},
        "datasets": {
            "text": {"source": "builtin:general-text"},
            "chat": {"source": "builtin:general-chat"},
            "prefs": {"source": "builtin:biomaterials-preferences"},
        },
        "data": {"block_size": 32, "tokenizer_actors": 1},
        "stages": stages,
        **extra,
    }


def losses(uri: str) -> list[float]:
    lines = storage.read_text(storage.join(uri, "metrics.jsonl")).splitlines()
    return [json.loads(line)["loss"] for line in lines if "loss" in json.loads(line)]


def load(uri: str):
    from alloylm.models.loading import load_model

    return load_model(uri)


def assert_learned_and_generates(uri: str, parent_uri: str | None = None) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    values = losses(uri)
    assert len(values) >= 3
    assert sum(values[-2:]) / 2 < sum(values[:2]) / 2, values
    model = AutoModelForCausalLM.from_pretrained(uri)
    tokenizer = AutoTokenizer.from_pretrained(uri)
    assert os.path.exists(os.path.join(uri, "model.safetensors"))
    assert tokenizer.chat_template and "generation" in tokenizer.chat_template
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]
    if parent_uri:
        parent = AutoModelForCausalLM.from_pretrained(parent_uri).state_dict()
        changed = [k for k, v in model.state_dict().items() if not torch.equal(v, parent[k])]
        assert len(changed) > len(parent) // 2


@pytest.fixture(scope="module")
def chain(ray_cluster, tmp_path_factory):
    """base (CPT from a preset) -> sft -> dpo, and base -> orpo, on 1 worker each."""
    root = str(tmp_path_factory.mktemp("train"))
    config = validate_config(
        run_config(
            root,
            {
                "base": {"kind": "cpt", "from": {"init": "tiny-llama"}, "data": "text", "training": {**FAST, "max_steps": 30}},
                "sft": {"kind": "sft", "from": "base", "data": "chat", "training": {**FAST, "max_steps": 16, "learning_rate": 2e-3}},
                "dpo": {"kind": "dpo", "from": "sft", "data": "prefs", "beta": 0.1, "training": {**FAST, "max_steps": 8, "learning_rate": 5e-4}},
                "orpo": {"kind": "orpo", "from": "base", "data": "prefs", "training": {**FAST, "max_steps": 12, "learning_rate": 2e-3}},
            },
        )
    )
    manifests = {name: train_stage(config, name) for name in ("base", "sft", "dpo", "orpo")}
    return config, manifests


def test_cpt_from_a_preset_learns_and_generates(chain):
    config, manifests = chain
    uri = stage_uri(config, "base")
    assert_learned_and_generates(uri)
    assert manifests["base"]["metrics"]["global_step"] == 30
    assert manifests["base"]["metrics"]["tokens_seen"] == 30 * 4 * 32
    assert manifests["base"]["metrics"]["deepspeed"]["enabled"] is False  # no ZeRO asked: plain DDP
    # `epoch` counts passes over the data (30 steps of 4 blocks of 292), not the fraction of max_steps done.
    from alloylm.data.prepare import dataset_uri

    rows = storage.read_manifest(dataset_uri(config, "text"))["counts"]["blocks"]
    logged = [json.loads(line) for line in storage.read_text(storage.join(uri, "metrics.jsonl")).splitlines()]
    assert logged[-1]["step"] == 30 and logged[-1]["epoch"] == pytest.approx(30 / (rows // 4), abs=1e-4), (rows, logged[-1])
    assert storage.list_files(storage.join(uri, "tensorboard"))  # TensorBoard events
    assert "experiment: tr" in storage.read_text(storage.join(uri, "resolved_config.yaml"))


def test_small_cpt_data_read_more_than_once_is_loaded_once_before_training(ray_cluster):
    """Streamed, Ray Train executes a CPT data set's read again every epoch, and the trainer waits:
    3-5.4 s per epoch on the quickstart's `base` stage, 24 of its 37 s in the trainer loop. Small
    data read more than once goes into the object store first; one pass, or data beside which the
    object store is small, still streams."""
    from alloylm.config import CptStageConfig
    from alloylm.train.launcher import read_more_than_once

    def stage(**training):
        return CptStageConfig.model_validate({"kind": "cpt", "from": {"init": "pico-llama"}, "data": "d",
                                              "training": {"batch_size": 4, **training}})

    manifest = {"counts": {"blocks": 100}}
    assert read_more_than_once(stage(epochs=4), manifest, 128) == "its 0.1 MiB of blocks are read 4 times"
    assert read_more_than_once(stage(epochs=1), manifest, 128) is None
    assert read_more_than_once(stage(max_steps=25), manifest, 128) is None  # 25 steps of 4 blocks: one pass
    assert read_more_than_once(stage(max_steps=30), manifest, 128) == "its 0.1 MiB of blocks are read 1.2 times"
    assert read_more_than_once(stage(epochs=4), {"counts": {"blocks": 10**9}}, 128) is None  # 640 GB: streamed


def test_a_trained_stage_records_where_its_time_went(chain):
    """The manifest's `breakdown` (issue 17): every phase, none negative, adding up to `seconds`;
    the run summary's table shows it. On the chain's stages, trained anyway."""
    from alloylm.cli import stage_timings_table
    from alloylm.train.launcher import BREAKDOWN_PHASES

    _, manifests = chain
    for name, manifest in manifests.items():
        breakdown = manifest["breakdown"]
        assert list(breakdown) == list(BREAKDOWN_PHASES), name
        assert sum(breakdown.values()) == pytest.approx(manifest["seconds"], abs=0.1), name
        # Each phase takes time, on the worker and around it.
        assert all(value > 0 for value in breakdown.values()), (name, breakdown)
    table = stage_timings_table({name: {"seconds": m["seconds"], "breakdown": m["breakdown"]} for name, m in manifests.items()})
    assert "| base | " in table and "| orpo | " in table and "Median time outside training per stage" in table
    assert "{" not in table  # printed before the summary's JSON, which tests find by its first "{"


def test_sft_learns_from_its_parent(chain):
    config, manifests = chain
    assert_learned_and_generates(stage_uri(config, "sft"), stage_uri(config, "base"))
    assert manifests["sft"]["parent"] == stage_uri(config, "base")


def test_dpo_learns_from_its_parent(chain):
    config, _ = chain
    assert_learned_and_generates(stage_uri(config, "dpo"), stage_uri(config, "sft"))


def test_orpo_learns_from_its_parent(chain):
    config, _ = chain
    assert_learned_and_generates(stage_uri(config, "orpo"), stage_uri(config, "base"))


def test_rerun_of_a_finished_stage_does_no_training(chain):
    config, manifests = chain
    before = storage.read_manifest(stage_uri(config, "sft"))
    assert train_stage(config, "sft") == before == manifests["sft"]


def test_changed_stage_is_not_overwritten_without_permission(chain):
    config, manifests = chain
    raw = config.model_dump(mode="json", by_alias=True)
    raw["stages"]["orpo"]["beta"] = 0.2
    with pytest.raises(storage.ArtifactExistsError, match="overwrite"):
        train_stage(validate_config(raw), "orpo")
    assert storage.read_manifest(stage_uri(config, "orpo")) == manifests["orpo"]


def test_a_stage_made_from_an_earlier_build_of_its_parent_is_not_up_to_date(chain):
    """A parent deleted and trained again keeps its fingerprint (same inputs), but on a GPU not its
    weights: its children were still taken as up to date, built on the old ones."""
    config, manifests = chain
    base = stage_uri(config, "base")
    assert manifests["sft"]["inputs"] == {"base": manifests["base"]["created_at"]}
    path = storage.join(base, storage.MANIFEST_NAME)
    original = storage.read_text(path)
    try:
        storage.write_json(path, {**manifests["base"], "created_at": "2027-01-01T00:00:00+00:00"})  # base, built again
        with pytest.raises(storage.ArtifactExistsError, match="overwrite"):  # sft is stale, and not replaced unasked
            train_stage(config, "sft")
        assert storage.read_manifest(stage_uri(config, "sft")) == manifests["sft"]
    finally:
        storage.write_text(path, original)
    assert train_stage(config, "sft") == manifests["sft"]  # the build it was made from: up to date again


@contextlib.contextmanager
def _local_checkpoints_watched(stage_name: str):
    """While the block runs, what each worker's local folder for `stage_name` holds
    (`/tmp/alloylm-<stage>-<key>-rank<r>`), by rank: "most" Trainer checkpoint folders seen at once
    under `trainer/`, and "resume" the files of the checkpoint it resumed from (`checkpoint-<step>/`)."""
    import glob

    seen: dict[int, dict] = {}
    done = threading.Event()
    pattern = os.path.join(tempfile.gettempdir(), f"alloylm-{stage_name}-*-rank*")
    earlier = set(glob.glob(pattern))  # left by a killed process: not this block's

    def watch() -> None:
        try:
            while not done.is_set():
                for folder in set(glob.glob(pattern)) - earlier:
                    number = folder.rsplit("-rank", 1)[1]
                    if not number.isdigit():
                        continue
                    rank = seen.setdefault(int(number), {"most": 0, "resume": set()})
                    rank["most"] = max(rank["most"], len(glob.glob(os.path.join(folder, "trainer", "checkpoint-*"))))
                    for resume in glob.glob(os.path.join(folder, "checkpoint-*")):
                        rank["resume"] |= {os.path.relpath(os.path.join(d, f), resume) for d, _, fs in os.walk(resume) for f in fs}
                time.sleep(0.05)
        except Exception as exc:  # noqa: BLE001 - reported by the block, not lost with the thread
            failed.append(exc)

    failed: list[BaseException] = []
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield seen
    finally:
        done.set()
        watcher.join(timeout=10)
    assert not failed, f"the watcher of {pattern} failed: {failed[0]!r}"


def test_zero3_two_workers_tiny_mistral(chain):
    config, _ = chain
    raw = config.model_dump(mode="json", by_alias=True)
    raw["stages"] = {
        "mistral": {
            "kind": "cpt", "from": {"init": "tiny-mistral"}, "data": "text", "training": {**FAST, "max_steps": 16},
            "resources": {"workers": 2, "cpus_per_worker": 1}, "deepspeed": {"stage": 3},
            "checkpoint": {"every_steps": 8},
        }
    }
    cfg = validate_config(raw)
    with _local_checkpoints_watched("mistral") as most_at_once:
        manifest = train_stage(cfg, "mistral")
    assert manifest["metrics"]["world_size"] == 2 and manifest["metrics"]["global_step"] == 16
    # Once uploaded, a checkpoint leaves the worker's disk on every rank: the Trainer's own rotation
    # runs on rank 0 only, and rank 1 kept each checkpoint's ZeRO shards until the stage ended.
    assert sorted(most_at_once) == [0, 1] and all(r["most"] <= 1 for r in most_at_once.values()), most_at_once
    # A ZeRO-3 engine ran (read from the engine, not the config), and its checkpoints hold every
    # rank's partition of the model and optimizer states.
    ran = manifest["metrics"]["deepspeed"]
    assert (ran["enabled"], ran["zero_stage"], ran["offload"]) == (True, 3, {"optimizer": None, "params": None})
    assert ran["optimizer"] == "DeepSpeedZeroOptimizer_Stage3" and ran["gather_16bit_weights_on_save"] is True
    # Loaded partitioned (inside deepspeed.zero.Init): every rank built the whole model first.
    assert ran["loaded_partitioned"] is True
    saved = [f for f in storage.list_files(storage.join(cfg.run_uri, "checkpoints")) if "/mistral-" in f and "/global_step" in f]
    for rank in (0, 1):
        assert any(os.path.basename(f).startswith(f"zero_pp_rank_{rank}_") and f.endswith("optim_states.pt") for f in saved), saved
        assert any(os.path.basename(f).startswith(f"zero_pp_rank_{rank}_") and f.endswith("model_states.pt") for f in saved), saved
    # Run again without its artifact: it resumes from step 8 (the checkpoint at its last step is
    # passed over), each rank taking its own ZeRO shards only and no weights file (DeepSpeed resumes
    # from its states): every rank took every rank's shards, and a copy of them (8B, ZeRO-3: ~100 GB
    # per rank per resume).
    first_losses = losses(stage_uri(cfg, "mistral"))
    storage.remove(stage_uri(cfg, "mistral"))
    with _local_checkpoints_watched("mistral") as resumed:
        again = train_stage(cfg, "mistral")
    assert losses(stage_uri(cfg, "mistral")) == first_losses  # steps 10-16 again, exactly as the first time
    assert again["metrics"]["resumed_from_step"] == 8 and again["metrics"]["global_step"] == 16, again["metrics"]
    for rank, other in ((0, 1), (1, 0)):
        files = resumed[rank]["resume"]
        assert any(os.path.basename(f).startswith(f"zero_pp_rank_{rank}_") for f in files), files
        assert not any(os.path.basename(f).startswith(f"zero_pp_rank_{other}_") for f in files), files
        assert "trainer_state.json" in files and not any(f.endswith(".safetensors") for f in files), files
    # The killed-worker test of this module counts checkpoint folders under the same run: leave none behind.
    root = storage.join(cfg.run_uri, "checkpoints")
    for name in os.listdir(root):
        if name.startswith("mistral-"):
            storage.remove(storage.join(root, name))
    # Both workers' batches count: 2 workers x 4 blocks x 32 tokens per step.
    assert manifest["metrics"]["tokens_seen"] == 16 * 2 * 4 * 32
    uri = stage_uri(cfg, "mistral")
    assert json.loads(storage.read_text(storage.join(uri, "config.json")))["model_type"] == "mistral"
    # The workers' DeepSpeed loaded its CPU op with the ninja that `make setup` built it with (the
    # `ninja` package's, alloylm.warm): a system ninja first on their PATH would have rebuilt it
    # and left build-log entries the package's ninja reads as changed commands.
    import subprocess

    import ninja
    from torch.utils.cpp_extension import _get_build_directory  # torch's own choice of the op's folder

    folder = _get_build_directory("deepspeed_shm_comm", verbose=False)
    dry = subprocess.run([os.path.join(ninja.BIN_DIR, "ninja"), "-n", "-C", folder], capture_output=True, text=True, timeout=60)
    assert "no work to do" in dry.stdout, f"{folder}: {dry.stdout}{dry.stderr}"
    assert_learned_and_generates(uri)


def test_lora_with_zero2_two_workers_saves_a_merged_model(chain):
    config, _ = chain
    raw = config.model_dump(mode="json", by_alias=True)
    raw["stages"] = {
        "base": raw["stages"]["base"],
        "lora": {
            "kind": "sft", "from": "base", "data": "chat", "training": {**FAST, "max_steps": 12, "learning_rate": 5e-3},
            "lora": {"r": 4, "alpha": 8}, "resources": {"workers": 2, "cpus_per_worker": 1}, "deepspeed": {"stage": 2},
        },
    }
    cfg = validate_config(raw)
    manifest = train_stage(cfg, "lora")
    ran = manifest["metrics"]["deepspeed"]
    assert (ran["enabled"], ran["zero_stage"], ran["offload"]) == (True, 2, {"optimizer": None, "params": None})
    assert ran["optimizer"] == "DeepSpeedZeroOptimizer" and ran["loaded_partitioned"] is False  # ZeRO-2 keeps whole weights
    uri = stage_uri(cfg, "lora")
    assert os.path.exists(os.path.join(uri, "adapter", "adapter_config.json"))
    merged = load(uri)
    assert not any("lora" in name for name in merged.state_dict())  # a plain model, adapters merged in
    assert_learned_and_generates(uri, stage_uri(cfg, "base"))


# ---------------------------------------------------------------------------------------------
# Failures and resume
# ---------------------------------------------------------------------------------------------


def _train_worker_actors() -> dict[str, int]:
    """Alive Ray Train worker actors of this session's cluster, actor id -> PID, from the GCS's own
    actor table. Process names are not enough: the session's cluster also holds earlier tests'
    processes, and an actor may run in a worker process Ray started before the stage did."""
    from ray._private import state

    return {
        actor_id: info["Pid"]
        for actor_id, info in state.actors().items()
        if info["ActorClassName"] == "RayTrainWorker" and info["State"] == "ALIVE"
    }


def test_lora_from_a_preset_under_zero3_saves_a_merged_model(chain):
    """The bugs this guards: the merged model was rebuilt from the adapter's base_model_name_or_path,
    which a preset parent (built in memory) does not have; and under ZeRO-3 the base was rebuilt
    inside the finished trainer's zero.Init, partitioned (empty weights with one worker, a hang with
    more): either way the stage failed after training."""
    config, _ = chain
    raw = config.model_dump(mode="json", by_alias=True)
    raw["stages"] = {"lora-preset": {"kind": "cpt", "from": {"init": "tiny-llama"}, "data": "text", "lora": {"r": 4, "alpha": 8},
                                     "deepspeed": {"stage": 3}, "training": {**FAST, "max_steps": 3}}}
    cfg = validate_config(raw)
    train_stage(cfg, "lora-preset")
    uri = stage_uri(cfg, "lora-preset")
    trained = load(uri).state_dict()
    assert not any("lora" in key for key in trained)  # merged into a plain model
    assert storage.exists(storage.join(uri, "adapter", "adapter_config.json"))


def test_killed_worker_is_replaced_and_resumes_from_checkpoint(chain, tmp_path, monkeypatch):
    """A worker killed after the first checkpoint (step 40: one epoch of the 292 blocks is 36
    batches of 8, so the second epoch) is replaced and the stage resumes exactly: every logged loss
    equals an uninterrupted run's. CPT used to start a fresh `iter()` per epoch, so the resume's skip
    of 40 batches ran out at the first epoch's end and training went on with the second epoch's order
    from its start. The trackers cover the whole training too: the resumed worker continues the
    killed one's MLflow run, and its TensorBoard events start at step 1."""
    config, _ = chain
    raw = config.model_dump(mode="json", by_alias=True)
    raw["tracking"] = {"mlflow": {"tracking_uri": str(tmp_path / "mlruns")}}
    raw["stages"] = {
        "long": {
            "kind": "cpt", "from": {"init": "small-llama"}, "data": "text",
            "training": {"batch_size": 8, "learning_rate": 1e-3, "logging_steps": 5, "max_steps": 80},
            "checkpoint": {"every_steps": 40, "max_failures": 2},
        }
    }
    cfg = validate_config(raw)
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(manifest=train_stage(cfg, "long")), daemon=True)
    earlier = set(_train_worker_actors())  # left by earlier tests (or still being torn down)
    thread.start()
    checkpoints = os.path.join(cfg.run_uri, "checkpoints")
    killed = None
    while thread.is_alive() and killed is None:
        # Kill only once Ray Train's controller has registered a checkpoint of this stage: a folder
        # on disk is not enough (the controller collects reports when it polls its workers, and a
        # report still in a killed worker's queue is lost). It writes its checkpoint manager's
        # snapshot after each registration, in the stage's `long-<fingerprint>/` experiment folder
        # (other tests of the module checkpoint into the same run).
        registered = 0
        for folder in os.listdir(checkpoints) if os.path.isdir(checkpoints) else []:
            snapshot = os.path.join(checkpoints, folder, "checkpoint_manager_snapshot.json")
            if folder.startswith("long-") and os.path.exists(snapshot):
                try:
                    with open(snapshot, encoding="utf-8") as f:
                        registered = len(json.load(f)["checkpoint_results"])
                except (OSError, ValueError):  # being written
                    pass
        ours = {a: pid for a, pid in _train_worker_actors().items() if a not in earlier} if registered else {}
        if ours:
            # The stage's Train worker actor (not in `earlier`): kill its process.
            killed = next(iter(ours.values()))
            try:
                os.kill(killed, signal.SIGKILL)
            except ProcessLookupError:
                killed = None
        time.sleep(0.5)
    thread.join()
    assert killed is not None, "training finished before a worker could be killed"
    metrics = result["manifest"]["metrics"]
    assert metrics["global_step"] == 80  # the step count is intact
    assert metrics["resumed_from_step"] == 40, (
        f"killed PID {killed}; Train worker actors now: {_train_worker_actors()}; before the stage: {earlier}"
    )
    # The loss curve covers the whole training once, the steps before the resume (from the
    # checkpoint's log history) included; it used to start at the resume.
    rows = [json.loads(line) for line in storage.read_text(storage.join(stage_uri(cfg, "long"), "metrics.jsonl")).splitlines()]
    assert [row["step"] for row in rows if "loss" in row] == [1, *range(5, 81, 5)], [row["step"] for row in rows]
    assert metrics["first_loss"] == next(row["loss"] for row in rows if "loss" in row)
    logged = [1, *range(5, 81, 5)]
    # One MLflow run for the stage, continued by the resumed worker and finished, with every step
    # (those between the checkpoint and the kill twice, once per attempt).
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    [run] = client.search_runs([client.get_experiment_by_name(cfg.experiment).experiment_id], "tags.`alloylm.step` = 'stage:long'")
    assert run.info.status == "FINISHED"
    assert sorted({m.step for m in client.get_metric_history(run.info.run_id, "loss")}) == logged
    # TensorBoard: the resumed worker's events (the stage keeps its trainer's), the steps before the
    # checkpoint logged again from its log history.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = storage.join(stage_uri(cfg, "long"), "tensorboard")
    steps = set()
    for folder in {os.path.dirname(f) for f in storage.list_files(events) if "tfevents" in f}:
        accumulator = EventAccumulator(folder)
        accumulator.Reload()
        steps |= {e.step for e in accumulator.Scalars("train/loss")} if "train/loss" in accumulator.Tags()["scalars"] else set()
    assert sorted(steps) == logged
    # The same stage uninterrupted, in another run: the same loss at every step.
    raw["experiment"] = "tr-uninterrupted"
    uninterrupted = validate_config(raw)
    train_stage(uninterrupted, "long")
    expected = [json.loads(line) for line in storage.read_text(storage.join(stage_uri(uninterrupted, "long"), "metrics.jsonl")).splitlines()]
    assert [(r["step"], r["loss"]) for r in rows if "loss" in r] == [(r["step"], r["loss"]) for r in expected if "loss" in r]


@pytest.mark.s3
def test_checkpoints_and_artifacts_on_s3(chain, s3_bucket):
    config, _ = chain
    raw = config.model_dump(mode="json", by_alias=True)
    raw["storage"] = f"s3://{s3_bucket}/runs"
    raw["stages"] = {
        "base": {"kind": "cpt", "from": {"init": "pico-llama"}, "data": "text", "training": {**FAST, "max_steps": 6}, "checkpoint": {"every_steps": 3}},
    }
    cfg = validate_config(raw)
    manifest = train_stage(cfg, "base")
    uri = stage_uri(cfg, "base")
    assert storage.read_manifest(uri) == manifest
    assert any(f.endswith("model.safetensors") for f in storage.list_files(uri))
    checkpoint_files = storage.list_files(storage.join(cfg.run_uri, "checkpoints"))
    assert any("trainer_state.json" in f for f in checkpoint_files)
    assert load(uri).config.model_type == "llama"


def test_a_checkpoint_list_cut_short_is_set_aside_and_the_stage_resumes_from_its_folders(chain, monkeypatch, caplog):
    """Ray Train rewrites its checkpoint list (`checkpoint_manager_snapshot.json`) in place after
    every checkpoint; a controller killed mid-write leaves it cut, and Ray Train then refused to
    start that run on every later attempt. Here the stage's run folder holds a cut list before each
    `fit`, as a killed controller leaves it: the cut file is kept beside, named; a first run (no
    checkpoint folder yet) trains from step 0; a rerun of the same build resumes from the newest
    whole checkpoint folder below the last step (step 2 of 4)."""
    from alloylm.train import launcher

    config, _ = chain
    raw = config.model_dump(mode="json", by_alias=True)
    raw["stages"] = {
        "cut": {"kind": "cpt", "from": {"init": "pico-llama"}, "data": "text", "training": {**FAST, "max_steps": 4},
                "checkpoint": {"every_steps": 2}},
    }
    cfg = validate_config(raw)
    cut = b'{"checkpoint_results": [{"checkpoint": {"path": "/ru'
    real, seen = launcher.set_aside_unreadable_snapshot, []

    def cut_then_check(run_uri: str):
        storage.write_bytes(storage.join(run_uri, launcher.RAY_TRAIN_SNAPSHOT), cut)
        seen.append(run_uri)
        return real(run_uri)

    monkeypatch.setattr(launcher, "set_aside_unreadable_snapshot", cut_then_check)
    with caplog.at_level("WARNING", logger="alloylm.train"):
        first = train_stage(cfg, "cut")
    assert first["metrics"]["global_step"] == 4 and not first["metrics"].get("resumed_from_step")
    [run_uri] = seen
    [aside] = [f for f in storage.list_files(run_uri) if ".unreadable-" in f]
    assert os.path.basename(aside).startswith(launcher.RAY_TRAIN_SNAPSHOT) and storage.read_bytes(aside) == cut
    assert aside in caplog.text and "no checkpoint folder" in caplog.text
    assert len(launcher.checkpoint_folders(run_uri)) == 2  # steps 2 and 4
    # The same build again (its model removed, as after a stage that died saving it), the list cut again.
    storage.remove(stage_uri(cfg, "cut"))
    caplog.clear()
    with caplog.at_level("WARNING", logger="alloylm.train"):
        again = train_stage(cfg, "cut")
    assert seen == [run_uri, run_uri] and len([f for f in storage.list_files(run_uri) if ".unreadable-" in f]) == 2
    assert again["metrics"]["global_step"] == 4 and again["metrics"]["resumed_from_step"] == 2, again["metrics"]
    assert "Resuming from the newest whole one of its 2 checkpoint folder(s)" in caplog.text
    # A readable list, or none, is left alone.
    storage.write_text(storage.join(run_uri, launcher.RAY_TRAIN_SNAPSHOT), '{"checkpoint_results": []}')
    assert real(run_uri) is None and storage.exists(storage.join(run_uri, launcher.RAY_TRAIN_SNAPSHOT))
    assert real(storage.join(run_uri, "elsewhere")) is None


# ---------------------------------------------------------------------------------------------
# Bad input: each fails before training, naming the cause
# ---------------------------------------------------------------------------------------------


def test_parent_without_finished_artifact(chain):
    config, _ = chain
    raw = config.model_dump(mode="json", by_alias=True)
    raw["stages"]["child"] = {"kind": "sft", "from": "ghost", "data": "chat"}
    raw["stages"]["ghost"] = {"kind": "cpt", "from": {"init": "tiny-llama"}, "data": "text"}
    with pytest.raises(StageError, match="'ghost' has no finished artifact"):
        train_stage(validate_config(raw), "child")


def test_data_that_does_not_fit_the_stage(chain, tmp_path):
    config, _ = chain
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": f"answer {i}", "rejected": f"no {i}"}) + "\n" for i in range(4)))
    raw = config.model_dump(mode="json", by_alias=True)
    raw["datasets"]["mine"] = {"source": str(path), "format": "preference"}
    raw["stages"] = {"bad": {"kind": "sft", "from": {"init": "tiny-llama"}, "data": "mine"}}
    with pytest.raises(ConfigError, match="has format 'preference', a sft stage needs 'chat'"):
        validate_config(raw)


def test_cpt_with_less_than_one_batch_per_worker_is_refused_before_training(chain):
    """The bug this guards: each worker got no batch, the Trainer stopped at step 0, and the parent,
    unchanged, was committed as the stage's model."""
    config, _ = chain
    raw = config.model_dump(mode="json", by_alias=True)
    raw["stages"] = {"huge": {"kind": "cpt", "from": {"init": "tiny-llama"}, "data": "text", "training": {"batch_size": 100000, "max_steps": 2}}}
    with pytest.raises(StageError, match=r"stage 'huge': \d+ packed blocks over 1 worker\(s\) give each worker \d+, fewer than one batch \(training.batch_size 100000\)"):
        train_stage(validate_config(raw), "huge")
    assert not storage.exists(stage_uri(validate_config(raw), "huge"))


def test_tokenizer_model_vocabulary_mismatch(chain, tmp_path):
    from alloylm.models.loading import save_model
    from alloylm.models.presets import build_model
    from alloylm.models.tokenizer import train_tokenizer

    small = train_tokenizer(["tiny corpus " * 50, "another line " * 50], vocab_size=300)
    save_model(build_model("pico-llama", small), small, str(tmp_path / "small-vocab"))
    config, _ = chain
    raw = config.model_dump(mode="json", by_alias=True)
    raw["stages"] = {"x": {"kind": "cpt", "from": str(tmp_path / "small-vocab"), "data": "text", "training": {"max_steps": 2}, "checkpoint": {"max_failures": 0}}}
    with pytest.raises(StageError, match="vocabulary mismatch"):
        train_stage(validate_config(raw), "x")


def test_fp16_on_cpu_is_refused_at_load_time(chain):
    config, _ = chain
    raw = config.model_dump(mode="json", by_alias=True)
    raw["stages"]["base"]["deepspeed"] = {"stage": 2, "precision": "fp16"}
    with pytest.raises(ConfigError, match="fp16 needs GPUs"):
        validate_config(raw)


def test_more_workers_than_the_cluster_has(chain):
    config, _ = chain
    raw = config.model_dump(mode="json", by_alias=True)
    raw["stages"] = {"big": {"kind": "cpt", "from": {"init": "pico-llama"}, "data": "text", "resources": {"workers": 8}}}
    with pytest.raises(StageError, match="8 workers x 1 CPUs = 8 CPUs, but the Ray cluster has 2"):
        train_stage(validate_config(raw), "big")


# ---------------------------------------------------------------------------------------------
# Two nodes: a head and a worker node started with `ray start` on this machine, 1 CPU each
# ---------------------------------------------------------------------------------------------


def _registered_checkpoint_steps(checkpoints: str, stage: str) -> list[int]:
    """Steps of the checkpoints Ray Train's controller registered for `stage` (from the snapshot of
    its checkpoint manager, which it writes after each registration), oldest first."""
    steps = []
    for folder in os.listdir(checkpoints) if os.path.isdir(checkpoints) else []:
        snapshot = os.path.join(checkpoints, folder, "checkpoint_manager_snapshot.json")
        if folder.startswith(f"{stage}-") and os.path.exists(snapshot):
            try:
                with open(snapshot, encoding="utf-8") as f:
                    results = json.load(f)["checkpoint_results"]
            except (OSError, ValueError, KeyError):  # being written
                continue
            for result in results:
                state = os.path.join(checkpoints, folder, result["checkpoint_dir_name"], "checkpoint", "trainer_state.json")
                with open(state, encoding="utf-8") as f:
                    steps.append(json.load(f)["global_step"])
    return sorted(set(steps))


def test_lost_node_fails_in_bounded_time_naming_it_and_a_rerun_resumes(tmp_path, ray_processes):
    """Two nodes (`ray start --head` and a worker node on this machine), one worker each, spread over
    gloo by STRICT_SPREAD; the worker node's raylet and every process under it are SIGKILLed
    after a checkpoint is registered. Ray Train cannot place 2 workers again, so the stage fails
    within its start-failure bound, naming the lost node; with the node back, a rerun resumes from
    the last registered checkpoint and finishes every step."""
    import subprocess
    import sys
    import tempfile

    import psutil
    import yaml

    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    temp_dir = tempfile.mkdtemp(prefix="alloylm-lost-", dir="/tmp")
    (port,) = ray_processes.free_ports(1)
    # Ray's own settings, short here so the bounded failure comes quickly: how long one worker-group
    # start waits for its placement group (60 s by default), and how soon the GCS calls a silent
    # node dead (a health check every 3 s, dead after 5 missed, by default).
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "5",
           "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}
    env.pop("RAY_ADDRESS", None)
    common = ["--num-cpus=1", f"--temp-dir={temp_dir}", "--disable-usage-stats"]

    def raylets() -> set[int]:
        return {p.pid for p in psutil.process_iter(["name", "cmdline"])
                if temp_dir in " ".join(p.info["cmdline"] or []) and "raylet" in (p.info["name"] or "")}

    def start_worker_node() -> int:
        before = raylets()
        subprocess.run([ray, "start", f"--address=127.0.0.1:{port}", *common], check=True, env=env, capture_output=True, timeout=300)
        (raylet,) = raylets() - before
        return raylet

    max_steps, every = 40, 5
    raw = run_config(str(tmp_path / "runs"), {
        "lost": {"kind": "cpt", "from": {"init": "pico-llama"}, "data": "text", "training": {**FAST, "max_steps": max_steps},
                 "resources": {"workers": 2, "cpus_per_worker": 1, "placement_strategy": "STRICT_SPREAD"},
                 "checkpoint": {"every_steps": every, "max_failures": 2, "max_start_failures": 1}},
    })
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    checkpoints = str(tmp_path / "runs" / "tr" / "checkpoints")
    train = [sys.executable, "-m", "alloylm.cli", "train", str(cfg), "lost"]
    cli_env = {**env, "RAY_ADDRESS": f"127.0.0.1:{port}"}
    try:
        subprocess.run([ray, "start", "--head", f"--port={port}", "--include-dashboard=false", *common],
                       check=True, env=env, capture_output=True, timeout=300)
        raylet = start_worker_node()
        proc = subprocess.Popen(train, env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        output: list[str] = []
        reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
        reader.start()
        at_kill: list[int] = []
        while proc.poll() is None and not at_kill:
            at_kill = _registered_checkpoint_steps(checkpoints, "lost")
            time.sleep(0.2)
        assert at_kill, "training finished before the node could be killed:\n" + "".join(output)[-3000:]
        node = psutil.Process(raylet)
        doomed = [node, *node.children(recursive=True)]  # its workers, agents: the whole node
        for p in doomed:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        killed_at = time.monotonic()
        try:
            proc.wait(timeout=600)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError("the stage did not fail within 600 s of losing the node:\n" + "".join(output)[-3000:])
        failed_after = time.monotonic() - killed_at
        reader.join(timeout=10)
        text = "".join(output)
        assert proc.returncode != 0, text[-3000:]
        dead = subprocess.run(
            [sys.executable, "-c", "import ray; ray.init(); print(*[n['NodeID'] for n in ray.nodes() if not n['Alive']])"],
            env=cli_env, capture_output=True, text=True, timeout=300, check=True,
        ).stdout.split()
        assert len(dead) == 1 and dead[0] in text and "lost node" in text, text[-3000:]
        registered = _registered_checkpoint_steps(checkpoints, "lost")
        print(f"killed after checkpoint(s) {at_kill}; failed {failed_after:.0f} s later; registered {registered}")
        print(next(line for line in text.splitlines() if "lost node" in line)[:400])

        start_worker_node()  # the node is back
        result = subprocess.run(train, env=cli_env, capture_output=True, text=True, timeout=1200)
        assert result.returncode == 0, result.stderr[-3000:]
        metrics = storage.read_manifest(str(tmp_path / "runs" / "tr" / "stages" / "lost"))["metrics"]
        print(f"rerun: resumed_from_step {metrics['resumed_from_step']}, global_step {metrics['global_step']}")
        assert metrics["resumed_from_step"] == registered[-1] >= at_kill[-1]  # at most one interval lost
        assert metrics["global_step"] == max_steps
        # One worker per node, gloo between the two raylets (STRICT_SPREAD): the two-node check.
        assert metrics["world_size"] == 2 and len(metrics["nodes"]) == 2
    finally:
        ray_processes.stop(marker=temp_dir)


def _exit_and_stderr(proc, timeout: float = 300) -> tuple[int | None, str]:
    """A command's exit code and stderr; None for one still running after `timeout` (killed)."""
    import subprocess

    try:
        _, err = proc.communicate(timeout=timeout)
        return proc.returncode, err
    except subprocess.TimeoutExpired:
        proc.kill()
        return None, proc.communicate()[1]


def test_a_run_folder_or_model_a_node_does_not_see_is_refused_before_anything_is_written(tmp_path, ray_processes):
    """Two nodes on this machine; the worker node runs in a mount namespace of its own where
    tmp_path/hidden is an empty tmpfs: a folder on the driver's disk that node does not see, as a
    node-local run folder on a real cluster. `alloylm run` and `alloylm train` with that folder as
    `storage` exit 2 naming the key and that node, and write nothing there (no run folder, no
    lease, no marker); `alloylm serve` of a model folder there exits 1 naming the variant. The
    other direction, a folder every node sees, is the lost-node test's run above (two nodes, each
    checked). Before the check, the same run failed late: a Ray Data task on that node found no
    shards."""
    import shlex
    import subprocess
    import sys
    import tempfile

    import psutil
    import yaml

    if subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True).returncode != 0:
        pytest.skip("cannot make a mount namespace for a node that does not see a folder (needs root or CAP_SYS_ADMIN)")
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    temp_dir = tempfile.mkdtemp(prefix="alloylm-hid-", dir="/tmp")
    (port,) = ray_processes.free_ports(1)
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    common = ["--num-cpus=1", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    hidden = tmp_path / "hidden"
    (hidden / "model").mkdir(parents=True)
    storage_root = hidden / "new" / "runs"  # not there yet: the folders the check makes go again
    raw = run_config(str(storage_root), {"lost": {"kind": "cpt", "from": {"init": "pico-llama"}, "data": "text", "training": {**FAST, "max_steps": 2}}})
    raw["serve"] = {"model": "copy", "sources": {"copy": str(hidden / "model")}, "deployment": {"num_cpus": 0.1}}
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    cli_env = {**env, "RAY_ADDRESS": f"127.0.0.1:{port}"}
    try:
        subprocess.run([ray, "start", "--head", f"--port={port}", "--include-dashboard=false", *common],
                       check=True, env=env, capture_output=True, timeout=300)
        head = {p.pid for p in psutil.process_iter(["cmdline"]) if temp_dir in " ".join(p.info["cmdline"] or [])}
        start = shlex.join([ray, "start", f"--address=127.0.0.1:{port}", *common])
        subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", f"mount -t tmpfs none {shlex.quote(str(hidden))} && exec {start}"],
                       check=True, env=env, capture_output=True, timeout=300)
        [worker_node] = [
            arg.split("=", 1)[1] for p in psutil.process_iter(["name", "cmdline"])
            if temp_dir in " ".join(p.info["cmdline"] or []) and "raylet" in (p.info["name"] or "") and p.pid not in head
            for arg in p.info["cmdline"] if arg.startswith("--node_id=")
        ]
        cli = [sys.executable, "-m", "alloylm.cli"]
        commands = {"run": [*cli, "run", str(cfg)], "train": [*cli, "train", str(cfg), "lost"], "serve": [*cli, "serve", str(cfg)]}
        start_one = lambda name: subprocess.Popen(commands[name], env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # noqa: E731
        serving = start_one("serve")  # beside the others: it writes nothing
        done = {"run": _exit_and_stderr(start_one("run"))}
        done["train"] = _exit_and_stderr(start_one("train"))  # after `run`: both would make and remove storage_root's folders
        done["serve"] = _exit_and_stderr(serving)
    finally:
        ray_processes.stop(marker=temp_dir)
    for name in ("run", "train"):
        code, err = done[name]
        assert code == 2 and f"storage: {str(storage_root)!r}" in err and "do not see" in err, (name, err[-3000:])
        assert re.findall(r"\(node ([0-9a-f]+)\)", err) == [worker_node], (name, err[-3000:])  # that node, not the driver's
    code, err = done["serve"]
    assert code == 1 and "do not see" in err and "copy" in err, err[-3000:]
    assert os.listdir(hidden) == ["model"]  # no storage folder made, no run folder, no lease, no marker
