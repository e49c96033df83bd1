"""HttpNotifier against a real HTTP server on 127.0.0.1: exact body bytes, headers, signature, failures, timeouts."""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

import pytest

from trainingmgr.adapters.notifier import HttpNotifier, sign
from trainingmgr.models.lifecycle import notification_body as steps_state_body
from trainingmgr.adapters.outbound import OutboundPolicy

# The receivers here are local HTTP servers standing in for rApps: this machine's loopback is allowed explicitly.
LOCAL = OutboundPolicy(allow="127.0.0.1/32")

STEPS = {
    "TRAINED_MODEL": "NOT_STARTED",  # deliberately out of order: the body must come out in step order
    "TRAINING": "IN_PROGRESS",
    "DATA_EXTRACTION": "FINISHED",
    "TRAINING_AND_TRAINED_MODEL": "NOT_STARTED",
    "DATA_EXTRACTION_AND_TRAINING": "FINISHED",
}
ORDERED_TEXT = (
    '{"DATA_EXTRACTION": "FINISHED", "DATA_EXTRACTION_AND_TRAINING": "FINISHED", "TRAINING": "IN_PROGRESS", '
    '"TRAINING_AND_TRAINED_MODEL": "NOT_STARTED", "TRAINED_MODEL": "NOT_STARTED"}'
)
# What the reference's receivers get on the wire: the text above as a JSON string literal.
WIRE_BODY = (
    b'"{\\"DATA_EXTRACTION\\": \\"FINISHED\\", \\"DATA_EXTRACTION_AND_TRAINING\\": \\"FINISHED\\", '
    b'\\"TRAINING\\": \\"IN_PROGRESS\\", \\"TRAINING_AND_TRAINED_MODEL\\": \\"NOT_STARTED\\", '
    b'\\"TRAINED_MODEL\\": \\"NOT_STARTED\\"}"'
)


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """A real HTTP server; `status` and `delay` say how it answers, `requests` records what it got."""

    server: ThreadingHTTPServer
    status: int = 200
    delay: float = 0.0
    location: str = ""
    requests: list[Received] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    # A proxy configured in the environment must not capture our loopback requests.
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")

    state: dict[str, Receiver] = {}

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            rec = state["r"]
            length = int(self.headers.get("Content-Length", "0"))
            body = self.rfile.read(length)
            rec.requests.append(Received(self.command, self.path, dict(self.headers.items()), body))
            if rec.delay:
                time.sleep(rec.delay)
            try:
                self.send_response(rec.status)
                if rec.location:
                    self.send_header("Location", rec.location)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")
            except OSError:  # the client gave up (timeout test)
                pass

        do_POST = _answer
        do_GET = _answer

        def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state["r"] = Receiver(server)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield state["r"]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_steps_state_body_orders_the_steps() -> None:
    assert steps_state_body(STEPS) == ORDERED_TEXT
    assert list(json.loads(steps_state_body(STEPS))) == [
        "DATA_EXTRACTION",
        "DATA_EXTRACTION_AND_TRAINING",
        "TRAINING",
        "TRAINING_AND_TRAINED_MODEL",
        "TRAINED_MODEL",
    ]
    # Missing steps are NOT_STARTED; unknown keys are not sent.
    partial = json.loads(steps_state_body({"DATA_EXTRACTION": "FAILED", "OTHER": "x"}))
    assert partial["DATA_EXTRACTION"] == "FAILED" and partial["TRAINED_MODEL"] == "NOT_STARTED" and "OTHER" not in partial


def test_200_is_delivered_with_the_reference_body(receiver: Receiver) -> None:
    notifier = HttpNotifier(outbound=LOCAL, timeout=2)
    assert notifier.send(receiver.url + "/rapp/notify?x=1", steps_state_body(STEPS), "delivery-42") is True
    [got] = receiver.requests
    assert got.method == "POST" and got.path == "/rapp/notify?x=1"
    assert got.body == WIRE_BODY
    assert json.loads(json.loads(got.body)) == json.loads(ORDERED_TEXT)
    assert got.headers["Content-Type"] == "application/json"
    assert got.headers["X-TM-Delivery-Id"] == "delivery-42"
    assert got.headers["Content-Length"] == str(len(WIRE_BODY))
    assert "X-TM-Signature" not in got.headers  # no key, no signature


