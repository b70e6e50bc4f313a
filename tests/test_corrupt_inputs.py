"""Corrupt inputs on disk (really truncated or rewritten, nothing mocked) fail with an error that
names the file, and nothing of the stage that read them is written: a truncated `model.safetensors`
in a parent stage, a `manifest.json` that is not JSON, a tokenizer folder without `tokenizer.json`;
a checkpoint whose optimizer state is truncated is skipped for the one before it, and when no
checkpoint is whole the resume fails naming each file.

Everything runs without Ray except the stage test, which needs the session's cluster to prepare the
child's data (Ray Data) before the parent's weights are checked; it trains nothing."""

from __future__ import annotations

import logging
import os
import shutil

import pytest

from alloylm import artifact, storage
from alloylm.config import validate_config
from alloylm.errors import RunError, StageError
from alloylm.models import build_model, check_safetensors, load_model, load_tokenizer, save_model, train_tokenizer
from alloylm.storage import CorruptFileError

_CORPUS = [
    "Nacre is a composite of aragonite platelets and a protein matrix; its toughness is high.",
    "Spider silk combines strength and extensibility through hierarchical beta-sheet crystals.",
] * 20


def _truncate(path: str, keep: int | None = None) -> None:
    """Cut the file at `path` short on disk (to half its length unless `keep` bytes are given)."""
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2 if keep is None else keep)


def _files(root: str) -> set[str]:
    """Every file and folder below `root` (hidden ones too): what a failed step must leave alone."""
    found = set()
    for folder, dirs, files in os.walk(root):
        found.update(os.path.relpath(os.path.join(folder, name), root) for name in dirs + files)
    return found


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("tokenizer"))
    train_tokenizer(_CORPUS, vocab_size=300).save_pretrained(folder)
    return folder


@pytest.fixture
def model_dir(tokenizer_dir, tmp_path) -> str:
    """A whole pico model folder (safetensors weights and the tokenizer)."""
    tokenizer = load_tokenizer(tokenizer_dir)
    folder = str(tmp_path / "model")
    save_model(build_model("pico-llama", tokenizer, seed=0), tokenizer, folder)
    return folder


def _run_config(root: str, tokenizer_dir: str, other: str | None = None) -> dict:
    fast = {"batch_size": 4, "learning_rate": 3e-3, "logging_steps": 1}
    stages = {
        "cpt": {"kind": "cpt", "from": {"init": "pico-llama"}, "data": "text", "training": {**fast, "max_steps": 4}},
        "child": {"kind": "cpt", "from": "cpt", "data": "text", "training": {**fast, "max_steps": 2}, "checkpoint": {"max_failures": 0}},
    }
    if other is not None:
        stages["merged"] = {"kind": "merge", "method": "slerp", "parents": ["cpt", other], "base": "cpt", "parameters": {"t": {"default": 0.5}}}
    return {
        "experiment": "corrupt",
        "storage": os.path.join(root, "runs"),
        "builtin": {"materials": 2, "documents_per_material": 1, "general_documents": 10, "general_chats": 4},
        "tokenizer": {"from": tokenizer_dir},
        "datasets": {"text": {"source": "builtin:general-text"}},
        "data": {"block_size": 16, "tokenizer_actors": 1},
        "stages": stages,
    }


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "keep", [lambda size: size // 2, lambda size: size - 1, lambda size: 5], ids=["half", "all-but-the-last-byte", "into-the-header"]
)
def test_load_model_names_a_truncated_safetensors_file(model_dir, keep):
    weights = os.path.join(model_dir, "model.safetensors")
    check_safetensors(model_dir)  # whole: no complaint
    _truncate(weights, keep(os.path.getsize(weights)))
    with pytest.raises(CorruptFileError) as caught:
        load_model(model_dir)
    assert isinstance(caught.value, RunError)  # the CLI exits 1 with the message, no traceback
    assert f"{weights} is truncated or corrupt (safetensors: " in str(caught.value)


