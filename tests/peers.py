"""Local HTTP doubles of peers we cannot run here. Each records the exact requests it gets."""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from trainingmgr.adapters.outbound import OutboundPolicy

# The doubles listen on this machine's loopback, which the outbound policy denies by default: adapters built
# directly in tests get this policy (apps get TM_OUTBOUND_ALLOW in tests/conftest.py).
LOCAL_OUTBOUND = OutboundPolicy(allow="127.0.0.1/32,localhost")


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that gave up (timeout tests) leaves a broken pipe behind: not worth a traceback


class HttpDouble:
    """The server plumbing both doubles share: start, url, stop, and `delay` (seconds before each answer, for the
    methods in `delay_methods`, or all)."""

    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self.lock = threading.Lock()
        self.delay = 0.0
        self.delay_methods: set[str] | None = None  # which requests `delay` applies to (None: all)
        self.server: ThreadingHTTPServer | None = None
        self._stopping = threading.Event()

    def handle(self, handler: BaseHTTPRequestHandler, recorded: Recorded) -> None:
        raise NotImplementedError

    def start(self) -> "HttpDouble":
        double = self

        class Handler(BaseHTTPRequestHandler):
            # HTTP/1.0: one request per connection, so a stopped double refuses every later request.
            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length", "0") or 0)
                body = self.rfile.read(length) if length else b""
                recorded = Recorded(self.command, self.path, dict(self.headers), body)
                with double.lock:
                    double.requests.append(recorded)
                if double.delay and (double.delay_methods is None or self.command in double.delay_methods):
                    double._stopping.wait(double.delay)  # a slow peer; stop() releases it
                double.handle(self, recorded)

            do_GET = do_POST = do_PUT = do_DELETE = _serve  # noqa: N815 (http.server's naming)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = _QuietServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        return self

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.server_address[1])

    def stop(self) -> None:
        """Stop listening: from now on connections to `url` are refused (the peer is down)."""
        self._stopping.set()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def recorded(self, method: str | None = None) -> list[Recorded]:
        with self.lock:
            return [r for r in self.requests if method is None or r.method == method]

    @staticmethod
    def answer(handler: BaseHTTPRequestHandler, status: int, body: Any, content_type: str = "application/json",
               headers: dict[str, str] | None = None) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode("utf-8")
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(data)



class RAppReceiver(HttpDouble):
    """An rApp's notification endpoint: answers `status` (200 by default) and records every POST."""

    def __init__(self, status: int = 200):
        super().__init__()
        self.status = status

    def handle(self, handler: BaseHTTPRequestHandler, recorded: Recorded) -> None:
        self.answer(handler, self.status, b"")

    @property
    def url(self) -> str:
        return f"{super().url}/notify"

    def bodies(self) -> list[dict[str, str]]:
        """Each notification's steps_state (the wire body is a JSON string holding the object)."""
        return [json.loads(r.json()) for r in self.recorded("POST")]


class DmeDouble(HttpDouble):
    """The DME information-job API: PUT /data-consumer/v1/info-jobs/<id> -> 201, DELETE -> 204 (404 if unknown).

    `fail_with` makes every call answer that status; `jobs` holds the jobs it has, by id.
    """

    PREFIX = "/data-consumer/v1/info-jobs/"

    def __init__(self) -> None:
        super().__init__()
        self.fail_with: int | None = None
        self.jobs: dict[str, Any] = {}

    @property
    def port(self) -> str:  # as a feature group's dme_port
        return str(super().port)

    def handle(self, handler: BaseHTTPRequestHandler, recorded: Recorded) -> None:
        job_id = recorded.path[len(self.PREFIX):]
        if self.fail_with:
            return self.answer(handler, self.fail_with, b"")
        if recorded.method == "PUT":
            self.jobs[job_id] = recorded.json()
            return self.answer(handler, 201, b"")
        if recorded.method == "DELETE":
            return self.answer(handler, 204 if self.jobs.pop(job_id, None) is not None else 404, b"")
        self.answer(handler, 405, b"")


class MmeDouble(HttpDouble):
    """The Model Management Service's discovery API: GET /ai-ml-model-discovery/v1/models?model-name&model-version
    answers the registered records of that model (200) or 404; `fail_with` makes it answer that status."""

    def __init__(self) -> None:
        super().__init__()
        self.models: dict[tuple[str, str], dict[str, Any]] = {}
        self.fail_with: int | None = None

    def register(self, name: str, version: str, location: str, input_data_type: str) -> None:
        self.models[(name, version)] = {
            "modelId": {"modelName": name, "modelVersion": version, "artifactVersion": "1.0.0"},
            "modelLocation": location,
            "modelInformation": {"inputDataType": input_data_type, "outputDataType": "prediction"},
        }

    def handle(self, handler: BaseHTTPRequestHandler, recorded: Recorded) -> None:
        parts = urlsplit(recorded.path)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        record = self.models.get((query.get("model-name", ""), query.get("model-version", "")))
        if self.fail_with:
            self.answer(handler, self.fail_with, {})
        elif parts.path != "/ai-ml-model-discovery/v1/models" or record is None:
            self.answer(handler, 404, {"detail": "not found"})
        else:
            self.answer(handler, 200, [record])
