"""alloylm.storage on a local folder and on S3 (moto's server): files, folders, atomic artifacts."""

from __future__ import annotations

import json
import os
import socket

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alloylm import storage


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    """A fresh, empty root URI: a local tmp folder or a prefix in a fresh moto bucket."""
    if request.param == "local":
        return str(tmp_path / "root")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/root"


def _is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def _staging_parent(root: str) -> str:
    return storage.join(root, storage.STAGING_DIR_NAME)


def _write_model(uri: str, tag: str) -> None:
    storage.write_text(storage.join(uri, "weights.txt"), f"weights {tag}")
    storage.write_text(storage.join(uri, "tokenizer", "vocab.txt"), f"vocab {tag}")


# ----------------------------------------------------------------------------- paths


def test_join_and_resolve_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.resolve("runs/exp") == str(tmp_path / "runs" / "exp")
    assert storage.resolve("~/x") == os.path.join(os.path.expanduser("~"), "x")
    assert storage.resolve("file:///tmp/a") == "/tmp/a"
    assert storage.join("/a/b", "c", "d.txt") == "/a/b/c/d.txt"
    assert not storage.is_remote("/a/b")
    assert not storage.is_remote("runs/exp")
    assert not storage.is_remote("file:///tmp/a")


def test_join_and_resolve_s3():
    assert storage.is_remote("s3://bucket/p")
    assert storage.is_remote("memory://x")
    assert storage.resolve("s3://bucket/p/") == "s3://bucket/p/"
    assert storage.join("s3://bucket/p/", "c", "d.txt") == "s3://bucket/p/c/d.txt"
    assert storage.join("s3://bucket", "/c/", "d") == "s3://bucket/c/d"


# ----------------------------------------------------------------------------- files


def test_text_and_json_roundtrip(root):
    text_uri = storage.join(root, "a", "note.txt")
    assert not storage.exists(text_uri)
    storage.write_text(text_uri, "héllo\nworld")
    assert storage.exists(text_uri)
    assert storage.read_text(text_uri) == "héllo\nworld"
    assert storage.read_bytes(text_uri) == "héllo\nworld".encode()
    storage.write_text(text_uri, "second")
    assert storage.read_text(text_uri) == "second"

    json_uri = storage.join(root, "b.json")
    obj = {"z": 1, "a": [1.5, "x", None], "nested": {"k": True}}
    storage.write_json(json_uri, obj)
    assert storage.read_json(json_uri) == obj
    assert storage.read_text(json_uri) == json.dumps(obj, indent=2, sort_keys=True) + "\n"
    # A folder (an S3 prefix) exists once something is under it.
    assert storage.exists(storage.join(root, "a"))
    if not _is_s3(root):
        # No temporary files are left beside the written ones.
        assert sorted(os.listdir(storage.join(root, "a"))) == ["note.txt"]


def test_read_missing_raises_not_found_naming_uri(root):
    uri = storage.join(root, "missing.txt")
    with pytest.raises(storage.StorageNotFoundError, match="missing.txt") as info:
        storage.read_text(uri)
    assert isinstance(info.value, FileNotFoundError)
    assert isinstance(info.value, storage.StorageError)


def test_write_json_rejects_unserialisable(root):
    with pytest.raises(storage.StorageError, match="JSON"):
        storage.write_json(storage.join(root, "bad.json"), {"x": object()})
    assert not storage.exists(storage.join(root, "bad.json"))


def test_list_files_with_and_without_globs(root):
    for rel in ["a.txt", "b.md", "sub/c.txt", "sub/deep/d.md"]:
        storage.write_text(storage.join(root, rel), rel)
    # A sibling whose name starts with the root's name must never be listed.
    storage.write_text(root + "-sibling/x.txt", "x")

    def full(*rels):
        return [storage.join(root, r) for r in rels]

    assert storage.list_files(root) == full("a.txt", "b.md", "sub/c.txt", "sub/deep/d.md")
    assert storage.list_files(root, "*.txt") == full("a.txt")
    assert storage.list_files(root, "**/*.md") == full("b.md", "sub/deep/d.md")
    assert storage.list_files(storage.join(root, "sub") + "/*.txt") == full("sub/c.txt")
    assert storage.list_files(storage.join(root, "**", "*.md")) == full("b.md", "sub/deep/d.md")
    assert storage.list_files(storage.join(root, "nothing-here")) == []
    for uri in storage.list_files(root):
        assert uri.startswith("s3://") if _is_s3(root) else os.path.isabs(uri)