def test_a_shard_missing_from_its_index_is_named(tokenizer_dir, tmp_path):
    tokenizer = load_tokenizer(tokenizer_dir)
    folder = tmp_path / "sharded"
    build_model("pico-llama", tokenizer, seed=0).save_pretrained(folder, max_shard_size="100KB")
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(shards) >= 2 and (folder / "model.safetensors.index.json").is_file()
    os.remove(folder / shards[-1])
    with pytest.raises(CorruptFileError, match=f"{folder / shards[-1]} is missing: model.safetensors.index.json lists it"):
        load_model(str(folder))


def test_merge_compatibility_check_names_a_truncated_parent(model_dir):
    from alloylm.merge import MergeInputError
    from alloylm.merge.compat import tensor_shapes

    weights = os.path.join(model_dir, "model.safetensors")
    _truncate(weights)
    with pytest.raises(MergeInputError, match=f"{weights} is truncated, corrupt or missing"):
        tensor_shapes(model_dir)


# ---------------------------------------------------------------------------------------------
# Manifests
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content", [b'{"fingerprint": "ab', b"\xff\xfe not text", b"[1, 2]"], ids=["cut-short", "not-utf8", "a-list"])
def test_a_manifest_that_is_not_a_json_object_is_named_and_never_complete(tmp_path, content):
    uri = str(tmp_path / "artifact")
    with storage.begin_artifact(uri) as staged:
        storage.write_text(storage.join(staged.staging_uri, "weights.txt"), "1 2 3")
        staged.commit({"fingerprint": "abc"})
    manifest = os.path.join(uri, "manifest.json")
    with open(manifest, "wb") as f:
        f.write(content)
    before = _files(str(tmp_path))
    for read in (storage.read_manifest, storage.is_complete, lambda u: artifact.up_to_date(u, "abc"), storage.begin_artifact):
        with pytest.raises(CorruptFileError) as caught:
            read(uri)
        assert str(caught.value).startswith(f"{manifest} is corrupt (")
        assert f"the artifact at {uri} is not taken as complete; delete {uri} to rebuild it" in str(caught.value)
    assert _files(str(tmp_path)) == before  # no staging folder, nothing rewritten


def test_stages_whose_parent_manifest_is_not_json_fail_before_anything_is_written(tokenizer_dir, model_dir, tmp_path):
    from alloylm.merge.stage import merge_stage
    from alloylm.train.launcher import train_stage

    config = validate_config(_run_config(str(tmp_path), tokenizer_dir, other=model_dir))
    parent = os.path.join(config.run_uri, "stages", "cpt")
    shutil.copytree(model_dir, parent)
    manifest = os.path.join(parent, "manifest.json")
    with open(manifest, "w", encoding="utf-8") as f:
        f.write('{"kind": "stage", "fingerprint": "0123')  # cut short mid-write
    before = _files(config.run_uri)
    for run_stage, name in ((train_stage, "child"), (merge_stage, "merged")):
        with pytest.raises(CorruptFileError, match=f"^{manifest} is corrupt \\(not valid JSON: "):
            run_stage(config, name)
    assert _files(config.run_uri) == before  # no tokenizer, data, staging or stage folder


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


def test_load_tokenizer_names_a_missing_or_truncated_tokenizer_json(tokenizer_dir, tmp_path):
    folder = str(tmp_path / "tokenizer")
    shutil.copytree(tokenizer_dir, folder)
    tokenizer_json = os.path.join(folder, "tokenizer.json")
    _truncate(tokenizer_json)
    with pytest.raises(CorruptFileError, match=f"{tokenizer_json} is truncated or corrupt \\(not valid JSON: "):
        load_tokenizer(folder)
    os.remove(tokenizer_json)
    with pytest.raises(CorruptFileError, match=f"{tokenizer_json} is missing: the tokenizer folder {folder} holds "):
        load_tokenizer(folder)


