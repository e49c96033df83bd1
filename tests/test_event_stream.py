"""Live job events (GET /ai-ml-model-training/v1/events, Server-Sent Events): under `serve` (real gunicorn) and in
process; resuming with Last-Event-ID across a restart and across replicas; filters; the per-process limit; open
streams that hold no request thread."""
from __future__ import annotations

import concurrent.futures
import json
import socket
import time
from typing import Any, Iterator

import pytest
import requests

from tests.processes import free_port, ready_server
from tests.test_training_lifecycle import FEATURES, RETRAINING_YAML, TRAINING_YAML, job_request
from trainingmgr.api import event_stream
from trainingmgr.api.event_stream import EventHub, Stream, StreamFilter

EVENTS = "/ai-ml-model-training/v1/events"
JOBS = "/ai-ml-model-training/v1/training-jobs"
WAIT = 60  # seconds any one wait below may take on a loaded machine


def sse(lines: Iterator[str]) -> Iterator[dict[str, Any] | None]:
    """Parsed events of an SSE line iterator: {"id", "event", "data"}; None for a comment (a heartbeat)."""
    current: dict[str, Any] = {}
    for line in lines:
        if line == "":
            if "data" in current:  # (the opening `retry:` line is no event)
                yield current
            current = {}
        elif line.startswith(":"):
            yield None
        else:
            name, _, value = line.partition(": ")
            current[name] = json.loads(value) if name == "data" else value


def prepare(url: str) -> None:
    """A feature group and the example pipelines, through the API."""
    fg = {"featuregroup_name": "cell_kpis", "feature_list": FEATURES, "datalake_source": "CsvSource",
          "measurement": "cell_kpis.csv", "enable_dme": False}
    assert requests.post(url + "/ai-ml-model-training/v1/featureGroup", json=fg, timeout=WAIT).status_code in (201, 409)
    for name, file in (("qoe_training", TRAINING_YAML), ("qoe_retraining", RETRAINING_YAML)):
        with file.open("rb") as f:
            assert requests.post(f"{url}/pipelines/{name}/upload", files={"file": (file.name, f)},
                                 timeout=WAIT).status_code == 200


def read_until(events: Iterator[dict[str, Any]], done, seconds: float = WAIT) -> list[dict[str, Any]]:
    """Events until done(events so far) holds; the stream's read timeout bounds each wait."""
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + seconds
    for event in events:
        if event is not None:
            seen.append(event)
            if done(seen):
                return seen
        assert time.monotonic() < deadline, seen
    raise AssertionError(f"the stream ended after {len(seen)} events")


def open_stream(url: str, **params: Any) -> requests.Response:
    headers = {"Last-Event-ID": str(params.pop("last_event_id"))} if "last_event_id" in params else {}
    response = requests.get(url + EVENTS, params=params, headers=headers, stream=True, timeout=(10, WAIT))
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/event-stream")
    return response


def finished(job_id: int):
    return lambda seen: any(e["data"]["job_id"] == job_id and e["data"]["step"] == "TRAINED_MODEL" for e in seen)


@pytest.fixture
def service(tmp_path):
    port = free_port()
    env = {"TM_DATA_DIR": str(tmp_path / "data"), "TM_WORKERS": "2", "TM_DATABASE_URL": "",
           "TM_WORKER_POLL_SECONDS": "0.1"}
    with ready_server(tmp_path, env, port=port) as url:
        prepare(url)
        yield url, tmp_path, port, env


def test_a_job_is_followed_live_and_a_stream_resumes_after_a_restart(service):
    url, folder, port, env = service
    stream = open_stream(url)
    job_id = requests.post(url + JOBS, json=job_request(), timeout=WAIT).json()["id"]
    events = read_until(sse(stream.iter_lines(decode_unicode=True)), finished(job_id))
    stream.close()
    changes = [(e["data"]["step"], e["data"]["to"]) for e in events if e["data"]["job_id"] == job_id]
    assert changes[0] == (None, "NOT_STARTED") and changes[-1] == ("TRAINED_MODEL", "FINISHED")
    assert len(changes) == 10
    ids = [int(e["id"]) for e in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids) and all(e["event"] == "job" for e in events)
    assert events[-1]["data"]["modelname"] == "qoe" and events[-1]["data"]["job_status"] in ("FINISHED",
                                                                                          "IN_PROGRESS")
    # Resume from the fourth event: exactly the rest, once.
    resumed = open_stream(url, last_event_id=ids[3])
    again = read_until(sse(resumed.iter_lines(decode_unicode=True)), finished(job_id))
    resumed.close()
    assert [int(e["id"]) for e in again] == ids[4:]


