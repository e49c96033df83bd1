"""The local object store on real files: layout, atomic puts, streaming, deletes and name validation."""
from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest

from trainingmgr.adapters.base import AdapterError
from trainingmgr.adapters.object_store import (
    MODEL_OBJECT,
    FileChunks,
    InvalidObjectName,
    LocalObjectStore,
    ObjectNotFound,
    model_key,
)

KEY = "1/1.0.0/Model.zip"


@pytest.fixture
def store(tmp_path: Path) -> LocalObjectStore:
    return LocalObjectStore(tmp_path / "models")


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "upload.zip"
    path.write_bytes(b"PK\x03\x04 a small zip")
    return path


def test_model_key_and_layout(store: LocalObjectStore, model_file: Path) -> None:
    assert MODEL_OBJECT == "Model.zip"
    assert model_key("1", "1.0.0") == KEY
    store.put_file("qoe-model", model_key("1", "1.0.0"), model_file)
    # The reference's layout: <root>/<modelname>/<modelversion>/<artifactversion>/Model.zip
    assert (store.root / "qoe-model" / "1" / "1.0.0" / "Model.zip").read_bytes() == model_file.read_bytes()


@pytest.mark.parametrize("version, artifact", [("1/2", "1.0.0"), ("1", "../x"), ("..", "1.0.0"), ("1", ""), ("1%2f", "1")])
def test_model_key_refuses_parts_that_change_the_layout(version: str, artifact: str) -> None:
    with pytest.raises(InvalidObjectName):
        model_key(version, artifact)


def test_put_size_stream(store: LocalObjectStore, model_file: Path) -> None:
    assert store.size("m", KEY) is None
    store.put_file("m", KEY, model_file)
    assert store.size("m", KEY) == model_file.stat().st_size
    assert b"".join(store.stream("m", KEY)) == model_file.read_bytes()
    assert store.ready()


