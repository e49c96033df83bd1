"""The S3 object store against a real S3 server (moto's, in a process of its own): layout, round trips, streaming
in bounded memory, connection release, name validation and outages."""
from __future__ import annotations

import gc
import hashlib
import http.server
import threading
import os
import socket
import time
import tracemalloc
import uuid
from pathlib import Path
from typing import Callable, Iterator

import pytest

pytest.importorskip("minio")
pytest.importorskip("moto.server")

from minio import Minio  # noqa: E402

from tests.processes import free_port, moto_server  # noqa: E402
from trainingmgr.adapters.base import AdapterError  # noqa: E402
from trainingmgr.adapters.object_store import InvalidObjectName, ObjectNotFound, model_key  # noqa: E402
from trainingmgr.adapters.s3_object_store import S3Chunks, S3ObjectStore  # noqa: E402

ACCESS_KEY = "tm-access"
SECRET_KEY = "tm-secret-key"
TIMEOUT = 2.0
KEY = "1/1.0.0/Model.zip"
MIB = 1 << 20


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A moto S3 server in a process of its own (so that its memory does not count as ours), per module."""
    with moto_server(tmp_path_factory.mktemp("moto")) as endpoint:
        yield endpoint


def _store(endpoint: str, timeout: float = TIMEOUT) -> S3ObjectStore:
    return S3ObjectStore(endpoint, access_key=ACCESS_KEY, secret_key=SECRET_KEY, secure=False, region=None,
                         timeout=timeout)


@pytest.fixture
def store(s3_endpoint: str) -> S3ObjectStore:
    return _store(s3_endpoint)


@pytest.fixture
def bucket() -> str:
    return f"model-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def raw_client(s3_endpoint: str) -> Minio:
    """What an existing pipeline uses: the plain minio client."""
    return Minio(s3_endpoint, access_key=ACCESS_KEY, secret_key=SECRET_KEY, secure=False)


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "upload.zip"
    path.write_bytes(b"PK\x03\x04 a small zip " + os.urandom(1000))
    return path


@pytest.fixture(scope="module")
def big_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("big") / "big.zip"
    with open(path, "wb") as f:
        for _ in range(20):
            f.write(os.urandom(MIB))
    return path


def _idle_slots(store: S3ObjectStore) -> int:
    """Connection slots back in the pool: a response that was never released keeps one taken."""
    pool = store._http.connection_from_url(f"http://{store.endpoint}")
    return pool.pool.qsize()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MIB), b""):
            digest.update(block)
    return digest.hexdigest()


def _vm_rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")


# ------------------------------------------------------------------------------------------- round trips
def test_ready_when_up(store: S3ObjectStore) -> None:
    assert store.ready()


def test_put_size_stream_delete(store: S3ObjectStore, bucket: str, model_file: Path, raw_client: Minio) -> None:
    assert store.size(bucket, KEY) is None  # no bucket yet
    store.put_file(bucket, KEY, model_file)  # creates the bucket
    assert raw_client.bucket_exists(bucket)
    assert store.size(bucket, KEY) == model_file.stat().st_size
    assert b"".join(store.stream(bucket, KEY)) == model_file.read_bytes()
    assert raw_client.stat_object(bucket, KEY).content_type == "application/zip"

    # Replacing, and a second object in the same (now existing) bucket.
    model_file.write_bytes(b"second version")
    store.put_file(bucket, KEY, model_file)
    store.put_file(bucket, "1/1.0.0/metadata.json", model_file)
    assert b"".join(store.stream(bucket, KEY)) == b"second version"
    assert raw_client.stat_object(bucket, "1/1.0.0/metadata.json").content_type == "application/json"

    store.delete(bucket, KEY)
    assert store.size(bucket, KEY) is None
    store.delete(bucket, KEY)  # absent: no error
    store.delete(f"never-{bucket}", KEY)  # no bucket: no error either
    assert store.size(bucket, "1/1.0.0/metadata.json") == len(b"second version")
    assert _idle_slots(store) > 0


@pytest.mark.parametrize("modelname", ["demo_qoe", "QoE_Model-2", "model.v1"])
def test_one_bucket_layout_holds_any_model_name(s3_endpoint: str, raw_client: Minio, model_file: Path,
                                                modelname: str) -> None:
    """TM_S3_BUCKET: every model under <modelname>/<modelversion>/<artifactversion>/Model.zip of one bucket, so a
    model name S3 refuses as a bucket (an underscore, capitals) is stored all the same."""
    shared = f"tm-models-{uuid.uuid4().hex[:8]}"
    store = S3ObjectStore(s3_endpoint, access_key=ACCESS_KEY, secret_key=SECRET_KEY, secure=False, region=None,
                          timeout=TIMEOUT, bucket=shared)
    store.check_model_name(modelname)
    store.put_file(modelname, KEY, model_file)
    assert raw_client.stat_object(shared, f"{modelname}/{KEY}").size == model_file.stat().st_size
    assert store.size(modelname, KEY) == model_file.stat().st_size
    assert b"".join(store.stream(modelname, KEY)) == model_file.read_bytes()
    assert store.uri(modelname, KEY) == f"s3://{shared}/{modelname}/{KEY}"
    assert [b.name for b in raw_client.list_buckets() if b.name.startswith("demo") or "_" in b.name] == []
    store.delete(modelname, KEY)
    assert store.size(modelname, KEY) is None


@pytest.mark.parametrize("modelname", ["../x", "a/b", ".hidden", ""])
def test_one_bucket_layout_still_refuses_names_that_change_the_key(s3_endpoint: str, model_file: Path,
                                                                   modelname: str) -> None:
    store = S3ObjectStore(s3_endpoint, access_key=ACCESS_KEY, secret_key=SECRET_KEY, secure=False, region=None,
                          timeout=TIMEOUT, bucket="tm-models")
    with pytest.raises(InvalidObjectName):
        store.check_model_name(modelname)
    with pytest.raises(InvalidObjectName):
        store.put_file(modelname, KEY, model_file)


def test_bucket_per_model_layout_names_the_rule_and_the_way_out(store: S3ObjectStore) -> None:
    with pytest.raises(InvalidObjectName, match="cannot be an S3 bucket.*TM_S3_BUCKET.*lowercase"):
        store.check_model_name("demo_qoe")
    store.check_model_name("demo-qoe")


def test_missing_object(store: S3ObjectStore, bucket: str, model_file: Path) -> None:
    with pytest.raises(ObjectNotFound):
        store.stream(bucket, KEY)  # no bucket
    store.put_file(bucket, "other/1.0.0/Model.zip", model_file)
    assert store.size(bucket, KEY) is None
    with pytest.raises(ObjectNotFound) as info:
        store.stream(bucket, KEY)  # bucket, no key
    assert not info.value.retryable
    assert bucket in str(info.value)


def test_put_of_a_missing_file(store: S3ObjectStore, bucket: str, tmp_path: Path) -> None:
    with pytest.raises(AdapterError) as info:
        store.put_file(bucket, KEY, tmp_path / "nothing.zip")
    assert not info.value.retryable


def test_model_stored_by_an_existing_pipeline_is_readable(
    store: S3ObjectStore, raw_client: Minio, model_file: Path
) -> None:
    """The reference's layout: bucket <modelname>, object <modelversion>/<artifactversion>/Model.zip."""
    modelname = f"qoe-{uuid.uuid4().hex[:8]}"
    raw_client.make_bucket(modelname)
    raw_client.fput_object(modelname, "2/1.0.1/Model.zip", str(model_file))
    raw_client.fput_object(modelname, "2/1.0.1/metadata.json", str(model_file))

    key = model_key("2", "1.0.1")
    assert key == "2/1.0.1/Model.zip"
    assert store.size(modelname, key) == model_file.stat().st_size
    assert b"".join(store.stream(modelname, key)) == model_file.read_bytes()

    # And what the adapter stores, a pipeline finds at the same place.
    store.put_file(modelname, model_key("3", "1.0.0"), model_file)
    with raw_client.get_object(modelname, "3/1.0.0/Model.zip") as response:
        assert response.read() == model_file.read_bytes()