def test_file_signatures_come_from_the_listing_not_a_request_per_file(root, monkeypatch):
    """A source's signatures (size, and mtime or ETag) identify its files in a fingerprint: they
    are the ones a request per file gives, read from the listing (a HEAD per object, one after
    another, took hours for a million objects, at every fingerprint)."""
    for rel in ["a.txt", "sub/b.txt", "sub/c.md"]:
        storage.write_text(storage.join(root, rel), rel * 3)
    fs, _ = storage.fsspec_filesystem(root)
    per_file = {uri: fs.info(storage.fsspec_filesystem(uri)[1]) for uri in storage.list_files(root)}
    asked: list[str] = []
    if _is_s3(root):  # (a local listing stats each file itself)
        original = fs.info
        monkeypatch.setattr(fs, "info", lambda path, **kw: asked.append(path) or original(path, **kw))  # fsspec keeps one instance
    signatures = storage.file_signatures(root)
    assert [s[0] for s in signatures] == sorted(per_file)
    for file_uri, size, stamp in signatures:
        info = per_file[file_uri]
        assert size == info["size"] and stamp == str(info.get("ETag") or info.get("mtime")), file_uri
    assert not [path for path in asked if not path.rstrip("/").endswith("root")], asked  # the root's own check only
    assert storage.file_signatures(storage.join(root, "sub", "*.md")) == [s for s in signatures if s[0].endswith("c.md")]


def test_upload_download_roundtrip_preserves_nested_files(root, tmp_path):
    src = tmp_path / "src"
    (src / "x" / "y").mkdir(parents=True)
    (src / "top.bin").write_bytes(bytes(range(256)))
    (src / "x" / "mid.txt").write_text("mid")
    (src / "x" / "y" / "leaf.json").write_text('{"a": 1}')

    remote = storage.join(root, "model")
    storage.upload_dir(str(src), remote)
    assert storage.list_files(remote) == [
        storage.join(remote, r) for r in ["top.bin", "x/mid.txt", "x/y/leaf.json"]
    ]

    dest = tmp_path / "dest"
    assert storage.download_dir(remote, str(dest)) == str(dest)
    got = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert got == ["top.bin", "x/mid.txt", "x/y/leaf.json"]
    assert (dest / "top.bin").read_bytes() == bytes(range(256))
    assert (dest / "x" / "y" / "leaf.json").read_text() == '{"a": 1}'
    # Only the files `wanted` keeps, by their path relative to the folder.
    some = tmp_path / "some"
    storage.download_dir(remote, str(some), wanted=lambda rel: rel != "x/mid.txt")
    assert sorted(str(p.relative_to(some)) for p in some.rglob("*") if p.is_file()) == ["top.bin", "x/y/leaf.json"]


def test_remove_is_recursive_and_spares_siblings(root):
    _write_model(storage.join(root, "a"), "a")
    _write_model(storage.join(root, "ab"), "ab")
    storage.remove(storage.join(root, "a"))
    assert not storage.exists(storage.join(root, "a"))
    assert storage.list_files(storage.join(root, "ab")) == [
        storage.join(root, "ab", "tokenizer", "vocab.txt"),
        storage.join(root, "ab", "weights.txt"),
    ]
    storage.remove(storage.join(root, "a"))  # removing a missing path is not an error


# ----------------------------------------------------------------------------- artifacts


def test_commit_writes_complete_artifact_manifest_last_and_removes_staging(root):
    final = storage.join(root, "exp", "sft")
    art = storage.begin_artifact(final)
    assert art.final_uri == final
    assert art.staging_uri.startswith(storage.join(root, "exp", storage.STAGING_DIR_NAME, "sft-"))
    _write_model(art.staging_uri, "v1")
    assert not storage.exists(storage.join(final, "weights.txt"))
    assert not storage.is_complete(final)

    written = art.commit({"stage": "sft", "parents": ["cpt"]})
    assert written["stage"] == "sft" and written["parents"] == ["cpt"]
    assert "created_at" in written and "alloylm_version" in written
    assert storage.read_manifest(final) == written
    assert storage.is_complete(final)
    assert storage.read_text(storage.join(final, "weights.txt")) == "weights v1"
    assert storage.read_text(storage.join(final, "tokenizer", "vocab.txt")) == "vocab v1"
    assert not storage.exists(art.staging_uri)
    assert storage.list_files(storage.join(root, "exp")) == [
        storage.join(final, storage.MANIFEST_NAME),
        storage.join(final, "tokenizer", "vocab.txt"),
        storage.join(final, "weights.txt"),
    ]
    if not _is_s3(root):
        assert not os.path.exists(_staging_parent(storage.join(root, "exp")))
    with pytest.raises(storage.StorageError, match="committed"):
        art.commit({})