@pytest.mark.s3
def test_a_tokenizer_folder_on_s3_without_tokenizer_json_is_named(tokenizer_dir, s3_bucket):
    from alloylm.models import check_tokenizer_folder

    uri = f"s3://{s3_bucket}/run/tokenizer"
    storage.upload_dir(tokenizer_dir, uri)
    check_tokenizer_folder(uri)  # whole: no complaint
    storage.remove(storage.join(uri, "tokenizer.json"))
    with pytest.raises(CorruptFileError, match=f"^{uri}/tokenizer.json is missing: the tokenizer folder {uri} holds "):
        check_tokenizer_folder(uri)


def test_the_runs_tokenizer_without_tokenizer_json_is_refused_not_reused(tokenizer_dir, tmp_path):
    from alloylm.data.prepare import prepare_tokenizer

    config = validate_config(_run_config(str(tmp_path), tokenizer_dir))
    prepare_tokenizer(config)  # the artifact, complete
    tokenizer_json = os.path.join(config.run_uri, "tokenizer", "tokenizer.json")
    os.remove(tokenizer_json)
    before = _files(config.run_uri)
    with pytest.raises(CorruptFileError) as caught:
        prepare_tokenizer(config)  # every step that tokenizes (data, training) starts here
    assert str(caught.value).startswith(f"{tokenizer_json} is missing")
    assert f"delete {os.path.dirname(tokenizer_json)} to rebuild it" in str(caught.value)
    assert _files(config.run_uri) == before


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def checkpoints(tokenizer_dir, tmp_path) -> tuple[str, str]:
    """Two Ray Train checkpoint folders (older, newer) each holding a real HF Trainer checkpoint
    (steps 2 and 4 of a pico model), laid out as RayTrainReportCallback uploads them."""
    import torch
    from transformers import Trainer, TrainingArguments

    tokenizer = load_tokenizer(tokenizer_dir)
    ids = torch.tensor(tokenizer(_CORPUS[0])["input_ids"][:16])
    rows = [{"input_ids": ids, "labels": ids}] * 16
    output = tmp_path / "trainer"
    arguments = TrainingArguments(
        output_dir=str(output), max_steps=4, save_strategy="steps", save_steps=2, per_device_train_batch_size=2,
        use_cpu=True, report_to=[], disable_tqdm=True,
    )
    Trainer(model=build_model("pico-llama", tokenizer, seed=0), args=arguments, train_dataset=rows).train()
    folders = []
    for step in (2, 4):
        folder = tmp_path / "experiment" / f"checkpoint_00000{step}"
        shutil.copytree(output / f"checkpoint-{step}", folder / "checkpoint")
        folders.append(str(folder))
    return folders[0], folders[1]


def test_checkpoint_choice_warns_naming_the_file_or_fails_naming_every_file(checkpoints, tmp_path, caplog):
    """The choice every worker makes before resuming (`alloylm.train.worker`), without Ray."""
    import ray.train

    from alloylm.train.worker import copy_first_whole_checkpoint

    older, newer = checkpoints
    bad = os.path.join(newer, "checkpoint", "optimizer.pt")
    _truncate(bad)
    candidates = [ray.train.Checkpoint(newer), ray.train.Checkpoint(older)]  # newest first
    with caplog.at_level(logging.WARNING, logger="alloylm.train"):
        chosen = copy_first_whole_checkpoint(candidates, str(tmp_path / "work1"), "cpt")
    assert os.path.basename(chosen) == "checkpoint-2"
    assert sorted(os.listdir(chosen)) == sorted(os.listdir(os.path.join(older, "checkpoint")))
    assert f"{bad} is truncated or corrupt (not a whole PyTorch archive: " in caplog.text

    also_bad = os.path.join(older, "checkpoint", "rng_state.pth")
    _truncate(also_bad, keep=10)
    workdir = tmp_path / "work2"
    workdir.mkdir()
    with pytest.raises(StageError) as caught:
        copy_first_whole_checkpoint(candidates, str(workdir), "cpt")
    assert bad in str(caught.value) and also_bad in str(caught.value)
    assert f"delete {os.path.dirname(newer)} to train the stage from the start" in str(caught.value)
    assert not os.listdir(workdir)  # nothing copied to resume from