def test_hmac_signature_over_the_exact_body(receiver: Receiver) -> None:
    key = "shared-secret"
    notifier = HttpNotifier(outbound=LOCAL, timeout=2, hmac_key=key)
    assert notifier.send(receiver.url, steps_state_body(STEPS), "d-1") is True
    [got] = receiver.requests
    expected = "sha256=" + hmac.new(key.encode(), got.body, hashlib.sha256).hexdigest()
    assert got.headers["X-TM-Signature"] == expected
    assert got.body == WIRE_BODY  # the signature adds a header, never changes the body
    assert sign(key, WIRE_BODY) == expected


def test_the_delivery_id_repeats_across_attempts(receiver: Receiver) -> None:
    notifier = HttpNotifier(outbound=LOCAL, timeout=2)
    receiver.status = 500
    assert notifier.send(receiver.url, "x", "same-id") is False
    receiver.status = 200
    assert notifier.send(receiver.url, "x", "same-id") is True
    assert [r.headers["X-TM-Delivery-Id"] for r in receiver.requests] == ["same-id", "same-id"]
    assert [r.body for r in receiver.requests] == [b'"x"', b'"x"']


@pytest.mark.parametrize("status", [201, 202, 204, 400, 404, 500, 503])
def test_anything_but_200_is_not_delivered(receiver: Receiver, status: int, caplog: pytest.LogCaptureFixture) -> None:
    receiver.status = status
    with caplog.at_level(logging.WARNING, logger="trainingmgr.adapters.notifier"):
        assert HttpNotifier(outbound=LOCAL, timeout=2).send(receiver.url + "/secret-path?token=abc", "the-body-text", "d") is False
    assert len(receiver.requests) == 1  # exactly one attempt: retries are the caller's
    [record] = caplog.records
    message = record.getMessage()
    assert "127.0.0.1" in message and str(status) in message
    logged = message + json.dumps({k: str(v) for k, v in vars(record).items()})
    assert "the-body-text" not in logged and "token=abc" not in logged and "secret-path" not in logged


def test_redirects_are_not_followed(receiver: Receiver) -> None:
    receiver.status = 307
    receiver.location = "http://127.0.0.1:9/elsewhere"
    assert HttpNotifier(outbound=LOCAL, timeout=2).send(receiver.url, "x", "d") is False
    assert len(receiver.requests) == 1


def test_a_slow_receiver_times_out(receiver: Receiver, caplog: pytest.LogCaptureFixture) -> None:
    receiver.delay = 1.5
    notifier = HttpNotifier(outbound=LOCAL, timeout=0.3)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="trainingmgr.adapters.notifier"):
        assert notifier.send(receiver.url, "x", "d") is False
    assert time.monotonic() - started < 1.2
    assert "Timeout" in caplog.text and "127.0.0.1" in caplog.text


def test_connection_refused_is_not_delivered() -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert HttpNotifier(outbound=LOCAL, timeout=1).send(f"http://127.0.0.1:{port}/", "x", "d") is False


@pytest.mark.parametrize(
    "url",
    ["file:///etc/passwd", "ftp://127.0.0.1/x", "gopher://127.0.0.1:70/", "javascript:alert(1)", "127.0.0.1:8080/x", "", "http://", "http:///path"],
)
def test_only_http_and_https_urls(receiver: Receiver, url: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="trainingmgr.adapters.notifier"):
        assert HttpNotifier(outbound=LOCAL, timeout=1).send(url, "x", "d") is False
    assert "only http and https" in caplog.text
    assert receiver.requests == []


def test_bad_header_value_is_not_delivered(receiver: Receiver) -> None:
    assert HttpNotifier(outbound=LOCAL, timeout=1).send(receiver.url, "x", "bad\r\nInjected: 1") is False
    assert receiver.requests == []


def test_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError):
        HttpNotifier(outbound=LOCAL, timeout=0)