def test_s3_commit_order_old_manifest_first_new_manifest_last(s3_bucket, monkeypatch, request):
    final = f"s3://{s3_bucket}/exp/dpo"
    with storage.begin_artifact(final) as art:
        _write_model(art.staging_uri, "v1")
        art.commit({"version": 1})

    # Record every object write, copy and delete that reaches S3 during an overwrite.
    events = []
    fs_cls = storage._BoundedS3FileSystem

    def record(name, kind, key_of):
        original = getattr(fs_cls, name)

        async def wrapper(self, *args, **kwargs):
            events.append((kind, key_of(*args)))
            return await original(self, *args, **kwargs)

        monkeypatch.setattr(fs_cls, name, wrapper)

    record("_pipe_file", "put", lambda path, *a: path)
    record("_cp_file", "copy", lambda src, dst, *a: dst)
    record("_rm_file", "delete", lambda path, *a: path)
    record("_bulk_delete", "delete", lambda paths, *a: tuple(sorted(paths)))
    # fsspec binds an instance's sync methods when it is built, and caches instances: build
    # fresh ones around the patched class, and drop them afterwards.
    fs_cls.clear_instance_cache()
    request.addfinalizer(fs_cls.clear_instance_cache)

    with storage.begin_artifact(final, overwrite=True) as art:
        _write_model(art.staging_uri, "v2")
        events.clear()
        art.commit({"version": 2})

    manifest = f"{s3_bucket}/exp/dpo/{storage.MANIFEST_NAME}"
    marker = f"{s3_bucket}/exp/dpo/{storage.COMMIT_MARKER_NAME}"
    # The commit marks the folder, then the old manifest goes, so readers see the old artifact as
    # incomplete (and a commit cut short from here on is known as one, not as a user's files) ...
    assert events[:2] == [("put", marker), ("delete", manifest)]
    copies = [key for kind, key in events if kind == "copy"]
    assert sorted(copies) == [f"{s3_bucket}/exp/dpo/tokenizer/vocab.txt",
                              f"{s3_bucket}/exp/dpo/weights.txt"]
    # ... and the new manifest is put after every copy, then the marker and the staging are deleted.
    put_at = events.index(("put", manifest))
    assert all(i < put_at for i, (kind, _) in enumerate(events) if kind == "copy")
    assert events[put_at + 1] == ("delete", marker)
    staging_key = art.staging_uri.split("://", 1)[1]
    for kind, key in events[put_at + 2:]:
        assert kind == "delete"
        keys = key if isinstance(key, tuple) else (key,)
        assert all(k.startswith(staging_key + "/") for k in keys), key
    assert storage.read_manifest(final)["version"] == 2


def test_exception_inside_with_leaves_no_artifact_and_no_staging(root):
    final = storage.join(root, "exp", "cpt")
    with pytest.raises(RuntimeError, match="training crashed"):
        with storage.begin_artifact(final) as art:
            _write_model(art.staging_uri, "v1")
            raise RuntimeError("training crashed")
    assert not storage.exists(final)
    assert not storage.exists(art.staging_uri)
    assert storage.list_files(storage.join(root, "exp")) == []
    with pytest.raises(storage.StorageError, match="aborted"):
        art.commit({})


def test_complete_artifact_is_not_overwritten_without_overwrite(root):
    final = storage.join(root, "exp", "sft")
    with storage.begin_artifact(final) as art:
        _write_model(art.staging_uri, "v1")
        first = art.commit({"stage": "sft"})

    with pytest.raises(storage.ArtifactExistsError) as info:
        storage.begin_artifact(final)
    assert final in str(info.value)
    assert "overwrite" in str(info.value)
    assert storage.read_manifest(final) == first
    assert storage.read_text(storage.join(final, "weights.txt")) == "weights v1"
    assert storage.list_files(storage.join(root, "exp")) == [
        storage.join(final, storage.MANIFEST_NAME),
        storage.join(final, "tokenizer", "vocab.txt"),
        storage.join(final, "weights.txt"),
    ]