@pytest.mark.s3
def test_on_s3_every_rank_checks_every_file_and_fetches_its_own(checkpoints, s3_bucket, tmp_path, caplog, monkeypatch):
    """The check reads where the checkpoint is stored (the ends of the files, no download), so
    every rank judges every rank's files and all pick the same checkpoint; then each downloads only
    what it resumes from: its own ZeRO shards, and under DeepSpeed no weights file."""
    import ray.train
    import torch

    from alloylm.train.worker import checkpoint_files_for, copy_first_whole_checkpoint

    candidates = []
    for folder in reversed(checkpoints):  # newest first
        for rank in (0, 1):
            shard = os.path.join(folder, "checkpoint", "global_step", f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
            os.makedirs(os.path.dirname(shard), exist_ok=True)
            torch.save({"rank": rank, "states": torch.zeros(64)}, shard)
        uri = f"s3://{s3_bucket}/experiment/{os.path.basename(folder)}"
        storage.upload_dir(folder, uri)
        fs, path = storage.arrow_filesystem(uri)
        candidates.append(ray.train.Checkpoint(path=path, filesystem=fs))
    everything = copy_first_whole_checkpoint(candidates, str(tmp_path / "all"), "cpt")
    rank1 = copy_first_whole_checkpoint(candidates, str(tmp_path / "rank1"), "cpt", wanted=checkpoint_files_for(1, deepspeed=True))
    assert os.path.basename(everything) == os.path.basename(rank1) == "checkpoint-4"
    got = {os.path.relpath(os.path.join(d, f), rank1) for d, _, fs in os.walk(rank1) for f in fs}
    assert got == {os.path.relpath(os.path.join(d, f), everything) for d, _, fs in os.walk(everything) for f in fs} - {
        "global_step/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", "model.safetensors"
    }
    assert "global_step/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt" in got and "trainer_state.json" in got

    # A read that fails is retried, and never taken for a file cut short: a rank whose reads were
    # throttled would have resumed from an older checkpoint than the others.
    fs, _ = storage.fsspec_filesystem(f"s3://{s3_bucket}/experiment")
    original, failures = fs.cat_file, {"left": 2}

    def flaky(path, *args, **kwargs):
        if failures["left"]:
            failures["left"] -= 1
            raise ConnectionError("connection reset by peer (injected)")
        return original(path, *args, **kwargs)

    monkeypatch.setattr(fs, "cat_file", flaky)  # fsspec keeps one instance per endpoint: the check's own
    monkeypatch.setenv(storage.RETRY_WINDOW_ENV, "30")
    retried = copy_first_whole_checkpoint(candidates, str(tmp_path / "retried"), "cpt", wanted=checkpoint_files_for(1, deepspeed=True))
    assert os.path.basename(retried) == "checkpoint-4" and failures["left"] == 0
    failures["left"] = 10**9
    monkeypatch.setenv(storage.RETRY_WINDOW_ENV, "0")
    with pytest.raises(storage.StorageError, match="cannot read .*connection reset by peer"):
        copy_first_whole_checkpoint(candidates, str(tmp_path / "unreachable"), "cpt", wanted=checkpoint_files_for(1, deepspeed=True))
    failures["left"] = 0

    # Rank 0's shard of the newer checkpoint cut short in storage: rank 1, which does not fetch it,
    # falls back to the older checkpoint too.
    def put(uri: str, data: bytes) -> None:
        fs, path = storage.fsspec_filesystem(uri)
        fs.pipe(path, data)
        fs.invalidate_cache()

    newer_shard = storage.join(f"s3://{s3_bucket}/experiment/{os.path.basename(checkpoints[1])}", "checkpoint", "global_step", "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt")
    shard = storage.read_bytes(newer_shard)
    put(newer_shard, shard[: len(shard) // 2])
    with caplog.at_level(logging.WARNING, logger="alloylm.train"):
        chosen = copy_first_whole_checkpoint(candidates, str(tmp_path / "again"), "cpt", wanted=checkpoint_files_for(1, deepspeed=True))
    assert os.path.basename(chosen) == "checkpoint-2"
    assert f"{newer_shard} is truncated or corrupt (not a whole PyTorch archive: " in caplog.text

    # A weights file cut short in storage is found from its header, without downloading it.
    older_weights = storage.join(f"s3://{s3_bucket}/experiment/{os.path.basename(checkpoints[0])}", "checkpoint", "model.safetensors")
    whole = storage.read_bytes(older_weights)
    put(older_weights, whole[: len(whole) - 10])
    with pytest.raises(StageError) as caught:
        copy_first_whole_checkpoint(candidates, str(tmp_path / "none"), "cpt", wanted=checkpoint_files_for(1, deepspeed=True))
    assert newer_shard in str(caught.value)
    assert f"{older_weights} is truncated or corrupt ({len(whole) - 10} bytes where its header says {len(whole)})" in str(caught.value)


def test_a_checkpoint_missing_a_ranks_zero_shard_is_passed_over_naming_it(checkpoints, tmp_path, caplog):
    """Each rank fetches only its own ZeRO shards, so every rank checks that every rank's are
    there; a checkpoint without one is passed over on all ranks alike, the missing file named."""
    import ray.train
    import torch

    from alloylm.train.worker import checkpoint_files_for, checkpoint_problem, copy_first_whole_checkpoint

    older, newer = checkpoints
    shards = {older: (0, 1), newer: (0,)}  # the newer one lost rank 1's shard
    for folder, ranks in shards.items():
        for rank in ranks:
            shard = os.path.join(folder, "checkpoint", "global_step4", f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
            os.makedirs(os.path.dirname(shard), exist_ok=True)
            torch.save({"rank": rank}, shard)
    candidates = [ray.train.Checkpoint(newer), ray.train.Checkpoint(older)]
    for rank in (0, 1):
        with caplog.at_level(logging.WARNING, logger="alloylm.train"):
            chosen = copy_first_whole_checkpoint(
                candidates, str(tmp_path / f"rank{rank}"), "cpt", wanted=checkpoint_files_for(rank, deepspeed=True), world_size=2
            )
        assert os.path.basename(chosen) == "checkpoint-2", rank
    missing = os.path.join(newer, "checkpoint", "global_step4", "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    assert f"{missing} is missing: a checkpoint of this stage has one per worker" in caplog.text

    # Without the world size, a gap among the ranks present is found all the same.
    gone = os.path.join(older, "checkpoint", "global_step4", "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    os.remove(gone)
    assert checkpoint_problem(os.path.join(older, "checkpoint")) == f"{gone} is missing: a checkpoint of this stage has one per worker"
    assert checkpoint_problem(os.path.join(newer, "checkpoint")) is None  # rank 0's alone: nothing says there were more


# Each rank runs this in its own process: a real gloo group of 2, as Ray Train's workers form one.
_CHOOSE = """
import json, sys
import torch.distributed as dist
from alloylm.errors import StageError
from alloylm.train.worker import _same_choice_on_every_rank
rank, store, choices = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2)
for choice in choices:
    try:
        _same_choice_on_every_rank("cpt", choice)
        print("agreed")
    except StageError as err:
        print(err)
dist.destroy_process_group()
"""


def test_ranks_that_chose_different_checkpoints_fail_the_attempt_on_every_rank(tmp_path):
    """Each rank picks its checkpoint alone; ranks resumed from different steps would train on
    mismatched states (under DeepSpeed, hang in the first collective). So the choices are compared,
    and a disagreement fails every rank, naming each rank's choice."""
    import json
    import subprocess
    import sys

    choices = {  # per rank: the same checkpoint, then different ones, then one of them none
        0: ["/w/checkpoint-8", "/w/checkpoint-8", None],
        1: ["/w/checkpoint-8", "/w/checkpoint-4", "/w/checkpoint-4"],
    }
    store = str(tmp_path / "store")
    ranks = [
        subprocess.Popen([sys.executable, "-c", _CHOOSE, str(rank), store, json.dumps(choices[rank])], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in (0, 1)
    ]
    outputs = [rank.communicate(timeout=300) for rank in ranks]
    assert all(rank.returncode == 0 for rank in ranks), [err[-2000:] for _, err in outputs]
    for out, _ in outputs:
        assert out.splitlines() == [
            "agreed",
            "stage 'cpt': the workers chose different checkpoints to resume from (rank 0: checkpoint-8, rank 1: checkpoint-4); see each worker's log for why",
            "stage 'cpt': the workers chose different checkpoints to resume from (rank 0: none, rank 1: checkpoint-4); see each worker's log for why",
        ]


def test_a_checkpoint_at_the_last_step_is_passed_over(checkpoints, tmp_path, caplog):
    """A stage that died after its last checkpoint (while saving the model) resumed from it and
    trained one step past max_steps (the Trainer checks the step count only after a step). It now
    resumes from the checkpoint before, or from the start when there is none."""
    import ray.train

    from alloylm.train.worker import copy_first_whole_checkpoint

    older, newer = checkpoints  # steps 2 and 4
    candidates = [ray.train.Checkpoint(newer), ray.train.Checkpoint(older)]
    assert os.path.basename(copy_first_whole_checkpoint(candidates, str(tmp_path / "w1"), "cpt", below_step=5)) == "checkpoint-4"
    with caplog.at_level(logging.WARNING, logger="alloylm.train"):
        chosen = copy_first_whole_checkpoint(candidates, str(tmp_path / "w2"), "cpt", below_step=4)
    assert os.path.basename(chosen) == "checkpoint-2"
    assert "is at the stage's last step (4); resuming from the one before it" in caplog.text
    workdir = tmp_path / "w3"
    workdir.mkdir()
    assert copy_first_whole_checkpoint(candidates, str(workdir), "cpt", below_step=2) is None  # from the start
    assert not os.listdir(workdir)


# ---------------------------------------------------------------------------------------------
# Stages on Ray: a parent stage whose weights are truncated
# ---------------------------------------------------------------------------------------------


def test_stages_with_a_parent_whose_weights_are_truncated_fail_naming_the_file(ray_cluster, tokenizer_dir, model_dir, tmp_path):
    from alloylm.merge.stage import merge_stage
    from alloylm.train.launcher import train_stage

    config = validate_config(_run_config(str(tmp_path), tokenizer_dir, other=model_dir))
    parent = os.path.join(config.run_uri, "stages", "cpt")
    with artifact.begin(parent, "parent-fingerprint") as building:  # stage cpt's finished artifact
        shutil.copytree(model_dir, building.staging_uri, dirs_exist_ok=True)
        building.commit({"kind": "stage", "name": "cpt"})
    weights = os.path.join(parent, "model.safetensors")
    _truncate(weights)
    for run_stage, name in ((train_stage, "child"), (merge_stage, "merged")):
        before = _files(config.run_uri)  # the child's tokenizer and data are prepared by the first
        with pytest.raises(StageError) as caught:
            run_stage(config, name)
        message = str(caught.value)
        assert message.startswith(f"stage {name!r}: its parent 'cpt': {weights} is truncated or corrupt (safetensors: ")
        assert f"retrain stage 'cpt' (delete {parent} first" in message
        # Refused on the driver before the stage's artifact or Ray Train's run folder exists.
        assert not os.path.exists(os.path.join(config.run_uri, "stages", name))
        assert not os.path.exists(os.path.join(config.run_uri, "checkpoints"))
        assert {f for f in _files(config.run_uri) - before if not f.startswith(("tokenizer", "data"))} == set()
