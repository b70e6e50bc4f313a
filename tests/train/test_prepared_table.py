"""Reading a prepared data set's shards inside a training worker (local files, no cluster)."""

from __future__ import annotations

import io
import uuid

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alloylm.train.data import check_prepared_columns, read_prepared_table


def _shard(folder, name: str, rows: dict) -> None:
    (folder / "shards").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(rows), folder / "shards" / name)


def test_every_shard_is_read_with_only_the_asked_columns(tmp_path):
    _shard(tmp_path, "part-0.parquet", {"prompt": ["a", "b"], "chosen": ["x", "y"], "extra": [1, 2]})
    _shard(tmp_path, "part-1.parquet", {"prompt": ["c"], "chosen": ["z"], "extra": [3]})
    (tmp_path / "shards" / "_SUCCESS").write_text("")  # not a parquet file: skipped
    pq.write_table(pa.table({"prompt": ["beside"], "chosen": ["shards"]}), tmp_path / "sample.parquet")  # not a shard
    table = read_prepared_table(str(tmp_path), ["prompt", "chosen"])
    assert table.column_names == ["prompt", "chosen"]
    assert sorted(table.column("prompt").to_pylist()) == ["a", "b", "c"]
    assert table.num_rows == 3


def test_a_missing_column_names_the_shard_and_its_columns(tmp_path):
    _shard(tmp_path, "part-0.parquet", {"messages": ["m"], "id": [1]})
    with pytest.raises(ValueError, match=r"part-0.parquet: the data has no column\(s\) prompt, chosen \(columns: messages, id\)"):
        read_prepared_table(str(tmp_path), ["prompt", "chosen", "messages"])


def test_the_drivers_check_reads_one_footer_not_the_data(tmp_path):
    """The driver checks a stage's columns before training: from the first shard's footer alone, so
    a CPT corpus (terabytes at scale) is never read there. The shards after it are not even opened."""
    _shard(tmp_path, "part-0.parquet", {"input_ids": [[1, 2], [3]], "attention_mask": [[1, 1], [1]]})
    (tmp_path / "shards" / "part-1.parquet").write_bytes(b"not parquet at all")
    check_prepared_columns(str(tmp_path), ["input_ids"])
    with pytest.raises(ValueError, match=r"part-0.parquet: the data has no column\(s\) messages \(columns: input_ids, attention_mask\)"):
        check_prepared_columns(str(tmp_path), ["messages"])
    with pytest.raises(ValueError, match="part-1.parquet"):  # the workers' read opens every shard
        read_prepared_table(str(tmp_path), ["input_ids"])
    (tmp_path / "shards" / "part-0.parquet").write_bytes(b"PAR1 cut short")  # a first shard that is not whole: named
    with pytest.raises(ValueError, match=r"part-0.parquet: .*Parquet"):
        check_prepared_columns(str(tmp_path), ["input_ids"])


def test_no_shards_is_an_error_naming_the_folder(tmp_path):
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=f"no parquet shards under {tmp_path}/shards"):
        read_prepared_table(str(tmp_path), ["prompt"])


def test_remote_shards_are_read_through_their_own_filesystem():
    """A remote (fsspec memory://) data set: the path on that filesystem is not a local path, so
    each shard must be read with the filesystem storage.arrow_filesystem returned for it."""
    fs = fsspec.filesystem("memory")
    root = f"/prepared-{uuid.uuid4().hex}"
    for name, prompts in (("part-0.parquet", ["a", "b"]), ("part-1.parquet", ["c"])):
        buffer = io.BytesIO()
        pq.write_table(pa.table({"prompt": prompts, "extra": list(range(len(prompts)))}), buffer)
        fs.pipe(f"{root}/shards/{name}", buffer.getvalue())
    try:
        table = read_prepared_table(f"memory://{root}", ["prompt"])
    finally:
        fs.rm(root, recursive=True)
    assert table.column_names == ["prompt"]
    assert table.column("prompt").to_pylist() == ["a", "b", "c"]


def test_orpo_pads_with_eos_when_the_tokenizer_has_no_pad_token(tmp_path):
    """Hub tokenizers such as Llama 3.1's have no pad token. TRL's DPOTrainer pads with EOS then;
    its experimental ORPOTrainer raised on the first batch ("the tokenizer is not configured with
    a padding token"), after every worker had loaded the model."""
    from types import SimpleNamespace

    from alloylm.corpus import BuiltinCorpusOptions, generate_builtin
    from alloylm.models import build_model, train_tokenizer
    from alloylm.train import orpo

    texts = [r["text"] for r in generate_builtin("general-text", BuiltinCorpusOptions(general_documents=20))]
    tokenizer = train_tokenizer(texts, vocab_size=400, model_max_length=128)
    model = build_model("pico-llama", tokenizer, seed=0)
    tokenizer.pad_token = None
    assert tokenizer.pad_token_id is None
    user = [{"role": "user", "content": "Which material is tougher?"}]
    _shard(tmp_path, "part-0.parquet", {
        "prompt": [user, user],
        "chosen": [[{"role": "assistant", "content": "Nacre, by far."}], [{"role": "assistant", "content": "Bone."}]],
        "rejected": [[{"role": "assistant", "content": "Chalk."}], [{"role": "assistant", "content": "Glass, I think."}]],
    })
    stage = SimpleNamespace(beta=0.1, training=SimpleNamespace(max_length=64))
    arguments = {"output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 2, "max_steps": 1, "use_cpu": True, "report_to": "none",
                 "include_num_input_tokens_seen": "non_padding", "save_strategy": "no",
                 # as the stage's worker sets them: TRL's configs default to checkpointing, under its deprecated name
                 "activation_checkpointing": False}
    trainer = orpo.build_trainer(stage, SimpleNamespace(data_uri=str(tmp_path)), model, tokenizer, arguments)
    batch = next(iter(trainer.get_train_dataloader()))  # padded to the longer answer
    assert tokenizer.pad_token == tokenizer.eos_token and model.config.pad_token_id == tokenizer.eos_token_id
    assert batch["chosen_input_ids"].shape[0] == 2
    # The tokens trained on are counted (the Trainer looks for `input_ids`, which ORPO's batches
    # lack): every token of both prompt+answer sequences, padding not.
    trainer.train()
    trained = int(batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum())
    assert trained < batch["chosen_attention_mask"].numel() + batch["rejected_attention_mask"].numel()  # there was padding
    assert trainer.state.num_input_tokens_seen == trained