def test_commit_rechecks_a_race_and_keeps_the_other_artifact(root):
    final = storage.join(root, "exp", "sft")
    late = storage.begin_artifact(final)
    storage.write_text(storage.join(late.staging_uri, "weights.txt"), "late")
    with storage.begin_artifact(final) as early:
        storage.write_text(storage.join(early.staging_uri, "weights.txt"), "early")
        early.commit({"who": "early"})
    with pytest.raises(storage.ArtifactExistsError, match="overwrite"):
        late.commit({"who": "late"})
    assert storage.read_manifest(final)["who"] == "early"
    assert storage.read_text(storage.join(final, "weights.txt")) == "early"
    late.abort()
    assert not storage.exists(late.staging_uri)


def test_overwrite_replaces_complete_artifact_and_old_files_are_gone(root):
    final = storage.join(root, "exp", "merged")
    with storage.begin_artifact(final) as art:
        _write_model(art.staging_uri, "v1")
        storage.write_text(storage.join(art.staging_uri, "only-in-v1.txt"), "old")
        art.commit({"version": 1})
    # A neighbour sharing the name's prefix must survive the overwrite.
    storage.write_text(storage.join(root, "exp", "merged2", "keep.txt"), "keep")

    with storage.begin_artifact(final, overwrite=True) as art:
        _write_model(art.staging_uri, "v2")
        # Until commit, readers still see the old, complete artifact.
        assert storage.read_manifest(final)["version"] == 1
        art.commit({"version": 2})

    assert storage.read_manifest(final)["version"] == 2
    assert storage.read_text(storage.join(final, "weights.txt")) == "weights v2"
    assert not storage.exists(storage.join(final, "only-in-v1.txt"))
    assert storage.list_files(storage.join(root, "exp")) == [
        storage.join(final, storage.MANIFEST_NAME),
        storage.join(final, "tokenizer", "vocab.txt"),
        storage.join(final, "weights.txt"),
        storage.join(root, "exp", "merged2", "keep.txt"),
    ]


def test_incomplete_folder_is_not_complete_and_can_be_replaced(root):
    final = storage.join(root, "exp", "orpo")
    _write_model(final, "crashed")  # files but no manifest: an earlier attempt died
    storage.write_text(storage.join(final, "partial.bin"), "half")
    assert storage.read_manifest(final) is None
    assert not storage.is_complete(final)

    with storage.begin_artifact(final) as art:  # overwrite is off, yet this is allowed
        _write_model(art.staging_uri, "v1")
        art.commit({"stage": "orpo"})
    assert storage.is_complete(final)
    assert storage.read_text(storage.join(final, "weights.txt")) == "weights v1"
    assert not storage.exists(storage.join(final, "partial.bin"))
    # Files without a manifest that no commit left (locally a commit is a rename and leaves none; on
    # S3 a commit cut short leaves its marker) are a user's own files: moved aside, kept. They were
    # deleted on S3, so a corpus kept at a data set's path was lost when the data set was written.
    aside = [f for f in storage.list_files(storage.join(root, "exp")) if ".replaced-" in f]
    assert sorted(os.path.basename(f) for f in aside) == ["partial.bin", "vocab.txt", "weights.txt"], aside
    assert storage.read_text(next(f for f in aside if f.endswith("partial.bin"))) == "half"
    assert not storage.exists(storage.join(final, storage.COMMIT_MARKER_NAME))