# ------------------------------------------------------------------------------------------- big objects
def test_big_file_streams_in_chunks_in_bounded_memory(
    store: S3ObjectStore, bucket: str, big_file: Path, raw_client: Minio
) -> None:
    store.put_file(bucket, KEY, big_file)
    assert store.size(bucket, KEY) == 20 * MIB
    assert "-" in raw_client.stat_object(bucket, KEY).etag  # a multipart upload's ETag: "<md5 of md5s>-<parts>"

    digest = hashlib.sha256()
    sizes: list[int] = []
    gc.collect()
    rss_before = _vm_rss_kib()
    tracemalloc.start()
    try:
        chunks = store.stream(bucket, KEY, chunk_size=MIB)
        for chunk in chunks:
            sizes.append(len(chunk))
            digest.update(chunk)
            del chunk
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    rss_growth = (_vm_rss_kib() - rss_before) * 1024

    assert digest.hexdigest() == _sha256(big_file)
    assert sum(sizes) == 20 * MIB
    assert max(sizes) <= MIB and len(sizes) >= 20
    assert peak < 5 * MIB, f"streaming allocated {peak / MIB:.1f} MiB at once"
    assert rss_growth < 15 * MIB, f"RSS grew by {rss_growth / MIB:.1f} MiB"
    assert chunks.closed  # exhausted: response closed, connection released
    assert _idle_slots(store) == 10


