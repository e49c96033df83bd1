"""Slow clients cannot starve the service (issue 9): `serve` reads requests in the worker's event loop, so uploads
that stall hold no thread; a request that has not arrived in full after TM_REQUEST_READ_TIMEOUT gets 408 and its
connection is closed; errors gunicorn answers itself (414, 431) are ProblemDetails.

Before: with gunicorn's plain gthread worker, seven connections announcing `Content-Length: 100000` and sending
5 bytes stopped /healthz from answering for as long as they stayed open."""
from __future__ import annotations

import contextlib
import json
import socket
import time
from typing import Iterator

import pytest
import requests

from tests.processes import assert_ready, free_port, served

READ_TIMEOUT = 4


def _stalled_upload(port: int, path: str = "/ai-ml-model-training/v1/training-jobs") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 "Content-Length: 100000\r\n\r\n{\"a\":".encode())
    return sock


@contextlib.contextmanager
def _closing_all(socks: list[socket.socket]) -> Iterator[list[socket.socket]]:
    try:
        yield socks
    finally:
        for sock in socks:
            sock.close()


def _read_all(sock: socket.socket, seconds: float) -> bytes:
    sock.settimeout(seconds)
    data = b""
    deadline = time.monotonic() + seconds
    with contextlib.suppress(OSError):
        while time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return data


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[str]:
    tmp_path = tmp_path_factory.mktemp("slow-clients")
    port = free_port()
    env = {"TM_DATA_DIR": str(tmp_path / "data"), "TM_WORKERS": "1", "TM_THREADS": "2",
           "TM_REQUEST_READ_TIMEOUT": str(READ_TIMEOUT), "TM_LOG_LEVEL": "WARNING"}
    with served(tmp_path, port, env) as process:
        url = f"http://127.0.0.1:{port}"
        assert_ready(url, process, 120, tmp_path / "server.log")
        yield url


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def test_fifty_stalled_uploads_leave_the_api_answering_within_a_second(server):
    # One worker with 2 threads: before, 2 stalled uploads were enough to take every thread.
    job = requests.get(f"{server}/ai-ml-model-training/v1/training-jobs", timeout=10)
    assert job.status_code == 200
    with _closing_all([_stalled_upload(_port(server)) for _ in range(50)]):
        time.sleep(0.5)  # let the server take them all in
        for path in ("/healthz", "/ai-ml-model-training/v1/training-jobs", "/ai-ml-model-training/v1/featureGroup"):
            started = time.monotonic()
            response = requests.get(server + path, timeout=10)
            elapsed = time.monotonic() - started
            assert response.status_code == 200, (path, response.text)
            assert elapsed < 1.0, f"GET {path} took {elapsed:.2f} s beside 50 stalled uploads"


def test_a_stalled_upload_is_answered_408_and_closed_after_the_read_timeout(server):
    with _closing_all([_stalled_upload(_port(server))]) as (sock,):
        started = time.monotonic()
        answer = _read_all(sock, READ_TIMEOUT + 10)
        elapsed = time.monotonic() - started
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert b"application/problem+json" in head
    assert json.loads(body) == {"title": "Request Timeout", "status": 408,
                                "detail": f"The request did not arrive within {READ_TIMEOUT} seconds"}
    assert READ_TIMEOUT - 0.5 <= elapsed < READ_TIMEOUT + 5, elapsed


def test_an_idle_connection_is_closed_without_an_answer(server):
    sock = socket.create_connection(("127.0.0.1", _port(server)), timeout=10)
    with _closing_all([sock]):
        assert _read_all(sock, READ_TIMEOUT + 10) == b""


def test_a_slow_but_steady_upload_within_the_timeout_is_served(server):
    body = json.dumps({"featureGroupName": "slowfg", "feature_list": "a,b", "datalake_source": "CSV",
                       "measurement": "cells.csv"}).encode()
    sock = socket.create_connection(("127.0.0.1", _port(server)), timeout=10)
    with _closing_all([sock]):
        sock.sendall(b"POST /ai-ml-model-training/v1/featureGroup HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nConnection: close\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode())
        for i in range(0, len(body), len(body) // 4 + 1):  # four pieces over ~1.5 s
            sock.sendall(body[i:i + len(body) // 4 + 1])
            time.sleep(0.4)
        answer = _read_all(sock, 20)
    assert answer.startswith(b"HTTP/1.1 "), answer[:200]
    status = int(answer.split()[1])
    assert status in (200, 201, 400), answer[:500]  # answered by the application, whatever it thinks of the body
    assert b"problem+json" in answer or b"application/json" in answer


def test_keep_alive_requests_on_one_connection_are_all_served(server):
    with requests.Session() as session:
        for _ in range(20):
            assert session.get(server + "/healthz", timeout=10).status_code == 200


@pytest.mark.parametrize("request_head, status, title", [
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "URI Too Long"),
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n", 431,
     "Request Header Fields Too Large"),
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n", 400, "Bad Request"),
])
def test_errors_gunicorn_answers_itself_are_problem_details(server, request_head, status, title):
    sock = socket.create_connection(("127.0.0.1", _port(server)), timeout=10)
    with _closing_all([sock]):
        sock.sendall(request_head)
        answer = _read_all(sock, 10)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode()), answer[:300]
    assert b"Content-Type: application/problem+json" in head
    problem = json.loads(body)
    assert problem["status"] == status and problem["title"] == title and problem["detail"]
    assert "<html" not in body.decode(errors="replace")


def test_a_stalled_chunked_upload_is_cut_off_by_the_receive_timeout_with_408(server):
    # Chunked bodies go to a thread at once (their length is unknown); the socket's receive timeout bounds them.
    sock = socket.create_connection(("127.0.0.1", _port(server)), timeout=10)
    with _closing_all([sock]):
        sock.sendall(b"POST /ai-ml-model-training/v1/featureGroup HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"a\":\r\n")
        started = time.monotonic()
        answer = _read_all(sock, READ_TIMEOUT + 10)
        elapsed = time.monotonic() - started
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), answer[:300]
    assert json.loads(body)["title"] == "Request Timeout"
    assert elapsed < READ_TIMEOUT + 5, elapsed


def test_metrics_of_unannounced_length_over_the_limit_are_a_413(server):
    # Chunked (no Content-Length): the limit applies while the body is read, so it is never held whole.
    def body():
        yield b'{"padding": "'
        for _ in range(40):
            yield b"x" * 65536
        yield b'"}'

    response = requests.post(f"{server}/ai-ml-model-training/v1/training-jobs/update-model-metrics/1",
                             data=body(), headers={"Content-Type": "application/json"}, timeout=30)
    assert response.status_code == 413, response.text
    assert response.headers["Content-Type"] == "application/problem+json"
    assert "1048576 bytes" in response.json()["detail"]


def test_a_large_body_is_read_in_full_by_the_loop_and_answered(server):
    # 5 MB arrives in many reads of the event loop before a thread sees the request: the application gets it whole.
    body = json.dumps({"model_id": {"modelname": "x" * (5 * 1024 * 1024), "modelversion": "1"}}).encode()
    response = requests.post(f"{server}/ai-ml-model-training/v1/training-jobs", data=body,
                             headers={"Content-Type": "application/json"}, timeout=60)
    assert response.status_code == 400, response.text[:300]
    assert "model_id.modelname" in response.json()["errors"]