def test_a_stream_resumes_across_a_restart(tmp_path):
    port = free_port()
    # A step the first process held when it stopped is taken over once its lease ends: keep that short.
    env = {"TM_DATA_DIR": str(tmp_path / "data"), "TM_WORKERS": "1", "TM_DATABASE_URL": "", "TM_LEASE_SECONDS": "3"}
    with ready_server(tmp_path, env, port=port, name="first") as url:
        prepare(url)
        job_id = requests.post(url + JOBS, json=job_request(), timeout=WAIT).json()["id"]
        stream = open_stream(url, last_event_id=0)
        first = read_until(sse(stream.iter_lines(decode_unicode=True)), lambda seen: len(seen) >= 2)
        stream.close()
    with ready_server(tmp_path, env, port=port, name="second") as url:  # the same database, a new process
        stream = open_stream(url, last_event_id=first[-1]["id"])
        rest = read_until(sse(stream.iter_lines(decode_unicode=True)), finished(job_id))
        stream.close()
    ids = [int(e["id"]) for e in first + rest]
    assert ids == list(range(ids[0], ids[0] + len(ids))), "nothing lost or repeated across the restart"


def test_filters_by_job_and_by_model(service):
    url, *_ = service
    by_model = open_stream(url, modelname="other", modelversion="2")
    first = requests.post(url + JOBS, json=job_request(), timeout=WAIT).json()["id"]
    by_job = open_stream(url, job_id=first, last_event_id=0)
    second = requests.post(url + JOBS, json=job_request("other", "2"), timeout=WAIT).json()["id"]
    only_first = read_until(sse(by_job.iter_lines(decode_unicode=True)), finished(first))
    only_other = read_until(sse(by_model.iter_lines(decode_unicode=True)), finished(second))
    by_job.close()
    by_model.close()
    assert {e["data"]["job_id"] for e in only_first} == {first}
    assert {(e["data"]["modelname"], e["data"]["modelversion"]) for e in only_other} == {("other", "2")}
    for bad in ({"job_id": "x"}, {"modelversion": "1"}):
        answer = requests.get(url + EVENTS, params=bad, timeout=WAIT)
        assert answer.status_code == 400 and answer.headers["Content-Type"] == "application/problem+json"
    assert requests.get(url + EVENTS, headers={"Last-Event-ID": "abc"}, timeout=WAIT).status_code == 400