def test_closing_streams_early_releases_their_connections(store: S3ObjectStore, bucket: str, big_file: Path) -> None:
    store.put_file(bucket, KEY, big_file)
    for _ in range(50):
        chunks = store.stream(bucket, KEY, chunk_size=64 * 1024)
        assert len(next(chunks)) == 64 * 1024
        chunks.close()
        assert chunks.closed
        assert list(chunks) == []  # nothing more after close, and close() again is harmless
        chunks.close()
    assert _idle_slots(store) == 10  # no slot kept by a leaked response

    # Without close(): leaving the iterator to the garbage collector (the context manager closes as well).
    for _ in range(15):
        chunks = store.stream(bucket, KEY, chunk_size=64 * 1024)
        next(chunks)
        del chunks
    gc.collect()
    with store.stream(bucket, KEY) as chunks:
        next(chunks)
    assert chunks.closed
    assert _idle_slots(store) == 10

    started = time.monotonic()
    assert store.size(bucket, KEY) == 20 * MIB
    assert b"".join(store.stream(bucket, KEY)) == big_file.read_bytes()
    assert time.monotonic() - started < 5


def test_stream_refuses_a_bad_chunk_size(store: S3ObjectStore) -> None:
    with pytest.raises(ValueError):
        store.stream("model", KEY, chunk_size=0)


# ------------------------------------------------------------------------------------------- names
@pytest.mark.parametrize(
    "bucket, key",
    [
        ("model", "../x/Model.zip"),
        ("model", "1/../Model.zip"),
        ("model", "1/./Model.zip"),
        ("model", "/1/Model.zip"),
        ("model", "1//Model.zip"),
        ("model", ""),
        ("model", "1%2f/Model.zip"),
        ("..", KEY),
        ("../etc", KEY),
        ("", KEY),
        ("QoE-Model", KEY),  # fine for the local store, not for S3: uppercase
        ("qoe_model", KEY),  # underscore
        ("ab", KEY),  # too short
        ("a" * 64, KEY),  # too long
        ("-model", KEY),
        ("model-", KEY),
        ("my..model", KEY),
        ("my.-model", KEY),
        ("192.168.1.1", KEY),
        ("xn--model", KEY),
        ("model-s3alias", KEY),
    ],
)
def test_invalid_names(store: S3ObjectStore, model_file: Path, bucket: str, key: str) -> None:
    for call in (
        lambda: store.put_file(bucket, key, model_file),
        lambda: store.size(bucket, key),
        lambda: store.stream(bucket, key),
        lambda: store.delete(bucket, key),
    ):
        with pytest.raises(InvalidObjectName) as info:
            call()
        assert not info.value.retryable


def test_invalid_bucket_message_is_clear(store: S3ObjectStore, model_file: Path) -> None:
    with pytest.raises(InvalidObjectName, match="cannot be an S3 bucket.*lowercase"):
        store.put_file("QoE_Model", KEY, model_file)


@pytest.mark.parametrize("bucket", ["abc", "qoe-model", "model.v2", "a" * 63, "1model"])
def test_valid_s3_bucket_names(store: S3ObjectStore, model_file: Path, bucket: str) -> None:
    store.put_file(bucket, KEY, model_file)
    assert store.size(bucket, KEY) == model_file.stat().st_size
    store.delete(bucket, KEY)


# ------------------------------------------------------------------------------------------- outages
def test_server_down(model_file: Path) -> None:
    port = free_port()  # nothing listens there
    timeout = 1.0
    store = _store(f"127.0.0.1:{port}", timeout=timeout)

    started = time.monotonic()
    with pytest.raises(AdapterError) as info:
        store.put_file("model", KEY, model_file)
    elapsed = time.monotonic() - started
    assert info.value.retryable
    assert "unreachable" in str(info.value)
    assert elapsed < 3 * timeout + 2, f"took {elapsed:.1f} s"

    for call in (lambda: store.size("model", KEY), lambda: store.stream("model", KEY),
                 lambda: store.delete("model", KEY)):
        with pytest.raises(AdapterError) as info:
            call()
        assert info.value.retryable and not isinstance(info.value, ObjectNotFound)

    started = time.monotonic()
    assert store.ready() is False
    assert time.monotonic() - started < timeout + 1


