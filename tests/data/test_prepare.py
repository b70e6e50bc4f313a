"""Data preparation on a real local Ray cluster: files, built-in, Hugging Face and S3 sources,
bad input counted by reason, deduplication, packing, manifests, reruns and overwrite rules."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alloylm import storage
from alloylm.config import validate_config
from alloylm.data import minhash
from alloylm.data.clean import normalise_text
from alloylm.data.prepare import BATCHES_PER_TOKENIZER_TASK, DataPreparationError, prepare_all, prepare_dataset, prepare_tokenizer
from alloylm.data.sources import SourceError
from alloylm.data.tokenize import pack_token_ids
from alloylm.models.loading import load_tokenizer
from alloylm.models.tokenizer import train_tokenizer

SMALL_BUILTIN = {"materials": 4, "documents_per_material": 2, "general_documents": 40, "general_chats": 40,
                 "heldout_documents": 4, "general_heldout_documents": 8}
UNIQUE_DOCS = [
    "Spider silk draglines combine strength and extensibility in a way few fibres match.",
    "Nacre owes its toughness to a brick-and-mortar arrangement of aragonite tablets.",
    "Bone remodels continuously, replacing damaged tissue with new mineralised collagen.",
    "Wood cell walls layer cellulose microfibrils at angles that tune stiffness.",
    "Mussel byssus threads grade from stiff to soft along their length.",
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> str:
    from alloylm.corpus import BuiltinCorpusOptions, generate_builtin

    texts = [row["text"] for row in generate_builtin("general-text", BuiltinCorpusOptions(**SMALL_BUILTIN))] + UNIQUE_DOCS * 3
    path = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(texts, vocab_size=400).save_pretrained(str(path))
    return str(path)


def make_config(storage_uri: str, datasets: dict, tokenizer_dir: str | None = None, **extra):
    raw = {
        "experiment": "t",
        "storage": storage_uri,
        "builtin": SMALL_BUILTIN,
        "tokenizer": {"from": tokenizer_dir} if tokenizer_dir else {"train": {"vocab_size": 400}},
        "datasets": datasets,
        "data": {"block_size": 32, "tokenizer_actors": 1},
        **extra,
    }
    return validate_config(raw)


def read_shards(uri: str) -> pa.Table:
    files = [f for f in storage.list_files(storage.join(uri, "shards")) if f.endswith(".parquet")]
    tables = []
    for f in files:
        fs, path = storage.arrow_filesystem(f)
        tables.append(pq.read_table(path, filesystem=fs))
    return pa.concat_tables(tables, promote_options="default")


# ---------------------------------------------------------------------------------------------
# A messy corpus folder, a chat JSONL with a malformed line, a Hugging Face data set on disk
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def messy_inputs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("inputs")
    corpus = root / "corpus"
    (corpus / "sub").mkdir(parents=True)
    for i, text in enumerate(UNIQUE_DOCS[:3]):
        (corpus / f"doc{i}.txt").write_text(text * 4)
    (corpus / "sub" / "notes.md").write_text("# Notes\r\n\r\n\r\n\r\n" + UNIQUE_DOCS[3] * 4 + "   \n")
    (corpus / "sub" / "doc0.txt").write_text(UNIQUE_DOCS[4] * 4)  # same file name in another folder
    (corpus / "copy.txt").write_text(UNIQUE_DOCS[0] * 4)  # exact duplicate of doc0.txt
    (corpus / "near.txt").write_text((UNIQUE_DOCS[1] * 4).replace("toughness", "toughnes"))  # near duplicate of doc1
    (corpus / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    (corpus / "latin1.txt").write_bytes("Caf\xe9 cr\xe8me, na\xefve fa\xe7ade".encode("latin-1") * 3)
    (corpus / "empty.txt").write_bytes(b"")
    (corpus / "tiny.txt").write_text("short")
    rows = [{"text": "Keratin in hooves resists impact through tubules and intertubular matrix.", "id": "j1"},
            {"text": "Enamel prisms interweave so that cracks deflect instead of running straight.", "id": "j2"}]
    (corpus / "more.jsonl").write_text(json.dumps(rows[0]) + "\n{not json\n" + json.dumps(rows[1]) + "\n")

    chats = root / "chats.jsonl"
    lines = [
        json.dumps({"q": "What is nacre?", "a": "A composite of aragonite and protein.", "id": "c1"}),
        '{"q": "broken", ',
        json.dumps({"q": "What is silk?", "id": "c3"}),  # no answer column
        json.dumps({"q": "What is bone?", "a": "A mineralised collagen composite.", "id": "c4"}),
    ]
    chats.write_text("\n".join(lines) + "\n")

    import datasets

    hf = datasets.Dataset.from_dict(
        {
            "prompt": ["Which is tougher?", "Name a stiff material."],
            "chosen": ["Nacre is tougher than pure aragonite.", "Enamel is very stiff."],
            "rejected": ["They are the same.", "Jelly."],
        }
    )
    hf.save_to_disk(str(root / "hf_prefs"))
    return root


@pytest.fixture(scope="module")
def messy_run(ray_cluster, messy_inputs, tokenizer_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    config = make_config(
        str(out),
        {
            "corpus": {"source": str(messy_inputs / "corpus"), "format": "text"},
            "chats": {"source": str(messy_inputs / "chats.jsonl"), "format": "chat", "columns": {"user": "q", "assistant": "a"}},
            "prefs": {"source": f"hf:{messy_inputs / 'hf_prefs'}", "format": "preference"},
            "bench": {"source": "builtin:biomaterials-benchmark"},
        },
        tokenizer_dir,
        data={"block_size": 32, "tokenizer_actors": 1, "min_chars": 10},
    )
    return config, prepare_all(config)


def test_corpus_folder_counts_every_document_by_reason(messy_run):
    config, manifests = messy_run
    counts = manifests["corpus"]["counts"]
    # 5 unique documents, 2 JSONL records, and 8 dropped inputs.
    assert counts["dropped"] == {
        "binary": 1,
        "undecodable": 1,
        "empty": 1,
        "too_short": 1,
        "malformed_json": 1,
        "exact_duplicate": 1,
        "near_duplicate": 1,
    }
    assert counts["documents_kept"] == 7
    assert counts["documents_in"] == counts["documents_kept"] + sum(counts["dropped"].values())


def test_problems_file_names_file_and_line(messy_run):
    config, _ = messy_run
    uri = storage.join(config.run_uri, "data", "corpus")
    problems = [json.loads(line) for line in storage.read_text(storage.join(uri, "problems.jsonl")).splitlines()]
    malformed = [p for p in problems if p["reason"] == "malformed_json"]
    assert len(malformed) == 1 and malformed[0]["detail"].split(": ")[0].endswith("more.jsonl:2")
    reasons = {p["reason"]: p for p in problems}
    assert "image.png" in reasons["binary"]["detail"]
    assert "latin1.txt" in reasons["undecodable"]["detail"]
    # The kept copy is the smallest id (the path), whichever order the files were read in.
    assert reasons["exact_duplicate"]["id"].endswith("/doc0.txt") and reasons["exact_duplicate"]["detail"].endswith("/copy.txt")
    assert "tiny.txt" in reasons["too_short"]["detail"]
    assert "near.txt" in reasons["near_duplicate"]["id"] and "doc1.txt" in reasons["near_duplicate"]["detail"]


def test_text_is_packed_into_full_blocks_separated_by_eos(messy_run, tokenizer_dir):
    config, manifests = messy_run
    manifest = manifests["corpus"]
    table = read_shards(storage.join(config.run_uri, "data", "corpus"))
    blocks = np.array(table.column("input_ids").to_pylist())
    assert blocks.shape == (manifest["counts"]["blocks"], 32)
    tokenizer = load_tokenizer(tokenizer_dir)
    flat = blocks.ravel()
    # One EOS after each kept document; all of them except those in the dropped tail are present.
    assert (flat == tokenizer.eos_token_id).sum() in range(manifest["counts"]["documents_kept"] - 1, manifest["counts"]["documents_kept"] + 1)
    text = tokenizer.decode(flat, skip_special_tokens=True)
    assert "brick-and-mortar" in text and "Keratin in hooves" in text
    assert manifest["counts"]["tokens_out"] == blocks.size
    assert 0 <= manifest["counts"]["tokens_dropped_tail"] < 32
    # Normalisation reached the shards: no Windows newlines, no runs of blank lines.
    assert "\r" not in text and "\n\n\n" not in text


def test_chat_jsonl_keeps_good_rows_and_counts_bad_ones(messy_run):
    config, manifests = messy_run
    counts = manifests["chats"]["counts"]
    assert counts["documents_kept"] == 2
    assert counts["dropped"] == {"malformed_json": 1, "missing_field": 1}
    table = read_shards(storage.join(config.run_uri, "data", "chats")).to_pylist()
    assert sorted(r["id"] for r in table) == ["c1", "c4"]
    row = next(r for r in table if r["id"] == "c1")
    assert row["messages"] == [{"role": "user", "content": "What is nacre?"}, {"role": "assistant", "content": "A composite of aragonite and protein."}]
    assert row["text"].count("<|im_start|>") == 2 and row["num_tokens"] > 5
    problems = storage.read_text(storage.join(config.run_uri, "data", "chats", "problems.jsonl"))
    assert "chats.jsonl:2" in problems and "chats.jsonl:3" in problems and "'a'" in problems


def test_hugging_face_preferences_from_disk_use_the_chat_template(messy_run):
    config, manifests = messy_run
    assert manifests["prefs"]["counts"]["documents_kept"] == 2
    rows = read_shards(storage.join(config.run_uri, "data", "prefs")).to_pylist()
    row = next(r for r in rows if r["prompt"][0]["content"] == "Which is tougher?")
    assert row["chosen"] == [{"role": "assistant", "content": "Nacre is tougher than pure aragonite."}]
    assert row["prompt_text"].endswith("<|im_start|>assistant\n")
    assert row["chosen_text"].startswith("Nacre is tougher") and row["rejected_text"].startswith("They are the same.")


def test_benchmark_keeps_its_splits(messy_run):
    config, manifests = messy_run
    rows = read_shards(storage.join(config.run_uri, "data", "bench")).to_pylist()
    assert {r["split"] for r in rows} == {"validation", "test"}
    assert manifests["bench"]["counts"]["by_split"] == {s: sum(r["split"] == s for r in rows) for s in ("test", "validation")}
    mc = [r for r in rows if r["type"] == "multiple_choice"]
    assert mc and all(0 <= r["answer_index"] < len(r["choices"]) for r in mc)


def test_benchmark_items_from_files_that_each_number_from_one_get_ids_of_their_own(ray_cluster, tmp_path, tokenizer_dir):
    """Two files each numbering their items from 1: prepared, then refused by the evaluation
    ("id repeats the item at ..."), once every stage had trained."""
    from alloylm.evaluate.benchmark import load_benchmark

    folder = tmp_path / "bench"
    folder.mkdir()
    for part, question in (("a", "Which is tougher?"), ("b", "Which is stiffer?")):
        item = {"id": 1, "question": question, "type": "multiple_choice", "choices": ["nacre", "chalk"], "answer_index": 0, "split": "test"}
        (folder / f"{part}.jsonl").write_text(json.dumps(item) + "\n")
    config = make_config(str(tmp_path / "runs"), {"bench": {"source": str(folder), "format": "benchmark"}}, tokenizer_dir)
    manifest = prepare_all(config)["bench"]
    assert manifest["counts"]["ids_renamed"] == 1
    items = load_benchmark(storage.join(config.run_uri, "data", "bench"))
    assert [(i.id, i.question) for i in items] == [("1", "Which is tougher?"), ("1#2", "Which is stiffer?")]


def test_manifest_is_last_and_resolved_config_is_saved(messy_run):
    config, manifests = messy_run
    uri = storage.join(config.run_uri, "data", "corpus")
    assert storage.is_complete(uri)
    saved = storage.read_text(storage.join(uri, "resolved_config.yaml"))
    assert "experiment: t" in saved and "block_size: 32" in saved
    assert manifests["corpus"]["fingerprint"] and manifests["corpus"]["shards"]
    assert not any(".staging" in f for f in storage.list_files(config.run_uri) if not f.startswith(str(Path(config.run_uri) / ".staging")))


def test_every_manifest_says_where_its_time_went(messy_run):
    from alloylm.data.prepare import DATA_PHASES

    _, manifests = messy_run
    text_phases = ["read_clean", "dedup", "tokenize", "write_shards", "tails", "finish"]
    rendered_phases = ["read_clean", "dedup", "tokenize", "write_shards", "finish"]
    for name, manifest in manifests.items():
        if name == "tokenizer":
            continue
        breakdown = manifest["breakdown"]
        assert list(breakdown) == (text_phases if manifest["format"] == "text" else rendered_phases), name
        assert list(breakdown) == [p for p in DATA_PHASES if p in breakdown]  # in the documented order
        assert all(seconds >= 0 for seconds in breakdown.values())
        # The phases cover the data set's time from start to the manifest (rounding aside).
        assert sum(breakdown.values()) == pytest.approx(manifest["seconds"], abs=0.02), (name, breakdown, manifest["seconds"])


def test_rerun_is_skipped_and_changed_input_is_not_overwritten(messy_run):
    config, manifests = messy_run
    tokenizer_manifest = storage.read_manifest(storage.join(config.run_uri, "tokenizer"))
    again = prepare_dataset(config, "corpus", tokenizer_manifest)
    assert again == manifests["corpus"]  # reused as is: same created_at, nothing rebuilt
    changed = validate_config({**config.model_dump(mode="json", by_alias=True), "data": {**config.data.model_dump(), "block_size": 16}})
    with pytest.raises(storage.ArtifactExistsError, match="overwrite"):
        prepare_dataset(changed, "corpus", tokenizer_manifest)
    assert storage.read_manifest(storage.join(config.run_uri, "data", "corpus")) == manifests["corpus"]
    # Settings only text documents go through (packing, length filter, near dedup) leave the
    # other formats up to date: nothing trained on them is trained again.
    text_only = {"block_size": 16, "tail": "pad", "min_chars": 3, "max_chars": 500, "near_dedup": {"enabled": False}}
    changed = validate_config({**config.model_dump(mode="json", by_alias=True), "data": {**config.data.model_dump(), **text_only}})
    for name in ("chats", "prefs", "bench"):
        assert prepare_dataset(changed, name, tokenizer_manifest) == manifests[name], name
    with pytest.raises(storage.ArtifactExistsError, match="overwrite"):
        prepare_dataset(changed, "corpus", tokenizer_manifest)
    # Files that are not read (hidden ones: a git checkout's .git/, notebook checkpoints) are not
    # in the fingerprint either: they change with no document changing.
    hidden = Path(config.datasets["corpus"].sources[0]) / ".ipynb_checkpoints" / "doc0-checkpoint.txt"
    hidden.parent.mkdir()
    corpus_uri = storage.join(config.run_uri, "data", "corpus")
    try:
        hidden.write_text("autosaved")
        assert prepare_dataset(config, "corpus", tokenizer_manifest) == manifests["corpus"]
        # Prepared before that rule (its fingerprint took the hidden file): still up to date.
        made_before = {**manifests["corpus"], "fingerprint": _fingerprint_made_before(config, "corpus", tokenizer_manifest["fingerprint"])}
        storage.write_text(storage.join(corpus_uri, storage.MANIFEST_NAME), json.dumps(made_before))
        assert prepare_dataset(config, "corpus", tokenizer_manifest) == made_before
    finally:
        storage.write_text(storage.join(corpus_uri, storage.MANIFEST_NAME), json.dumps(manifests["corpus"]))
        hidden.unlink()
        hidden.parent.rmdir()


# ---------------------------------------------------------------------------------------------
# Errors before any work
# ---------------------------------------------------------------------------------------------


def test_missing_input_path_is_named(ray_cluster, tmp_path, tokenizer_dir):
    config = make_config(str(tmp_path / "runs"), {"x": {"source": str(tmp_path / "nowhere"), "format": "text"}}, tokenizer_dir)
    with pytest.raises(SourceError, match="nowhere"):
        prepare_all(config)
    assert not storage.exists(storage.join(config.run_uri, "data", "x"))


def test_preference_data_without_rejected_fails_naming_the_column(ray_cluster, tmp_path, tokenizer_dir):
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": f"a{i}"}) + "\n" for i in range(3)))
    config = make_config(str(tmp_path / "runs"), {"p": {"source": str(path), "format": "preference"}}, tokenizer_dir)
    with pytest.raises(DataPreparationError) as info:
        prepare_all(config)
    assert "'rejected'" in str(info.value) and "prefs.jsonl:1" in str(info.value)
    assert not storage.is_complete(storage.join(config.run_uri, "data", "p"))


def test_unreachable_s3_endpoint_fails_clearly(ray_cluster, tmp_path, tokenizer_dir, monkeypatch):
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    config = make_config(str(tmp_path / "runs"), {"x": {"source": "s3://nobucket/corpus/", "format": "text"}}, tokenizer_dir)
    with pytest.raises(SourceError, match="s3://nobucket/corpus"):
        prepare_all(config)


def test_cli_data_exit_code_and_message_on_missing_path(tmp_path):
    import subprocess
    import sys

    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"experiment: t\nstorage: {tmp_path}/runs\ntokenizer: {{train: {{}}}}\n"
                   f"datasets:\n  x: {{source: {tmp_path}/missing, format: text}}\n")
    result = subprocess.run([sys.executable, "-m", "alloylm.cli", "data", str(cfg)], capture_output=True, text=True,
                            env={**os.environ, "RAY_ADDRESS": ""}, timeout=600)
    assert result.returncode == 1
    assert f"{tmp_path}/missing" in result.stderr
    assert "Ray instance" not in result.stderr, result.stderr[-2000:]  # the path is checked before a cluster starts


# ---------------------------------------------------------------------------------------------
# S3 end to end, and the tokenizer trained on the run's data
# ---------------------------------------------------------------------------------------------


@pytest.mark.s3
def test_s3_source_and_s3_storage(ray_cluster, s3_bucket, messy_inputs, tokenizer_dir):
    prefix = f"s3://{s3_bucket}/inputs/corpus"
    storage.upload_dir(str(messy_inputs / "corpus"), prefix)
    config = make_config(f"s3://{s3_bucket}/runs", {"corpus": {"source": prefix, "format": "text"}}, tokenizer_dir,
                         data={"block_size": 32, "tokenizer_actors": 1, "min_chars": 10})
    manifest = prepare_all(config)["corpus"]
    uri = f"s3://{s3_bucket}/runs/t/data/corpus"
    assert storage.read_manifest(uri) == manifest
    assert manifest["counts"]["documents_kept"] == 7
    assert read_shards(uri).num_rows == manifest["counts"]["blocks"]
    assert storage.is_complete(f"s3://{s3_bucket}/runs/t/tokenizer")


def test_trained_tokenizer_and_builtin_sources(ray_cluster, tmp_path):
    config = make_config(
        str(tmp_path / "runs"),
        {
            "general": {"source": "builtin:general-text"},
            "chat": {"source": "builtin:general-chat"},
            # mixed training: the chats as documents of a text data set, in the run's chat template
            "mixed": {"source": ["builtin:general-text", "builtin:general-chat"], "format": "text"},
        },
        data={"block_size": 32, "tokenizer_actors": 1, "tail": "pad"},
    )
    manifests = prepare_all(config)
    mixed = manifests["mixed"]["counts"]
    assert mixed["documents_in"] == manifests["general"]["counts"]["documents_in"] + manifests["chat"]["counts"]["documents_in"]
    documents = pa.concat_tables(
        pq.read_table(storage.arrow_filesystem(f)[1], filesystem=storage.arrow_filesystem(f)[0])
        for f in storage.list_files(storage.join(config.run_uri, "data", "mixed", "documents")) if f.endswith(".parquet")
    ).column("text").to_pylist()
    rendered = [text for text in documents if text.startswith("<|im_start|>")]
    assert rendered and all("<|begin_of_text|>" not in text and "<|im_end|>" in text for text in rendered)
    tok_manifest = storage.read_manifest(storage.join(config.run_uri, "tokenizer"))
    assert tok_manifest["vocab_size"] == 400 and tok_manifest["has_chat_template"]
    tokenizer = load_tokenizer(storage.join(config.run_uri, "tokenizer"))
    assert tokenizer.decode(tokenizer("The capital of", add_special_tokens=False)["input_ids"]) == "The capital of"
    counts = manifests["general"]["counts"]
    assert counts["tokens_dropped_tail"] == 0 and 0 < counts["tail_padded_tokens"] < 32
    table = read_shards(storage.join(config.run_uri, "data", "general"))
    assert table.num_rows == counts["blocks"]
    masks = [m for m in table.column("attention_mask").to_pylist() if m is not None] if "attention_mask" in table.column_names else []
    assert masks and sum(masks[-1]) == 32 - counts["tail_padded_tokens"]
    # The same config again: tokenizer and data sets reused, not rebuilt.
    assert prepare_tokenizer(config) == tok_manifest
    # The tokenizer reads the records as they are: no `data:` setting changes it (nor, through its
    # fingerprint, any data set or model made with it).
    changed = make_config(config.storage, dict(config.model_dump(mode="json", by_alias=True)["datasets"]),
                          data={"block_size": 16, "tokenizer_actors": 1, "tail": "drop", "min_chars": 3})
    assert prepare_tokenizer(changed) == tok_manifest
    assert prepare_dataset(changed, "chat", tok_manifest)["created_at"] == manifests["chat"]["created_at"]
    # A run prepared before the fingerprints took only what each format uses (every `data:`
    # setting in every data set and the tokenizer) is still up to date, as it was made, and stays so
    # when a `data:` setting it does not use changes (the settings it was made with are recorded).
    for name, uri in (("chat", storage.join(config.run_uri, "data", "chat")), (None, storage.join(config.run_uri, "tokenizer"))):
        old = _fingerprint_made_before(config, name, tok_manifest["fingerprint"]) if name else _tokenizer_fingerprint_made_before(config)
        manifest = {**storage.read_manifest(uri), "fingerprint": old}
        storage.write_text(storage.join(uri, storage.MANIFEST_NAME), json.dumps(manifest))
        for now in (config, changed):
            assert (prepare_dataset(now, name, tok_manifest) if name else prepare_tokenizer(now)) == manifest
    mixed_ids = {i for row in read_shards(storage.join(config.run_uri, "data", "mixed")).column("input_ids").to_pylist() for i in row}
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") in mixed_ids  # the template's tokens, not their characters


# ---------------------------------------------------------------------------------------------
# Units
# ---------------------------------------------------------------------------------------------


def test_pack_token_ids_joins_with_eos_and_returns_the_tail():
    blocks, tail = pack_token_ids([[1, 2, 3], [4, 5], [6]], eos_id=0, block_size=4)
    assert blocks.tolist() == [[1, 2, 3, 0], [4, 5, 0, 6]]
    assert tail.tolist() == [0]
    blocks, tail = pack_token_ids([], eos_id=0, block_size=4)
    assert blocks.shape == (0, 4) and tail.size == 0


def test_minhash_finds_near_duplicates_only():
    docs = [UNIQUE_DOCS[0] * 3, (UNIQUE_DOCS[0] * 3).replace("strength", "strengths"), UNIQUE_DOCS[1] * 3, UNIQUE_DOCS[2] * 3]
    signatures = np.stack([minhash.signature(d, 64, 5) for d in docs])
    duplicates = minhash.near_duplicates(["d0", "d1", "d2", "d3"], signatures, threshold=0.8)
    assert duplicates == {"d1": "d0"}
    # Shingles longer than 8 bytes are hashed, not read as one integer. With 12 bytes each edit
    # changes more shingles: the pair overlaps by 0.76 (0.90 with 5), found at a threshold of 0.6.
    longer = minhash.signatures(docs, 64, 12)
    assert minhash.near_duplicates(["d0", "d1", "d2", "d3"], longer, threshold=0.6) == {"d1": "d0"}
    assert minhash.lsh_bands(64, 0.8) in [(8, 8), (16, 4), (4, 16)]
    # Two rows with one id (identical parquet rows read in two blocks of a file): rows are dropped
    # by id, so mapping it to itself would drop both copies.
    same = np.stack([signatures[0], signatures[0], signatures[1]])
    assert minhash.near_duplicates(["d0", "d0", "d1"], same, threshold=0.8) == {"d1": "d0"}


def _estimate_error(first: np.ndarray, second: np.ndarray, true: np.ndarray) -> tuple[float, float]:
    """(mean bias, root-mean-square error over the binomial error of as many permutations) of the
    Jaccard estimates of the signature pairs (first[i], second[i]) against `true`."""
    estimate = (first == second).mean(axis=1)
    binomial = math.sqrt(float(np.mean(true * (1 - true))) / first.shape[1])
    return float(np.mean(estimate - true)), math.sqrt(float(np.mean((estimate - true) ** 2))) / binomial


def test_minhash_estimates_jaccard_with_the_error_of_independent_permutations():
    """The fraction of equal signature values estimates the Jaccard similarity of the shingle sets
    without bias, with the binomial error of 64 independent permutations, and a pair called a
    near-duplicate at 0.8 is one. The hash family two before this one (a*x + b mod 2**61-1, a and
    b < 2**32) failed on this text (the quickstart's general text): 3.2 times the binomial error,
    and 19 of the 27 documents it dropped at 0.8 overlap their match by 0.21-0.69 (over seeds 1-3:
    2.7-3.2 times, against 0.98-1.00 for 64 multiply-add-shift functions, and 0.87-1.00 for one
    permutation hashing). These documents are short (median 195 characters, about 3 shingles a
    bin), so some bins are empty and densification fills them."""
    from alloylm.corpus import BuiltinCorpusOptions, generate_builtin
    from alloylm.data.clean import normalise_record

    texts = [normalise_record(dict(row), "text")["text"] for row in generate_builtin("general-text", BuiltinCorpusOptions())]
    signatures = minhash.signatures(texts, 64, 5)
    shingles = [set(minhash.shingle_hashes(text, 5).tolist()) for text in texts]

    def jaccard(i: int, j: int) -> float:
        return len(shingles[i] & shingles[j]) / len(shingles[i] | shingles[j])

    # Neighbouring documents: overlaps from 0 to 0.47.
    true = np.array([jaccard(i, i + 1) for i in range(len(texts) - 1)])
    bias, error = _estimate_error(signatures[:-1], signatures[1:], true)
    assert abs(bias) < 0.02 and error < 1.3, (bias, error)
    index = {f"{i:04d}": i for i in range(len(texts))}
    duplicates = minhash.near_duplicates(list(index), signatures, threshold=0.8)
    assert all(jaccard(index[dup], index[of]) >= 0.65 for dup, of in duplicates.items()), duplicates


def test_minhash_signatures_of_short_documents_are_densified_consistently():
    """One permutation hashing leaves bins of a short document empty; each takes a value of one of
    its filled bins, chosen by a probe sequence that is the same for every document, so the
    estimates stay unbiased (close pairs of 66-80-byte texts, about one shingle a bin) and a text
    equals itself. Any signature length works, not only powers of two."""
    from alloylm.corpus import BuiltinCorpusOptions, generate_builtin

    texts = [row["text"] for row in generate_builtin("general-text", BuiltinCorpusOptions())][:200]
    short, edited = [t[:80] for t in texts], [t[:70] + "xyz" for t in texts]
    true = np.array([
        len(a & b) / len(a | b)
        for a, b in ((set(minhash.shingle_hashes(x, 5).tolist()), set(minhash.shingle_hashes(y, 5).tolist())) for x, y in zip(short, edited))
    ])
    for num_perm in (64, 50):
        first, second = minhash.signatures(short, num_perm, 5), minhash.signatures(edited, num_perm, 5)
        assert first.shape == (200, num_perm)
        bias, error = _estimate_error(first, second, true)
        assert abs(bias) < 0.03 and error < 1.3, (num_perm, bias, error)
    # A 6-byte text has 2 shingles: 62 of 64 bins borrowed, every value one of its 2 shingles'.
    tiny = minhash.signature("Nacre.", 64, 5)
    own = set((minhash._shingle_hashes64("Nacre.", 5, 1) & np.uint64(0xFFFFFFFF)).astype(np.uint32).tolist())
    assert set(tiny.tolist()) <= own and len(set(tiny.tolist())) == len(own) == 2
    assert (minhash.signatures(["Nacre.", "Nacre."], 64, 5)[0] == tiny).all()
    # Another seed, another hash function: the same document, other values.
    assert (minhash.signature(texts[0], 64, 5, seed=2) != minhash.signature(texts[0], 64, 5)).mean() > 0.9


def test_two_near_duplicates_in_a_bucket_whose_first_member_is_neither_are_found():
    """LSH puts a false positive in the one bucket two near-duplicates share: each member is checked
    against every cluster already in the bucket, not only the bucket's first member (which missed
    the pair: neither resembles it), and joins every cluster it resembles."""
    assert minhash.lsh_bands(8, 0.5) == (4, 2)  # bands: columns 0-1, 2-3, 4-5, 6-7
    signatures = np.array(
        [
            [1, 1, 10, 11, 12, 13, 14, 15],  # a: shares only band 0 with b and c (2 of 8 values)
            [1, 1, 2, 2, 3, 9, 20, 21],  # b and c: 5 of 8 values equal, band 0 their only one in common
            [1, 1, 2, 7, 3, 8, 20, 31],
        ],
        dtype=np.uint32,
    )
    assert minhash.near_duplicates(["a", "b", "c"], signatures, threshold=0.5) == {"c": "b"}
    # d resembles x and y (4 of 8 each), which do not resemble each other; all share band 0 only.
    signatures = np.array(
        [[1, 1, 10, 11, 12, 13, 14, 15], [1, 1, 20, 21, 22, 23, 24, 25], [1, 1, 10, 21, 12, 23, 90, 91]], dtype=np.uint32
    )
    assert minhash.near_duplicates(["x", "y", "d"], signatures, threshold=0.5) == {"x": "d", "y": "d"}


def test_normalise_text():
    assert normalise_text("  a\r\nb \t\n\n\n\nc\x00\ufeff ") == "a\nb\n\nc"
    assert normalise_text("Cafe\u0301") == "Caf\u00e9"


def test_an_edited_source_file_changes_the_fingerprint_and_an_untouched_one_does_not(tmp_path):
    from alloylm.data.prepare import dataset_fingerprint

    folder = tmp_path / "corpus"
    folder.mkdir()
    paper = folder / "a.txt"
    paper.write_text("Spider silk is tough.\n", encoding="utf-8")
    config = make_config(str(tmp_path / "runs"), {"papers": {"source": str(folder), "format": "text"}})
    first = dataset_fingerprint(config, "papers", "tok")
    assert dataset_fingerprint(config, "papers", "tok") == first  # nothing changed
    assert dataset_fingerprint(config, "papers", "other-tokenizer") != first
    stat = paper.stat()
    paper.write_text("Spider silk is TOUGH.\n", encoding="utf-8")  # same size, new content
    os.utime(paper, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    edited = dataset_fingerprint(config, "papers", "tok")
    assert edited != first
    (folder / "b.txt").write_text("Nacre is stiff.\n", encoding="utf-8")  # a file added to the folder
    assert dataset_fingerprint(config, "papers", "tok") not in (first, edited)


def test_builtin_world_settings_change_the_fingerprint_of_builtin_sources_only(tmp_path):
    from alloylm.data.prepare import dataset_fingerprint

    (tmp_path / "mine.txt").write_text("Collagen is hierarchical.\n", encoding="utf-8")
    datasets = {"world": {"source": "builtin:biomaterials-corpus"}, "mine": {"source": str(tmp_path / "mine.txt"), "format": "text"}}
    small = make_config(str(tmp_path / "runs"), datasets)
    larger = make_config(str(tmp_path / "runs"), datasets, builtin={**SMALL_BUILTIN, "materials": SMALL_BUILTIN.get("materials", 4) + 1})
    assert dataset_fingerprint(small, "world", "tok") != dataset_fingerprint(larger, "world", "tok")
    assert dataset_fingerprint(small, "mine", "tok") == dataset_fingerprint(larger, "mine", "tok")


def test_more_short_answer_items_change_only_the_benchmarks_fingerprint(tmp_path):
    """`short_answer_per_fact` is read by the benchmark alone: raising it must not retrain any model,
    and at its default every fingerprint is what it was before the option existed."""
    from alloylm.data.prepare import dataset_fingerprint

    datasets = {"world": {"source": "builtin:biomaterials-corpus"}, "bench": {"source": "builtin:biomaterials-benchmark"}}
    one = make_config(str(tmp_path / "runs"), datasets)
    three = make_config(str(tmp_path / "runs"), datasets, builtin={**SMALL_BUILTIN, "short_answer_per_fact": 3})
    assert dataset_fingerprint(one, "world", "tok") == dataset_fingerprint(three, "world", "tok")
    assert dataset_fingerprint(one, "bench", "tok") != dataset_fingerprint(three, "bench", "tok")
    # The default leaves the option out of the hash entirely.
    from alloylm.artifact import fingerprint

    dataset = one.datasets["world"]
    prep = one.data.model_dump(mode="json", exclude={"tokenizer_actors", "cpus_per_tokenizer_actor"})
    prep["near_dedup"]["family"] = minhash.FAMILY  # a text data set near-deduplicated: which MinHash family
    builtin = {k: v for k, v in one.builtin.model_dump(mode="json").items() if k not in ("short_answer_per_fact", "holdout")}
    from alloylm.data.prepare import _source_signature

    fields = {k: v for k, v in dataset.model_dump(mode="json", by_alias=True).items() if k != "hf_revision"}  # nor hf_revision's
    before = fingerprint("dataset", fields, prep, builtin, [_source_signature(s, every_file=True) for s in dataset.sources], "tok")
    assert dataset_fingerprint(one, "world", "tok") == before


def test_holding_out_whole_materials_changes_the_fingerprints_and_the_default_none(tmp_path):
    """`builtin.holdout: material` makes other SFT chats, preference pairs and benchmark items, which
    are made again; at its default (`fact`) the option is left out of the hash (checked
    against the formula written out in test_more_short_answer_items_change_only_the_benchmarks_fingerprint)."""
    from alloylm.data.prepare import dataset_fingerprint

    datasets = {"world": {"source": "builtin:biomaterials-corpus"}, "qa": {"source": "builtin:biomaterials-qa"}}
    default = make_config(str(tmp_path / "runs"), datasets, builtin={**SMALL_BUILTIN, "materials": 6, "benchmark_fraction": 0.5})
    named = make_config(str(tmp_path / "runs"), datasets, builtin={**SMALL_BUILTIN, "materials": 6, "benchmark_fraction": 0.5, "holdout": "fact"})
    whole = make_config(str(tmp_path / "runs"), datasets, builtin={**SMALL_BUILTIN, "materials": 6, "benchmark_fraction": 0.5, "holdout": "material"})
    for name in datasets:
        assert dataset_fingerprint(default, name, "tok") == dataset_fingerprint(named, name, "tok")
    assert dataset_fingerprint(whole, "qa", "tok") != dataset_fingerprint(default, "qa", "tok")


def test_the_earlier_fingerprint_formula_is_the_one_runs_were_made_with():
    """Artifacts prepared before 2026-12-05 stay up to date only while the earlier formula gives
    what that code gave: these values are AlloyLM 85ed9c2's own, for this config."""
    from alloylm.data.prepare import dataset_fingerprint

    raw = {"experiment": "golden", "storage": "/tmp/golden-runs",
           "builtin": {"materials": 4, "documents_per_material": 2, "general_documents": 40, "general_chats": 40},
           "tokenizer": {"train": {"vocab_size": 400}},
           "datasets": {"text": {"source": "builtin:general-text"}, "chat": {"source": "builtin:general-chat"},
                        "prefs": {"source": "builtin:biomaterials-preferences"}, "bench": {"source": "builtin:biomaterials-benchmark"}},
           "data": {"block_size": 32, "tokenizer_actors": 1, "min_chars": 10}}
    config = validate_config(raw)
    then = {"text": "cc7fcfe32aced6f1", "chat": "d16614d6c4bb0937", "prefs": "2920d98480cb57c5", "bench": "d61bc9d64f7e5619"}
    made_then = {name: dataset_fingerprint(config, name, "tok", legacy=True) for name in then}
    assert {name: made_then[name] for name in ("chat", "prefs", "bench")} == {name: then[name] for name in ("chat", "prefs", "bench")}
    assert _tokenizer_fingerprint_made_before(config) == "1ab99e2d5f74795a"
    assert all(dataset_fingerprint(config, name, "tok") != then[name] for name in ("chat", "prefs", "bench"))
    # A text data set near-deduplicated then used another MinHash family (minhash.FAMILY), whose
    # estimates were biased: under either formula it is not up to date, and is made again.
    assert made_then["text"] != then["text"] and dataset_fingerprint(config, "text", "tok") != then["text"]
    nearless = validate_config({**raw, "data": {**raw["data"], "near_dedup": {"enabled": False}}})
    assert dataset_fingerprint(nearless, "text", "tok") == dataset_fingerprint(nearless, "text", "tok", legacy=True)