def _raw_stream(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    sock.sendall(f"GET {EVENTS} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n".encode())
    return sock


def test_two_hundred_open_streams_leave_the_api_answering(service):
    url, _, port, _ = service
    streams = []
    try:
        for _ in range(200):
            streams.append(_raw_stream(port))
        for sock in streams:  # every stream got its head: none waits for a thread
            head = b""
            while b"retry: 3000" not in head:
                chunk = sock.recv(4096)
                assert chunk, "a stream was closed"
                head += chunk
            assert head.startswith(b"HTTP/1.1 200")
        for path in ("/healthz", JOBS, "/pipelines"):
            assert requests.get(url + path, timeout=10).status_code == 200, path
        job_id = requests.post(url + JOBS, json=job_request(), timeout=10).json()["id"]
        # ... and every one of them hears of the new job.
        for sock in streams:
            seen = b""
            while f'"job_id": {job_id}'.encode() not in seen:
                chunk = sock.recv(65536)
                assert chunk, "a stream was closed"
                seen += chunk
    finally:
        for sock in streams:
            sock.close()


def test_past_the_limit_a_stream_is_refused_with_503(tmp_path):
    env = {"TM_DATA_DIR": str(tmp_path / "data"), "TM_WORKERS": "1", "TM_DATABASE_URL": "",
           "TM_MAX_EVENT_STREAMS": "3"}
    with ready_server(tmp_path, env) as url:
        streams = [open_stream(url) for _ in range(3)]
        # Their first lines: the hub has them. (The line iterators are kept: a dropped one closes its connection.)
        lines = [stream.iter_lines() for stream in streams]
        assert [next(line) for line in lines] == [b"retry: 3000"] * 3
        refused = requests.get(url + EVENTS, timeout=WAIT)
        assert refused.status_code == 503 and refused.headers.get("Retry-After")
        assert "TM_MAX_EVENT_STREAMS" in refused.json()["detail"]
        for stream in streams:
            stream.close()
        deadline = time.monotonic() + WAIT  # closed streams free their places
        while True:
            with requests.get(url + EVENTS, stream=True, timeout=WAIT) as again:
                if again.status_code == 200:
                    break
            assert time.monotonic() < deadline
            time.sleep(0.5)


# ---------------------------------------------------------------------------------------------- in process
def test_in_process_streams_send_heartbeats_and_end_when_closed(app, monkeypatch):
    monkeypatch.setattr(event_stream, "HEARTBEAT_SECONDS", 0.2)
    monkeypatch.setattr(event_stream, "POLL_SECONDS", 0.05)
    response = app.test_client().get(EVENTS, buffered=False)
    chunks = response.iter_encoded()
    assert next(chunks) == b"retry: 3000\n\n"
    assert next(chunks) == b": keep-alive\n\n"
    response.close()
    the_hub = app.extensions["trainingmgr_event_hub"]["hub"]
    deadline = time.monotonic() + WAIT
    while (the_hub.streams or the_hub.thread is not None) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert the_hub.streams == [] and the_hub.thread is None, "no stream, no thread: the database is not asked"


def test_an_id_that_is_not_committed_yet_is_waited_for(app, monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(event_stream.time, "monotonic", lambda: clock[0])
    the_hub = EventHub(app, 10)
    the_hub.watermark = 5
    the_hub._advance_watermark([6, 8, 9])
    assert the_hub.watermark == 6, "7 may still commit: 8 and 9 wait"
    clock[0] += event_stream.GAP_SECONDS / 2
    the_hub._advance_watermark([8, 9])
    assert the_hub.watermark == 6
    the_hub._advance_watermark([7, 8, 9])
    assert the_hub.watermark == 9, "7 came: all pass"
    the_hub._advance_watermark([11])
    clock[0] += event_stream.GAP_SECONDS
    the_hub._advance_watermark([11])
    assert the_hub.watermark == 11, "10 never came (rolled back): given up after GAP_SECONDS"


def test_a_client_that_does_not_read_is_dropped():
    reader, writer = socket.socketpair()
    try:
        writer.setblocking(False)
        stream = Stream(StreamFilter(), 0, sock=writer)
        blob = b"x" * 65536
        for _ in range(200):  # far more than the socket buffers hold
            stream.put(blob)
            stream.flush()
            if stream.closed:
                break
        assert stream.closed, "a stream more than MAX_PENDING_BYTES behind is given up"
    finally:
        reader.close()
        writer.close()


def test_a_new_stream_starts_with_the_next_event_even_after_earlier_streams(app, monkeypatch):
    """Without Last-Event-ID a stream starts with what happens next, also when an earlier stream of the process
    has come and gone while events were written."""
    from tests.factories import create_file_feature_group, upload_pipeline
    from tests.test_training_lifecycle import FEATURES, RETRAINING_YAML, TRAINING_YAML

    monkeypatch.setattr(event_stream, "POLL_SECONDS", 0.05)
    client = app.test_client()
    first = client.get(EVENTS, buffered=False)
    assert next(first.iter_encoded()) == b"retry: 3000\n\n"
    first.close()
    create_file_feature_group(client, "cell_kpis", measurement="cell_kpis.csv", feature_list=FEATURES)
    upload_pipeline(client, "qoe_training", TRAINING_YAML)
    upload_pipeline(client, "qoe_retraining", RETRAINING_YAML)
    old = client.post(JOBS, json=job_request()).get_json()["id"]  # written while no stream is open
    later = client.get(EVENTS, buffered=False)
    chunks = later.iter_encoded()
    assert next(chunks) == b"retry: 3000\n\n"
    new = client.post(JOBS, json=job_request("other")).get_json()["id"]
    event = next(chunks)
    later.close()
    assert f'"job_id": {new}'.encode() in event and f'"job_id": {old},'.encode() not in event


def test_http_1_0_streams_are_not_chunked_and_hold_no_thread_either(service):
    """Before: an HTTP/1.0 stream kept its request thread, so 8 of them (2 processes x 4 threads) stopped the API."""
    url, _, port, _ = service
    socks = []
    try:
        for _ in range(12):
            sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
            socks.append(sock)
            sock.sendall(f"GET {EVENTS} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
        heads = []
        for sock in socks:
            head = b""
            while b"retry: 3000" not in head:
                chunk = sock.recv(4096)
                assert chunk
                head += chunk
            heads.append(head)
        assert all(b"Transfer-Encoding: chunked" not in head and b"\r\n\r\nretry: 3000\n\n" in head
                   for head in heads)
        for path in ("/healthz", JOBS):
            assert requests.get(url + path, timeout=10).status_code == 200, path
        job_id = requests.post(url + JOBS, json=job_request(), timeout=WAIT).json()["id"]
        for sock in socks:
            seen = b""
            while f'"job_id": {job_id}'.encode() not in seen:
                chunk = sock.recv(65536)
                assert chunk
                seen += chunk
            assert seen.startswith(b"id: "), "frames only, no chunk sizes"
    finally:
        for sock in socks:
            sock.close()


def test_simultaneous_requests_do_not_pass_the_limit(tmp_path):
    """The slot is taken when the request is answered, not when its body starts: 12 requests at once against a
    limit of 3 get 3 streams (before: a few more slipped through between the check and the stream's start)."""
    env = {"TM_DATA_DIR": str(tmp_path / "data"), "TM_WORKERS": "1", "TM_THREADS": "8", "TM_DATABASE_URL": "",
           "TM_MAX_EVENT_STREAMS": "3"}
    with ready_server(tmp_path, env) as url:
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(lambda _: requests.get(url + EVENTS, stream=True, timeout=WAIT), range(12)))
        try:
            statuses = sorted(answer.status_code for answer in answers)
            assert statuses == [200] * 3 + [503] * 9, statuses
        finally:
            for answer in answers:
                answer.close()


def test_an_in_process_reader_that_does_not_read_is_dropped_too():
    stream = Stream(StreamFilter(), 0)  # no socket: a request thread reads its queue
    blob = b"x" * 65536
    for _ in range(200):
        stream.put(blob)
        if stream.closed:
            break
    assert stream.closed and stream.queued <= event_stream.MAX_PENDING_BYTES + len(blob)