def test_an_s3_commit_cut_short_while_deleting_the_old_objects_stays_marked(s3_bucket, monkeypatch):
    """The marker was deleted with the old objects and put back after: a commit that died in
    between left files with neither manifest nor marker, taken next time for a user's own."""
    final = f"s3://{s3_bucket}/exp/sft"
    with storage.begin_artifact(final) as art:
        _write_model(art.staging_uri, "v1")
        art.commit({"version": 1})
    delete = storage._s3_delete_prefix

    def delete_then_die(uri, **kwargs):
        delete(uri, **kwargs)
        if uri == final:
            raise storage.StorageError("the process died here")

    monkeypatch.setattr(storage, "_s3_delete_prefix", delete_then_die)
    with pytest.raises(storage.StorageError, match="died"):
        with storage.begin_artifact(final, overwrite=True) as art:
            _write_model(art.staging_uri, "v2")
            art.commit({"version": 2})
    monkeypatch.setattr(storage, "_s3_delete_prefix", delete)
    assert storage.list_files(final) == [storage.join(final, storage.COMMIT_MARKER_NAME)]  # marked through the delete
    with storage.begin_artifact(final) as art:
        _write_model(art.staging_uri, "v3")
        art.commit({"version": 3})
    assert storage.read_manifest(final)["version"] == 3
    assert not [f for f in storage.list_files(f"s3://{s3_bucket}/exp") if ".replaced-" in f]  # nothing moved aside


def test_an_s3_commit_cut_short_is_replaced_not_kept(s3_bucket):
    final = f"s3://{s3_bucket}/exp/orpo"
    _write_model(final, "half-copied")  # what a commit that died copying leaves: its marker, no manifest
    storage.write_text(storage.join(final, storage.COMMIT_MARKER_NAME), "commit in progress\n")
    assert not storage.is_complete(final)
    with storage.begin_artifact(final) as art:
        _write_model(art.staging_uri, "v1")
        art.commit({"stage": "orpo"})
    assert storage.read_text(storage.join(final, "weights.txt")) == "weights v1"
    assert storage.list_files(f"s3://{s3_bucket}/exp") == [
        storage.join(final, storage.MANIFEST_NAME), storage.join(final, "tokenizer", "vocab.txt"), storage.join(final, "weights.txt"),
    ]


def test_artifact_cannot_be_a_bucket_root(s3_bucket):
    with pytest.raises(storage.StorageError, match="bucket root"):
        storage.begin_artifact(f"s3://{s3_bucket}")


# ----------------------------------------------------------------------------- pyarrow


def test_arrow_filesystem_parquet_roundtrip(root):
    uri = storage.join(root, "data", "part-0.parquet")
    fs, path = storage.arrow_filesystem(uri)
    table = pa.table({"ids": [1, 2, 3], "text": ["a", "b", "c"]})
    if not _is_s3(root):
        os.makedirs(os.path.dirname(path))
    pq.write_table(table, path, filesystem=fs)
    assert pq.read_table(path, filesystem=fs).equals(table)
    assert storage.list_files(storage.join(root, "data")) == [uri]


def test_artifact_written_through_pyarrow_folders_commits(root):
    # pyarrow's S3 create_dir leaves "folder/" marker objects; they are not files to copy or list.
    with storage.begin_artifact(storage.join(root, "art")) as art:
        fs, path = storage.arrow_filesystem(storage.join(art.staging_uri, "shards"))
        fs.create_dir(path)
        pq.write_table(pa.table({"a": [1]}), f"{path}/part-0.parquet", filesystem=fs)
        art.commit({"kind": "test"})
    final = storage.join(root, "art")
    assert storage.is_complete(final)
    assert storage.list_files(final) == sorted([storage.join(final, "manifest.json"), storage.join(final, "shards", "part-0.parquet")])


# ----------------------------------------------------------------------------- no endpoint


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nobody listens once the socket is closed


@pytest.mark.parametrize(
    "operation",
    [
        lambda uri: storage.read_text(uri),
        lambda uri: storage.write_text(uri, "x"),
        lambda uri: storage.exists(uri),
        lambda uri: storage.list_files(uri),
        lambda uri: storage.begin_artifact(uri),
    ],
    ids=["read_text", "write_text", "exists", "list_files", "begin_artifact"],
)
def test_unreachable_endpoint_raises_storage_error_naming_uri(monkeypatch, operation):
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    uri = "s3://no-such-endpoint-bucket/exp/file.txt"
    with pytest.raises(storage.StorageError) as info:
        operation(uri)
    assert not isinstance(info.value, storage.StorageNotFoundError)
    assert uri in str(info.value)
    assert endpoint in str(info.value)


def test_exists_on_bucket_root(s3_bucket):
    assert storage.exists(f"s3://{s3_bucket}")
    assert not storage.exists(f"s3://{s3_bucket}-absent")