def _fingerprint_made_before(config, name: str, tokenizer_fingerprint: str, near_family: bool = True) -> str:
    """A data set's fingerprint as AlloyLM made it before 2026-12-05, written out: every `data:`
    setting (less the two that set only speed), whatever the format."""
    from alloylm.artifact import fingerprint
    from alloylm.data.prepare import _source_signature

    dataset = config.datasets[name]
    prep = config.data.model_dump(mode="json", exclude={"tokenizer_actors", "cpus_per_tokenizer_actor"})
    if near_family and dataset.format == "text" and prep["near_dedup"]["enabled"]:
        # Near-deduplicated with this MinHash family (with the one before it, made again: see
        # test_the_earlier_fingerprint_formula_is_the_one_runs_were_made_with).
        prep["near_dedup"]["family"] = minhash.FAMILY
    builtin = {k: v for k, v in config.builtin.model_dump(mode="json").items() if k not in ("short_answer_per_fact", "holdout")}
    if not any(source.startswith("builtin:") for source in dataset.sources):
        builtin = None
    fields = {k: v for k, v in dataset.model_dump(mode="json", by_alias=True).items() if k != "hf_revision"}
    return fingerprint("dataset", fields, prep, builtin, [_source_signature(s, every_file=True) for s in dataset.sources], tokenizer_fingerprint)