def test_server_that_does_not_answer(model_file: Path) -> None:
    """A peer that accepts connections but never answers: the read timeout bounds each attempt."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        timeout = 0.5
        store = _store(f"127.0.0.1:{listener.getsockname()[1]}", timeout=timeout)
        started = time.monotonic()
        assert store.ready() is False
        assert time.monotonic() - started < 2 * timeout + 1
        started = time.monotonic()
        with pytest.raises(AdapterError) as info:
            store.size("model", KEY)
        assert info.value.retryable
        # HEAD is idempotent: 1 + 3 attempts of `timeout` each, plus the backoff (0 + 0.4 + 0.8 s).
        assert time.monotonic() - started < 4 * timeout + 1.2 + 2


class _Answering(http.server.ThreadingHTTPServer):
    """An S3 look-alike that answers every request with one status and S3 error body, and counts the requests."""

    daemon_threads = True

    def __init__(self, status: int, code: str):
        self.status, self.code, self.requests = status, code, 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(handler) -> None:  # noqa: N805
                self.requests += 1
                length = int(handler.headers.get("Content-Length") or 0)
                if length:
                    handler.rfile.read(length)
                body = (
                    f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{self.code}</Code>'
                    f"<Message>{self.code} says the test</Message><Resource>{handler.path}</Resource>"
                    "<RequestId>1</RequestId></Error>"
                ).encode()
                handler.send_response(self.status)
                handler.send_header("Content-Type", "application/xml")
                handler.send_header("Retry-After", "120")  # must not make us wait two minutes
                handler.send_header("Content-Length", str(0 if handler.command == "HEAD" else len(body)))
                handler.end_headers()
                if handler.command != "HEAD":
                    handler.wfile.write(body)

            do_GET = do_PUT = do_HEAD = do_DELETE = do_POST = _answer

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)


@pytest.fixture
def answering() -> Iterator[Callable[[int, str], tuple[_Answering, S3ObjectStore]]]:
    servers: list[_Answering] = []

    def start(status: int, code: str) -> tuple[_Answering, S3ObjectStore]:
        server = _Answering(status, code)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        store = S3ObjectStore(f"127.0.0.1:{server.server_address[1]}", access_key=ACCESS_KEY, secret_key=SECRET_KEY,
                              secure=False, region="us-east-1", timeout=TIMEOUT)
        return server, store

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_access_denied_is_not_retryable(answering, model_file: Path) -> None:
    server, store = answering(403, "AccessDenied")
    for call in (lambda: store.put_file("model", KEY, model_file), lambda: store.stream("model", KEY),
                 lambda: store.size("model", KEY)):
        with pytest.raises(AdapterError) as info:
            call()
        assert not info.value.retryable and not isinstance(info.value, ObjectNotFound)
        assert "AccessDenied" in str(info.value)
    assert server.requests == 3  # a 4xx is not retried
    assert store.ready()  # the server answers: reachable (the calls say what is wrong)


@pytest.mark.parametrize("status, code", [(503, "SlowDown"), (500, "InternalError")])
def test_server_errors_are_retried_then_retryable(answering, status: int, code: str) -> None:
    server, store = answering(status, code)
    started = time.monotonic()
    with pytest.raises(AdapterError) as info:
        store.stream("model", KEY)
    assert info.value.retryable and code in str(info.value)
    assert server.requests == 4  # 1 + 3 retries, Retry-After ignored, backoff 0 + 0.4 + 0.8 s
    assert time.monotonic() - started < 5
    assert store.ready() is False


def test_endpoint_forms() -> None:
    assert _store("http://127.0.0.1:9000/").endpoint == "127.0.0.1:9000"
    assert _store("https://s3.example.invalid:9000")._client._base_url.is_https
    with pytest.raises(ValueError):
        _store("")
    with pytest.raises(ValueError):
        S3ObjectStore("127.0.0.1:9000", access_key="a", secret_key="", secure=False, region=None, timeout=1)
    anonymous = S3ObjectStore("127.0.0.1:9000", access_key="", secret_key="", secure=False, region="us-east-1",
                              timeout=1)
    assert isinstance(anonymous, S3ObjectStore)


def test_s3_chunks_is_an_iterator() -> None:
    assert issubclass(S3Chunks, Iterator)