def test_put_replaces_atomically_and_leaves_no_temporary_file(store: LocalObjectStore, tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    first.write_bytes(b"first version")
    second.write_bytes(b"second")
    store.put_file("m", KEY, first)
    store.put_file("m", KEY, second)
    folder = store.root / "m" / "1" / "1.0.0"
    assert os.listdir(folder) == ["Model.zip"]
    assert (folder / "Model.zip").read_bytes() == b"second"


def test_put_of_a_missing_or_non_file_source(store: LocalObjectStore, tmp_path: Path) -> None:
    with pytest.raises(AdapterError) as caught:
        store.put_file("m", KEY, tmp_path / "nothing.zip")
    assert caught.value.retryable is False
    with pytest.raises(AdapterError):
        store.put_file("m", KEY, tmp_path)  # a folder
    assert not (store.root / "m").exists()


def test_put_failure_is_retryable(store: LocalObjectStore, model_file: Path) -> None:
    store.root.mkdir(parents=True)
    (store.root / "m").write_text("a file where the bucket folder should be")
    with pytest.raises(AdapterError) as caught:
        store.put_file("m", KEY, model_file)
    assert caught.value.retryable is True


def test_stream_multi_megabyte_file_in_chunks(store: LocalObjectStore, tmp_path: Path) -> None:
    data = os.urandom(5 * 1024 * 1024 + 12345)
    source = tmp_path / "big.zip"
    source.write_bytes(data)
    store.put_file("big", KEY, source)
    chunks = list(store.stream("big", KEY, chunk_size=1 << 20))
    assert [len(c) for c in chunks] == [1 << 20] * 5 + [12345]
    assert b"".join(chunks) == data
    assert store.size("big", KEY) == len(data)


def test_stream_closes_the_file_when_exhausted(store: LocalObjectStore, model_file: Path) -> None:
    store.put_file("m", KEY, model_file)
    chunks = store.stream("m", KEY, chunk_size=4)
    assert not chunks.closed  # opened eagerly: a missing object fails before any byte is sent
    for _ in chunks:
        pass
    assert chunks.closed
    assert list(chunks) == []  # iterating again is harmless


def test_closing_the_stream_early_closes_the_file(store: LocalObjectStore, tmp_path: Path) -> None:
    source = tmp_path / "big.zip"
    source.write_bytes(b"x" * (3 * 1024 * 1024))
    store.put_file("m", KEY, source)
    chunks = store.stream("m", KEY, chunk_size=1 << 20)
    assert isinstance(chunks, FileChunks)
    assert next(chunks) == b"x" * (1 << 20)
    chunks.close()  # what a WSGI server does when the client goes away
    assert chunks.closed
    with pytest.raises(StopIteration):
        next(chunks)


def test_stream_closed_by_context_manager_and_by_garbage_collection(store: LocalObjectStore, model_file: Path) -> None:
    store.put_file("m", KEY, model_file)
    with store.stream("m", KEY, chunk_size=2) as chunks:
        next(chunks)
    assert chunks.closed
    abandoned = store.stream("m", KEY, chunk_size=2)
    file = abandoned._file
    next(abandoned)
    del abandoned
    gc.collect()
    assert file.closed


def test_stream_of_a_missing_object(store: LocalObjectStore, model_file: Path) -> None:
    with pytest.raises(ObjectNotFound):
        store.stream("m", KEY)
    store.put_file("m", KEY, model_file)
    with pytest.raises(ObjectNotFound):
        store.stream("m", "1/1.0.0")  # a prefix (folder), not an object
    with pytest.raises(ObjectNotFound):
        store.stream("m", "1/1.0.0/Model.zip/deeper")
    assert store.size("m", "1/1.0.0") is None
    assert store.size("m", "1/1.0.0/Model.zip/deeper") is None
    with pytest.raises(ValueError):
        store.stream("m", KEY, chunk_size=0)


def test_delete_prunes_empty_folders_but_keeps_the_bucket_and_siblings(
    store: LocalObjectStore, model_file: Path
) -> None:
    store.put_file("m", "1/1.0.0/Model.zip", model_file)
    store.put_file("m", "1/1.0.0/metadata.json", model_file)
    store.put_file("m", "1/1.0.1/Model.zip", model_file)
    store.delete("m", "1/1.0.0/Model.zip")
    assert sorted(os.listdir(store.root / "m" / "1" / "1.0.0")) == ["metadata.json"]
    store.delete("m", "1/1.0.0/metadata.json")
    assert os.listdir(store.root / "m" / "1") == ["1.0.1"]
    store.delete("m", "1/1.0.1/Model.zip")
    assert os.listdir(store.root / "m") == []  # the bucket stays, empty


def test_delete_of_absent_objects_is_quiet(store: LocalObjectStore, model_file: Path) -> None:
    store.delete("never", KEY)
    store.put_file("m", KEY, model_file)
    store.delete("m", "1/1.0.0")  # a prefix: nothing happens
    store.delete("m", "1/1.0.0/Model.zip/deeper")
    assert store.size("m", KEY) == model_file.stat().st_size
    store.delete("m", KEY)
    store.delete("m", KEY)
    assert store.size("m", KEY) is None


BAD_BUCKETS = [
    "",
    ".",
    "..",
    ".hidden",
    "a/b",
    "/abs",
    "a\\b",
    "a\x00b",
    "%2e%2e",
    "a%2fb",
    "a b",
    "é",
    "a" * 129,
    "a\n",
]
BAD_KEYS = [
    "",
    ".",
    "..",
    "../x",
    "a/../b",
    "a/./b",
    "a/..",
    "./a",
    "/abs",
    "/etc/passwd",
    "a//b",
    "a/",
    "a\\b",
    "..\\..\\x",
    "a\x00b",
    "%2e%2e",
    "%2e%2e/x",
    "a/%2e%2e/b",
    "a%2fb",
    "a b",
    "a?b",
    "a#b",
    "a:b",
    "é/Model.zip",
    "x" * 256,
    "a/" * 600 + "b",
    "Model.zip\n",
]


@pytest.mark.parametrize("bucket", BAD_BUCKETS)
def test_bad_buckets_are_refused(store: LocalObjectStore, model_file: Path, bucket: str) -> None:
    for call in (
        lambda: store.put_file(bucket, KEY, model_file),
        lambda: store.size(bucket, KEY),
        lambda: store.stream(bucket, KEY),
        lambda: store.delete(bucket, KEY),
    ):
        with pytest.raises(InvalidObjectName) as caught:
            call()
        assert caught.value.retryable is False
        assert isinstance(caught.value, AdapterError)
    assert not store.root.exists()  # nothing touched the disk


@pytest.mark.parametrize("key", BAD_KEYS)
def test_bad_keys_are_refused(store: LocalObjectStore, model_file: Path, key: str) -> None:
    for call in (
        lambda: store.put_file("m", key, model_file),
        lambda: store.size("m", key),
        lambda: store.stream("m", key),
        lambda: store.delete("m", key),
    ):
        with pytest.raises(InvalidObjectName):
            call()
    assert not store.root.exists()


@pytest.mark.parametrize("bucket", ["m", "qoe-model", "QoE_Model.v2", "-x", "_x", "a" * 128, "1"])
@pytest.mark.parametrize("key", ["Model.zip", KEY, "v1.0/2.3.4/metadata.json", "a/.b/c", "..a/b..", "x" * 255])
def test_good_names(store: LocalObjectStore, model_file: Path, bucket: str, key: str) -> None:
    store.put_file(bucket, key, model_file)
    assert store.size(bucket, key) == model_file.stat().st_size
    store.delete(bucket, key)
    assert store.size(bucket, key) is None


def test_not_ready_when_the_root_cannot_be_created(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert LocalObjectStore(blocker / "models").ready() is False