def _tokenizer_fingerprint_made_before(config) -> str:
    from alloylm.artifact import fingerprint

    names = config.tokenizer.train.datasets or sorted(n for n, d in config.datasets.items() if d.format in ("text", "chat") and d.generate is None)
    inputs = [_fingerprint_made_before(config, n, "", near_family=False) for n in names]  # as they were then
    return fingerprint("tokenizer", config.tokenizer.model_dump(mode="json", by_alias=True), inputs)


def test_records_sharing_an_id_are_deduplicated_as_themselves(ray_cluster, tmp_path, tokenizer_dir):
    """Two files each numbering their chats from 1: dedup went by id, so the copy in b.jsonl (id 2)
    took a.jsonl's unrelated id 2 down with it, and a line repeated under one id was dropped as a
    duplicate of itself, both copies gone; the counts said otherwise."""
    folder = tmp_path / "chats"
    folder.mkdir()
    chat = {"one": ("What is nacre?", "Aragonite and protein."), "two": ("What is silk?", "A protein fibre."),
            "three": ("What is bone?", "Mineralised collagen.")}

    def line(id_, key):
        return json.dumps({"id": id_, "q": chat[key][0], "a": chat[key][1]}) + "\n"

    (folder / "a.jsonl").write_text(line(1, "one") + line(2, "two") + line(7, "three") + line(7, "three"))
    (folder / "b.jsonl").write_text(line(1, "three") + line(2, "one"))  # b's 1 and 2 repeat a's 7 and 1
    config = make_config(str(tmp_path / "runs"), {"c": {"source": str(folder), "format": "chat", "columns": {"user": "q", "assistant": "a"}}},
                         tokenizer_dir)
    counts = prepare_all(config)["c"]["counts"]
    rows = read_shards(storage.join(config.run_uri, "data", "c")).to_pylist()
    kept = sorted((r["id"], r["messages"][0]["content"]) for r in rows)
    # one copy of each chat, the one with the smallest id (then origin), as for unique ids
    assert kept == [("1", "What is bone?"), ("1", "What is nacre?"), ("2", "What is silk?")], kept
    assert counts["documents_kept"] == len(rows) == 3 and counts["dropped"] == {"exact_duplicate": 3}
    problems = [json.loads(x) for x in storage.read_text(storage.join(config.run_uri, "data", "c", "problems.jsonl")).splitlines()]
    assert sorted((p["id"], os.path.basename(p["origin"])) for p in problems) == [("2", "b.jsonl:2"), ("7", "a.jsonl:3"), ("7", "a.jsonl:4")]


def test_a_padded_tail_with_a_tokenizer_that_has_no_pad_token_pads_with_end_of_text(ray_cluster, tmp_path, tokenizer_dir):
    """`tokenizer.from` a GPT-2/Llama-style tokenizer (no pad token) and `tail: pad`: numpy failed on
    a None pad id after the whole data set had been read, tokenized and written."""
    from transformers import AutoTokenizer

    no_pad = AutoTokenizer.from_pretrained(tokenizer_dir)
    no_pad.pad_token = None
    no_pad.save_pretrained(str(tmp_path / "tok"))
    assert load_tokenizer(str(tmp_path / "tok")).pad_token_id is None
    (tmp_path / "doc.txt").write_text(UNIQUE_DOCS[0] * 3)
    config = make_config(str(tmp_path / "runs"), {"d": {"source": str(tmp_path / "doc.txt"), "format": "text"}}, str(tmp_path / "tok"),
                         data={"block_size": 32, "tokenizer_actors": 1, "tail": "pad"})
    counts = prepare_all(config)["d"]["counts"]
    assert 0 < counts["tail_padded_tokens"] < 32
    tail = pq.read_table(str(tmp_path / "runs" / "t" / "data" / "d" / "shards" / "tail.parquet")).to_pylist()[-1]
    padding = [t for t, m in zip(tail["input_ids"], tail["attention_mask"]) if not m]
    assert len(padding) == counts["tail_padded_tokens"] and set(padding) == {load_tokenizer(str(tmp_path / "tok")).eos_token_id}


def test_shards_hold_the_blocks_of_one_process_packing_in_input_order_every_shard_but_the_last_full(ray_cluster, tmp_path, tokenizer_dir, caplog):
    """The shards are written as the packing's blocks arrive (`_stream_shards`): whatever the actors'
    timing, they hold exactly the blocks one process gets by packing batches of `batch_size`
    documents in input order, the per-batch tails packed together at the end (`tail.parquet`), and
    every `part-*` shard but the last holds `rows_per_shard` blocks."""
    from alloylm.corpus import BuiltinCorpusOptions, generate_builtin

    texts = [normalise_text(row["text"]) for row in generate_builtin("general-text", BuiltinCorpusOptions(**SMALL_BUILTIN))]
    texts = [t for t in texts if t] * 8  # repeats are kept: no dedup below; 5 tokenizer tasks, more than 3 actors (a pool)
    folder = tmp_path / "corpus"
    folder.mkdir()
    for part in range(3):
        with open(folder / f"part-{part}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"id": f"{part}-{i}", "text": t}) + "\n" for i, t in enumerate(texts[part::3]))
    ordered = [t for part in range(3) for t in texts[part::3]]
    batch, rows_per_shard, width = 8, 5, 16
    # 3 actors of 0.5 CPU on the suite's 2-CPU cluster left its map tasks half a CPU: the pass
    # stalled for ever. The pool is capped at 2 actors (a warning says so).
    config = make_config(
        str(tmp_path / "runs"), {"d": {"source": str(folder), "format": "text"}}, tokenizer_dir,
        data={"block_size": width, "batch_size": batch, "rows_per_shard": rows_per_shard, "tokenizer_actors": 3,
              "exact_dedup": False, "near_dedup": {"enabled": False}},
    )
    with caplog.at_level("WARNING", logger="alloylm.data"):
        manifest = prepare_all(config)["d"]
    assert "data.tokenizer_actors: 3 actors of 0.5 CPU" in caplog.text and "using 2" in caplog.text, caplog.text
    tokenizer = load_tokenizer(tokenizer_dir)
    expected, tails = [], []
    for start in range(0, len(ordered), batch):
        ids = tokenizer(ordered[start : start + batch], add_special_tokens=False)["input_ids"]
        blocks, tail = pack_token_ids(ids, tokenizer.eos_token_id, width)
        expected += blocks.tolist()
        tails.append(tail)
    flat = np.concatenate(tails)
    expected += flat[: flat.size // width * width].reshape(-1, width).tolist()

    shards = manifest["shards"]
    parts = [s for s in shards if os.path.basename(s).startswith("part-")]
    assert shards == sorted(shards) and shards[-1] == "shards/tail.parquet" and len(parts) == len(shards) - 1 >= 3, shards
    folder_uri = storage.join(config.run_uri, "data", "d")
    sizes = [pq.read_metadata(os.path.join(folder_uri, s)).num_rows for s in parts]
    assert sizes[:-1] == [rows_per_shard] * (len(parts) - 1) and 0 < sizes[-1] <= rows_per_shard, sizes
    written = [row for s in shards for row in pq.read_table(os.path.join(folder_uri, s)).column("input_ids").to_pylist()]
    assert written == expected
    assert manifest["counts"]["blocks"] == len(expected) and manifest["counts"]["tokens_dropped_tail"] == flat.size % width
    # The kept documents come back from the same pass, written the same way: `documents/part-*` in
    # input order, every file but the last holding rows_per_shard of them, named the same in every run.
    documents = manifest["documents"]
    assert documents == [f"documents/part-{i:06d}.parquet" for i in range(math.ceil(len(ordered) / rows_per_shard))], documents
    tables = [pq.read_table(os.path.join(folder_uri, d)) for d in documents]
    assert [t.num_rows for t in tables[:-1]] == [rows_per_shard] * (len(tables) - 1)
    kept = pa.concat_tables(tables)
    assert kept.column("text").to_pylist() == ordered
    assert kept.column("id").to_pylist() == [f"{part}-{i}" for part in range(3) for i in range(len(texts[part::3]))]


def _tokenizer_actors_started(before: set[str]) -> list[str]:
    """Class names of the Ray Data tokenizer actors started in this cluster since `before` (actor ids)."""
    from ray._private import state

    return [a["ActorClassName"] for actor_id, a in state.actors().items()
            if actor_id not in before and any(c in a["ActorClassName"] for c in ("PackTokenBlocks", "RenderChats", "RenderPreferences"))]


def test_a_small_data_set_tokenizes_without_starting_actors_into_the_same_blocks(ray_cluster, tmp_path, tokenizer_dir):
    """A data set with no more tokenizer tasks than `data.tokenizer_actors` runs them as plain tasks
    in worker processes already up, which keep the built tokenizer: starting an actor process for one
    or two batches was 2.6-4 s of every quickstart data set's 3-4.4 s. So does a larger one whose pool
    would have as many actors as the cluster has CPUs (2 on this 2-CPU cluster), `size` tasks at once:
    there the actors' start was wall time of a pass that keeps every CPU busy. The blocks are the
    ones the actor pool writes for the same input, and one process's packing in input order; chats
    render the same way too."""
    from ray._private import state

    from alloylm.corpus import BuiltinCorpusOptions, generate_builtin

    texts = [normalise_text(row["text"]) for row in generate_builtin("general-text", BuiltinCorpusOptions(**SMALL_BUILTIN))]
    texts = [t for t in texts if t] * 4  # 3 or 4 tokenizer tasks of 8 batches of 8
    folder = tmp_path / "corpus"
    folder.mkdir()
    with open(folder / "part.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"id": str(i), "text": t}) + "\n" for i, t in enumerate(texts))
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"id": f"c{i}", "messages": [{"role": "user", "content": f"What is material {i}?"},
                                                                       {"role": "assistant", "content": f"A composite, number {i}."}]}) + "\n"
                             for i in range(12)), encoding="utf-8")
    datasets = {"d": {"source": str(folder), "format": "text"}, "c": {"source": str(chats), "format": "chat"}}
    batch, width = 8, 16
    runs = {}
    assert 2 < math.ceil(len(texts) / (batch * BATCHES_PER_TOKENIZER_TASK)) <= 4
    # more tasks than 1 actor: a pool of 1; than 2 actors, as many as the CPUs: 2 tasks at once; not more than 4
    for name, actors in (("pool", 1), ("tasks-over-actors", 2), ("tasks", 4)):
        config = make_config(str(tmp_path / name), datasets, tokenizer_dir,
                             data={"block_size": width, "batch_size": batch, "tokenizer_actors": actors, "exact_dedup": False, "near_dedup": {"enabled": False}})
        before = set(state.actors())
        manifests = prepare_all(config)
        runs[name] = (config, manifests, _tokenizer_actors_started(before))
    assert runs["tasks"][2] == [] and runs["tasks-over-actors"][2] == [], (runs["tasks"][2], runs["tasks-over-actors"][2])
    assert runs["pool"][2] and all("PackTokenBlocks" in c for c in runs["pool"][2]), runs["pool"][2]  # the check sees actors
    tokenizer = load_tokenizer(tokenizer_dir)
    expected, tails = [], []
    for start in range(0, len(texts), batch):
        blocks, tail = pack_token_ids(tokenizer(texts[start : start + batch], add_special_tokens=False)["input_ids"], tokenizer.eos_token_id, width)
        expected += blocks.tolist()
        tails.append(tail)
    flat = np.concatenate(tails)
    expected += flat[: flat.size // width * width].reshape(-1, width).tolist()
    for name, (config, manifests, _) in runs.items():
        assert read_shards(storage.join(config.run_uri, "data", "d")).column("input_ids").to_pylist() == expected, name
    rendered = {name: read_shards(storage.join(config.run_uri, "data", "c")).to_pylist() for name, (config, _, _) in runs.items()}
    assert len(rendered["tasks"]) == 12 and rendered["tasks"] == rendered["pool"] == rendered["tasks-over-actors"]
    assert rendered["tasks"][0]["text"].count("<|im_start|>") == 2


def test_a_task_built_tokenizer_is_known_by_its_artifacts_version_when_it_is_loaded_from_its_uri(ray_cluster, tmp_path):
    """Tasks keep what they built per worker process, by a key of its arguments. A packer handed no
    tokenizer (one whose Rust backend alone encodes otherwise) loads it from `tokenizer_uri`: a
    tokenizer rebuilt there, same arguments, must not be taken for the one built before."""
    import ray.data

    from alloylm.config import DataPrepConfig
    from alloylm.data.prepare import _tokenizer_udf
    from alloylm.data.tokenize import PackTokenBlocks

    uri = str(tmp_path / "tokenizer")
    arguments = {"tokenizer_uri": uri, "block_size": 16, "trust_remote_code": False, "backend": None}

    def key() -> str:
        udf = _tokenizer_udf(DataPrepConfig(), PackTokenBlocks, arguments, tasks=1)
        assert not isinstance(udf.get("compute"), ray.data.ActorPoolStrategy)  # plain tasks
        return udf["fn_kwargs"]["key"]

    storage.write_json(os.path.join(uri, "manifest.json"), {"fingerprint": "f", "created_at": "2026-12-06T10:00:00Z"})
    first = key()
    assert key() == first
    storage.write_json(os.path.join(uri, "manifest.json"), {"fingerprint": "f", "created_at": "2026-12-06T11:00:00Z"})
    assert key() != first


def test_a_saved_dataset_dict_edited_in_place_changes_the_fingerprint(tmp_path):
    """`hf:/path` to a DatasetDict: only its splits have a state.json, so the fingerprint fell back
    to the path, and data saved again with other rows reused the old shards and stages."""
    import datasets

    from alloylm.data.prepare import dataset_fingerprint

    def save(rows):
        datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": rows})}).save_to_disk(str(tmp_path / "hf"))

    config = make_config(str(tmp_path / "runs"), {"d": {"source": f"hf:{tmp_path / 'hf'}", "format": "text"}})
    save(["Nacre is tough.", "Silk is strong."])
    before = dataset_fingerprint(config, "d", "tok")
    save(["Nacre is tough.", "Silk is strong.", "Bone remodels."])
    assert dataset_fingerprint(config, "d", "tok") != before


def _rows_of(files: dict[str, bytes], folder, fmt: str, columns=None, **sizes) -> dict[str, list]:
    """The rows `_files_rows` (the read tasks' UDF) makes of `files` written into `folder`, all
    its batches joined; ids and origins keep the file names relative to `folder`."""
    import pyarrow.fs

    from alloylm.config import ColumnMapping
    from alloylm.data.sources import _files_rows

    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    paths = [str(folder / name) for name in files]
    batches = list(_files_rows({"path": paths}, pyarrow.fs.LocalFileSystem(), fmt, columns or ColumnMapping(), **sizes))
    prefix = str(folder) + "/"
    return {key: [v.replace(prefix, "/") if isinstance(v, str) else v for b in batches for v in b[key]] for key in batches[0]}


def test_compressed_files_are_read_as_what_their_names_say(tmp_path):
    """corpus.jsonl.gz is JSON lines, notes.txt.zst a text document (gzip, bz2, xz, zstd): they
    were dropped as binary files. A file that does not decompress is dropped, named."""
    import bz2
    import gzip
    import json
    import lzma

    zstd = pa.compress(b"Spider silk is strong.", codec="zstd", asbytes=True)  # a standard frame, as the zstd command writes
    files = {
        "c/corpus.jsonl.gz": gzip.compress(b'{"text": "Nacre is tough."}\n{"text": "Bone remodels."}\n'),
        "c/notes.TXT.zst": zstd,
        "c/old.md.bz2": bz2.compress(b"# Enamel\nEnamel is hard."),
        "c/a.txt.xz": lzma.compress(b"Keratin is fibrous."),
        "c/lines.jsonl.xz": lzma.compress(b'{"text": "Wood is layered."}\n'),
        "c/cut.jsonl.gz": gzip.compress(b'{"text": "lost"}\n')[:12],
    }
    rows = _rows_of(files, tmp_path, "text")
    kept = {i: json.loads(r)["text"] for i, r, reason in zip(rows["id"], rows["record"], rows["drop_reason"]) if not reason}
    assert kept == {
        "/c/corpus.jsonl.gz:1": "Nacre is tough.", "/c/corpus.jsonl.gz:2": "Bone remodels.", "/c/notes.TXT.zst": "Spider silk is strong.",
        "/c/old.md.bz2": "# Enamel\nEnamel is hard.", "/c/a.txt.xz": "Keratin is fibrous.", "/c/lines.jsonl.xz:1": "Wood is layered.",
    }
    [(reason, detail)] = [(r, d) for r, d in zip(rows["drop_reason"], rows["detail"]) if r]
    assert reason == "undecodable" and detail.startswith("/c/cut.jsonl.gz: not a whole gzip file ("), detail


class _FlakyFiles:
    """A pyarrow filesystem stand-in over local files whose reads fail with a connection error
    (`failures` times in all; -1: always), counting the read requests."""

    def __init__(self, failures: int) -> None:
        import pyarrow.fs

        self.local, self.failures, self.requests = pyarrow.fs.LocalFileSystem(), failures, 0

    def open_input_file(self, path):
        outer, inner = self, self.local.open_input_file(path)

        class File:
            def read_at(self, size, offset):
                outer.requests += 1
                if outer.failures != 0:
                    outer.failures -= 1
                    raise ConnectionError("connection reset by peer")
                return inner.read_at(size, offset)

            def close(self):
                inner.close()

        return File()


def test_a_file_read_on_remote_storage_is_retried_in_large_requests_and_a_lasting_failure_is_not_a_corrupt_file(tmp_path, monkeypatch):
    """Ray's read_binary_files retried reads; the data set's own tasks do now. A decompressor asks
    for 64 KiB (Arrow) or 8 KiB (lzma) at a time: unbuffered, one S3 request each. A storage
    failure that outlasts the retries fails the data set, naming the file: it is not a compressed
    file that did not decompress (its rows silently cut)."""
    import gzip
    import lzma

    from alloylm.config import ColumnMapping
    from alloylm.data.sources import _files_rows

    monkeypatch.setenv("ALLOYLM_STORAGE_RETRY_S", "10")
    rng = np.random.default_rng(0)  # text that compresses little: over 1 MB either way, 16 of Arrow's 64 KiB reads
    lines = b"".join(json.dumps({"text": f"Document {i}: {rng.bytes(48).hex()}"}).encode() + b"\n" for i in range(20000))
    for name, data in (("a.jsonl.gz", gzip.compress(lines)), ("b.jsonl.xz", lzma.compress(lines))):
        (tmp_path / name).write_bytes(data)
        files = _FlakyFiles(failures=2)
        rows = [r for batch in _files_rows({"path": [str(tmp_path / name)]}, files, "text", ColumnMapping(), scheme="s3://") for r in batch["id"]]
        # the 2 failures, then the file in one request (and a few at its end)
        assert len(rows) == 20000 and files.requests <= 2 + 4 and len(data) > 1_000_000, (name, files.requests, len(data))
    # Read whole (a document, a JSON array): as few requests (Python's readall asked 8 KiB at a time).
    (tmp_path / "doc.txt").write_bytes(lines)
    (tmp_path / "array.json").write_bytes(b"[" + lines.replace(b"}\n{", b"},\n{").rstrip(b"\n") + b"]")
    for name in ("doc.txt", "array.json"):
        files = _FlakyFiles(failures=0)
        list(_files_rows({"path": [str(tmp_path / name)]}, files, "text", ColumnMapping(), scheme="s3://"))
        assert files.requests <= 4, (name, files.requests)
    monkeypatch.setenv("ALLOYLM_STORAGE_RETRY_S", "0.2")
    with pytest.raises(storage.StorageError, match=r"cannot read s3://.*a.jsonl.gz"):
        list(_files_rows({"path": [str(tmp_path / "a.jsonl.gz")]}, _FlakyFiles(failures=-1), "text", ColumnMapping(), scheme="s3://"))


def test_a_json_line_nested_too_deep_or_with_an_overlong_integer_is_that_lines_problem(tmp_path):
    """json.loads raises RecursionError and ValueError (not JSONDecodeError) for these: they ended
    the read of the whole file."""
    from alloylm.config import ColumnMapping

    deep = b'{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    long_int = b'{"text": "x", "n": ' + b"7" * 5000 + b"}"
    rows = _rows_of({"odd.jsonl": b'{"text": "Nacre is tough."}\n' + deep + b"\n" + long_int + b"\n"}, tmp_path, "text", ColumnMapping())
    assert list(zip(rows["origin"], rows["drop_reason"])) == [("/odd.jsonl:1", ""), ("/odd.jsonl:2", "malformed_json"), ("/odd.jsonl:3", "malformed_json")]


def test_a_json_file_holding_one_array_of_records_is_read_as_its_records(tmp_path):
    """Alpaca's `alpaca_data.json` and many exports are one pretty-printed JSON array: read as JSON
    lines, every line was dropped as malformed JSON, and nothing said why."""
    import json

    from alloylm.config import ColumnMapping

    records = [{"instruction": "What is nacre?", "output": "A composite."}, {"instruction": "What is silk?", "output": "A protein fibre."}, 3]
    files = {"alpaca.json": json.dumps(records, indent=2).encode(), "broken.json": b'[\n  {"instruction": "x",\n  oops\n]',
             "lines.json": b'{"instruction": "What is bone?", "output": "A mineralised composite."}\n', "none.json": b" []\n"}
    rows = _rows_of(files, tmp_path, "chat", ColumnMapping(user="instruction", assistant="output"))
    by_origin = dict(zip(rows["origin"], zip(rows["drop_reason"], rows["detail"], rows["record"])))
    assert [o for o, (reason, _, _) in by_origin.items() if not reason] == ["/alpaca.json#0", "/alpaca.json#1", "/lines.json:1"]
    assert json.loads(by_origin["/alpaca.json#1"][2])["messages"][1]["content"] == "A protein fibre."
    assert by_origin["/alpaca.json#2"][:2] == ("malformed_json", "/alpaca.json#2: not a JSON object")
    assert by_origin["/none.json"][:2] == ("empty", "/none.json: an empty JSON array")
    reason, detail, _ = by_origin["/broken.json"]
    assert reason == "malformed_json" and detail.startswith("/broken.json:3: ") and "JSON array" in detail


def test_a_large_json_lines_file_is_read_a_chunk_at_a_time_and_its_rows_leave_in_batches(tmp_path, monkeypatch):
    """A JSON-lines file was read whole, and all its rows made, in one task: a shard of a few GB
    took several times that in memory. Read in chunks (a line may span two), the rows come out the
    same and in batches, and the task never holds the file."""
    import gzip
    import json
    import tracemalloc

    from alloylm.data import sources

    monkeypatch.setattr(sources, "READ_BUFFER_BYTES", 256 << 10)  # storage requests of 256 KiB, not 8 MiB
    lines = [json.dumps({"text": f"Document {i}: " + "nacre tablets and protein " * 40}) for i in range(4000)]
    data = ("\n".join(lines) + "\n").encode()  # ~4.3 MB
    files = {"big.jsonl": data, "big.jsonl.gz": gzip.compress(data)}
    whole = _rows_of(files, tmp_path / "whole", "text", chunk_bytes=len(data) + 1, rows_per_batch=10**6)
    import pyarrow.fs

    from alloylm.config import ColumnMapping
    from alloylm.data.sources import _files_rows

    tracemalloc.start()
    batches = 0
    for batch in _files_rows({"path": [str(tmp_path / "whole" / name) for name in files]}, pyarrow.fs.LocalFileSystem(), "text",
                             ColumnMapping(), rows_per_batch=500, chunk_bytes=64 << 10):
        batches += 1
        assert len(batch["id"]) <= 500
        del batch
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert batches == 16 and peak < len(data) / 2, (batches, peak)
    chunked = _rows_of(files, tmp_path / "chunked", "text", chunk_bytes=1000, rows_per_batch=500)  # lines span chunks
    assert chunked == whole and len(whole["id"]) == 8000 and not any(whole["drop_reason"])


def test_a_hub_data_set_is_known_by_its_revision_when_one_is_given(tmp_path):
    from alloylm.data.prepare import _dataset_fields, dataset_fingerprint

    def fingerprint_of(**fields):
        config = make_config(str(tmp_path / "runs"), {"d": {"source": "hf:org/name", "format": "text", **fields}})
        return dataset_fingerprint(config, "d", "tok"), config.datasets["d"]

    unpinned, dataset = fingerprint_of()
    assert "hf_revision" not in _dataset_fields(dataset)  # fingerprints from before the option stay
    pinned = {revision: fingerprint_of(hf_revision=revision)[0] for revision in ("v1.0", "0123abcd")}
    assert len({unpinned, *pinned.values()}) == 3


def test_a_hugging_face_data_set_is_read_in_blocks_with_its_row_numbers(ray_cluster, tmp_path):
    """Ray makes one block of a table: the whole data set was converted by one task."""
    import datasets

    from alloylm.data.sources import _read_huggingface

    rows = 25_000
    datasets.Dataset.from_dict({"text": [f"document {i}" for i in range(rows)]}).save_to_disk(str(tmp_path / "hf"))
    config = make_config(str(tmp_path / "runs"), {"d": {"source": f"hf:{tmp_path / 'hf'}", "format": "text"}})
    [ds] = _read_huggingface(f"hf:{tmp_path / 'hf'}", config.datasets["d"])
    ds = ds.materialize()
    assert ds.num_blocks() == 2
    ids = [row["id"] for row in ds.iter_rows()]
    assert ids == [ids[0].rsplit("#", 1)[0] + f"#{i}" for i in range(rows)]


def test_identical_parquet_rows_keep_one_copy(ray_cluster, tmp_path, tokenizer_dir):
    pq.write_table(pa.table({"text": [UNIQUE_DOCS[0], UNIQUE_DOCS[1], UNIQUE_DOCS[0]]}), str(tmp_path / "docs.parquet"))
    config = make_config(str(tmp_path / "runs"), {"d": {"source": str(tmp_path / "docs.parquet"), "format": "text"}}, tokenizer_dir)
    counts = prepare_all(config)["d"]["counts"]
    documents = pa.concat_tables(
        pq.read_table(f) for f in storage.list_files(storage.join(config.run_uri, "data", "d", "documents")) if f.endswith(".parquet")
    ).column("text").to_pylist()
    assert sorted(documents) == sorted(UNIQUE_DOCS[:2]) and counts["documents_kept"] == 2 and counts["dropped"] == {"exact_duplicate": 1}


# A Llama-2/Mistral-style template: it raises for roles out of order instead of rendering them.
ALTERNATING_TEMPLATE = (
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_records_the_chat_template_refuses_are_skipped_and_named(ray_cluster, tmp_path, tokenizer_dir):
    """A record whose roles a Llama/Mistral-style template refuses failed the whole data set, after
    reading and cleaning all of it, with a Ray traceback that named no record."""
    from transformers import AutoTokenizer

    strict = AutoTokenizer.from_pretrained(tokenizer_dir)
    strict.chat_template = ALTERNATING_TEMPLATE
    strict.save_pretrained(str(tmp_path / "tok"))

    def chat(*turns):
        return {"messages": [{"role": role, "content": text} for role, text in turns]}

    good = chat(("user", "What is nacre?"), ("assistant", "Aragonite and protein."))
    twice = chat(("user", "What is silk?"), ("user", "And bone?"), ("assistant", "Protein fibre; mineralised collagen."))
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in (good, twice)))
    pairs = [
        {"prompt": "Which is tougher?", "chosen": "Nacre.", "rejected": "Chalk."},
        {"prompt": [{"role": "assistant", "content": "Hello."}], "chosen": "Nacre.", "rejected": "Chalk."},
    ]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    config = make_config(
        str(tmp_path / "runs"),
        {"c": {"source": str(tmp_path / "chats.jsonl"), "format": "chat"}, "p": {"source": str(tmp_path / "pairs.jsonl"), "format": "preference"}},
        str(tmp_path / "tok"),
    )
    manifests = prepare_all(config)
    for name, kept in (("c", "What is nacre?"), ("p", "Which is tougher?")):
        counts = manifests[name]["counts"]
        assert counts["documents_in"] == 2 and counts["documents_kept"] == counts["records_out"] == 1, counts
        assert counts["dropped"] == {"chat_template": 1}
        rows = read_shards(storage.join(config.run_uri, "data", name))
        assert "render_error" not in rows.column_names and "origin" not in rows.column_names
        assert [(r.get("messages") or r["prompt"])[0]["content"] for r in rows.to_pylist()] == [kept]
        (problem,) = [json.loads(x) for x in storage.read_text(storage.join(config.run_uri, "data", name, "problems.jsonl")).splitlines()]
        assert problem["reason"] == "chat_template" and problem["origin"].endswith(f"{'chats' if name == 'c' else 'pairs'}.jsonl:2")
        assert "Conversation roles must alternate" in problem["detail"] and problem["origin"] in problem["detail"]

    # every record refused: the data set fails, naming the template's reason
    (tmp_path / "bad.jsonl").write_text(json.dumps(twice) + "\n")
    bad = make_config(str(tmp_path / "runs2"), {"c": {"source": str(tmp_path / "bad.jsonl"), "format": "chat"}}, str(tmp_path / "tok"))
    with pytest.raises(DataPreparationError, match="refused all of its 1 kept records.*bad.jsonl:1.*roles must alternate"):
        prepare_all(bad)
