"""A local double of the Kubeflow Pipelines API server (v2beta1): the routes kfp 2.17's client uses, state in memory.

It records every request (method, path, query, headers, body) so tests assert exactly what was sent, and has
switches to be down (stopped), slow (answers after `slow` seconds), failing (answers `fail_status`, for every
request or the next `fail_next` ones) or to ignore list filters (an old server: the client must page), and a hook
that sees each request before it is answered (to change the state under the client's feet).

Behaviour follows the real server where the client can tell: page_size defaults to 20 and is capped at 200,
next_page_token is opaque, errors are grpc-gateway bodies {"error", "code", "message", "details"}, an upload makes
the pipeline and its first version (named like the pipeline), names are unique (409), a new run is PENDING,
terminating an ended run is a failed precondition (400).
"""
from __future__ import annotations

import itertools
import json
import re
import threading
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from email import policy
from email.parser import BytesParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

import yaml

PREFIX = "/apis/v2beta1"
DEFAULT_PAGE_SIZE = 20
MAX_PAGE_SIZE = 200
ENDED = {"SUCCEEDED", "FAILED", "SKIPPED", "CANCELED", "ERROR", "TERMINATED"}
GRPC_CODES = {400: 3, 401: 16, 403: 7, 404: 5, 409: 6, 412: 9, 429: 8, 500: 13, 501: 12, 503: 14, 504: 4}


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # names in lower case
    body: bytes

    def q(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[0] if values else None

    def json(self) -> Any:
        return json.loads(self.body)

    def form(self) -> dict[str, tuple[str | None, bytes]]:
        """The multipart/form-data fields: name -> (filename, bytes)."""
        return _multipart(self.headers.get("content-type", ""), self.body)


class Fail(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def _multipart(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    message = BytesParser(policy=policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body
    )
    if not message.is_multipart():
        raise Fail(400, "the request is not multipart/form-data")
    fields = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        fields[str(name)] = (part.get_filename(), part.get_payload(decode=True) or b"")
    return fields


@dataclass
class KfpDouble:
    slow: float = 0.0  # seconds every answer waits
    fail_status: int | None = None  # answer every request with this status
    fail_next: int = 0  # answer the next N requests with `fail_next_status`
    fail_next_status: int = 500
    ignore_filters: bool = False  # list everything whatever the filter (an old server)
    hook: Callable[[Request], None] | None = None  # called before each request is answered (e.g. to race it)
    requests: list[Request] = field(default_factory=list)
    pipelines: dict[str, dict[str, Any]] = field(default_factory=dict)
    versions: dict[str, dict[str, Any]] = field(default_factory=dict)
    experiments: dict[str, dict[str, Any]] = field(default_factory=dict)
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    port: int = 0
    server: ThreadingHTTPServer | None = None
    lock: threading.RLock = field(default_factory=threading.RLock)
    _wake: threading.Event = field(default_factory=threading.Event)
    _clock: Any = field(default_factory=lambda: itertools.count(1))

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "KfpDouble":
        """Listen on 127.0.0.1 (the same port again after a stop)."""
        double = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                double._handle(self)

            do_POST = do_PATCH = do_DELETE = do_GET

            def log_message(self, *args: Any) -> None:
                pass

        self._wake.clear()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        return self

    def stop(self) -> None:
        """Down: the port refuses connections (answers still waiting on `slow` are cut short)."""
        self._wake.set()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ------------------------------------------------------------------ for tests
    def calls(self, method: str | None = None, path: str | None = None) -> list[Request]:
        """The recorded requests, optionally only those of a method and a path (exact, or a prefix ending '*')."""
        with self.lock:
            found = list(self.requests)
        if method is not None:
            found = [r for r in found if r.method == method]
        if path is not None:
            if path.endswith("*"):
                found = [r for r in found if r.path.startswith(path[:-1])]
            else:
                found = [r for r in found if r.path == path]
        return found

    def routes(self) -> list[tuple[str, str]]:
        return [(r.method, r.path) for r in self.calls()]

    def clear(self) -> None:
        with self.lock:
            self.requests.clear()

    def add_pipeline(self, name: str, spec: dict[str, Any] | None = None) -> dict[str, Any]:
        """A pipeline (and its first version) as an upload would make it."""
        with self.lock:
            return self._create_pipeline(name, "", spec or {"pipelineInfo": {"name": name}})

    def add_version(self, pipeline_id: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            return self._create_version(pipeline_id, name, "", spec)

    def add_experiment(self, name: str) -> dict[str, Any]:
        with self.lock:
            return self._create_experiment({"display_name": name})

    def run_named(self, display_name: str) -> dict[str, Any]:
        with self.lock:
            (run,) = [r for r in self.runs.values() if r["display_name"] == display_name]
            return run

    def set_run_state(self, run_id: str, state: str, error: str | None = None) -> None:
        with self.lock:
            run = self.runs[run_id]
            run["state"] = state
            run["state_history"].append({"update_time": self._now(), "state": state})
            if error is not None:
                run["error"] = {"code": 2, "message": error, "details": []}
            if state in ENDED:
                run["finished_at"] = self._now()

    # ------------------------------------------------------------------ HTTP
    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(handler.path)
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        request = Request(handler.command, parts.path, parse_qs(parts.query, keep_blank_values=True),
                          {k.lower(): v for k, v in handler.headers.items()}, body)
        with self.lock:
            self.requests.append(request)
            failing = self.fail_status
            if failing is None and self.fail_next > 0:
                self.fail_next -= 1
                failing = self.fail_next_status
        if self.slow > 0 and self._wake.wait(self.slow):
            return  # stopped meanwhile: no answer
        try:
            if failing is not None:
                raise Fail(failing, "the double was told to fail")
            with self.lock:
                if self.hook is not None:
                    self.hook(request)
                status, answer = 200, self._route(request)
        except Fail as e:
            status = e.status
            answer = {"error": e.message, "code": GRPC_CODES.get(e.status, 2), "message": e.message, "details": []}
        data = json.dumps(answer).encode()
        try:
            handler.send_response(status)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            handler.wfile.write(data)
        except OSError:
            pass  # the client gave up (timed out) meanwhile

    def _route(self, r: Request) -> Any:
        path, m = r.path, r.method
        if not path.startswith(PREFIX):
            raise Fail(404, f"no route {path}")
        path = path[len(PREFIX):]
        if m == "GET" and path == "/healthz":
            return {"multi_user": False, "pipeline_store": "database"}
        if m == "POST" and path == "/pipelines/upload":
            return self._upload(r)
        if m == "POST" and path == "/pipelines/upload_version":
            return self._upload_version(r)
        if m == "GET" and path == "/pipelines":
            return self._list(r, self.pipelines.values(), "pipelines")
        if match := re.fullmatch(r"/pipelines/([^/]+)", path):
            if m == "GET":
                return self._get(self.pipelines, match.group(1), "pipeline")
        if match := re.fullmatch(r"/pipelines/([^/]+)/versions", path):
            if m == "GET":
                self._get(self.pipelines, match.group(1), "pipeline")
                versions = [v for v in self.versions.values() if v["pipeline_id"] == match.group(1)]
                return self._list(r, versions, "pipeline_versions")
        if match := re.fullmatch(r"/pipelines/([^/]+)/versions/([^/]+)", path):
            if m == "GET":
                return self._get(self.versions, match.group(2), "pipeline version")
        if path == "/experiments":
            if m == "GET":
                return self._list(r, self.experiments.values(), "experiments")
            if m == "POST":
                body = self._json(r)
                if not body.get("display_name"):
                    raise Fail(400, "experiment display_name is empty")
                if any(e["display_name"] == body["display_name"] for e in self.experiments.values()):
                    raise Fail(409, f"experiment {body['display_name']} already exists")
                return self._create_experiment(body)
        if path == "/runs":
            if m == "GET":
                runs = list(self.runs.values())
                if r.q("experiment_id"):
                    runs = [x for x in runs if x["experiment_id"] == r.q("experiment_id")]
                return self._list(r, runs, "runs")
            if m == "POST":
                return self._create_run(self._json(r))
        if match := re.fullmatch(r"/runs/([^/:]+)", path):
            if m == "GET":
                return self._get(self.runs, match.group(1), "run")
        if match := re.fullmatch(r"/runs/([^/:]+):terminate", path):
            if m == "POST":
                run = self._get(self.runs, match.group(1), "run")
                if run["state"] in ENDED:
                    raise Fail(400, f"run {run['run_id']} ended already ({run['state']})")
                self.set_run_state(run["run_id"], "CANCELING")
                return {}
        raise Fail(404, f"no route {m} {r.path}")

    # ------------------------------------------------------------------ resources
    def _now(self) -> str:
        moment = datetime(2024, 1, 1, tzinfo=timezone.utc) + timedelta(seconds=next(self._clock))
        return moment.isoformat().replace("+00:00", "Z")

    @staticmethod
    def _json(r: Request) -> dict[str, Any]:
        try:
            body = json.loads(r.body or b"{}")
        except ValueError:
            raise Fail(400, "the body is not JSON") from None
        if not isinstance(body, dict):
            raise Fail(400, "the body is not a JSON object")
        return body

    @staticmethod
    def _get(table: dict[str, dict[str, Any]], key: str, kind: str) -> dict[str, Any]:
        if key not in table:
            raise Fail(404, f"{kind} {key} not found")
        return table[key]

    def _uploaded_spec(self, r: Request) -> dict[str, Any]:
        fields = r.form()
        if "uploadfile" not in fields:
            raise Fail(400, "the multipart field uploadfile is missing")
        try:
            spec = next(yaml.safe_load_all(fields["uploadfile"][1]), None)
        except yaml.YAMLError:
            raise Fail(400, "the uploaded file is not YAML") from None
        if not isinstance(spec, dict) or "root" not in spec:
            raise Fail(400, "the uploaded file is not a compiled pipeline")
        return json.loads(json.dumps(spec))

    def _upload(self, r: Request) -> dict[str, Any]:
        spec = self._uploaded_spec(r)
        name = r.q("display_name") or r.q("name") or r.form()["uploadfile"][0] or ""
        if any((p["display_name"]) == name for p in self.pipelines.values()):
            raise Fail(409, f"pipeline {name} already exists")
        return self._create_pipeline(name, r.q("description") or "", spec)

    def _upload_version(self, r: Request) -> dict[str, Any]:
        spec = self._uploaded_spec(r)
        pipeline = self._get(self.pipelines, r.q("pipelineid") or "", "pipeline")
        name = r.q("display_name") or r.q("name") or ""
        if not name:
            raise Fail(400, "the version name is empty")
        if any(v["pipeline_id"] == pipeline["pipeline_id"] and v["display_name"] == name
               for v in self.versions.values()):
            raise Fail(409, f"pipeline version {name} already exists")
        return self._create_version(pipeline["pipeline_id"], name, r.q("description") or "", spec)

    def _create_pipeline(self, name: str, description: str, spec: dict[str, Any]) -> dict[str, Any]:
        pipeline = {"pipeline_id": str(uuid.uuid4()), "display_name": name, "name": name,
                    "description": description, "created_at": self._now()}
        self.pipelines[pipeline["pipeline_id"]] = pipeline
        self._create_version(pipeline["pipeline_id"], name, description, spec)
        return pipeline

    def _create_version(self, pipeline_id: str, name: str, description: str, spec: dict[str, Any]) -> dict[str, Any]:
        version = {"pipeline_id": pipeline_id, "pipeline_version_id": str(uuid.uuid4()), "display_name": name,
                   "name": name, "description": description, "created_at": self._now(), "pipeline_spec": spec}
        self.versions[version["pipeline_version_id"]] = version
        return version

    def _create_experiment(self, body: dict[str, Any]) -> dict[str, Any]:
        experiment = {"experiment_id": str(uuid.uuid4()), "display_name": body["display_name"],
                      "description": body.get("description") or "", "created_at": self._now(),
                      "namespace": body.get("namespace") or "", "storage_state": "AVAILABLE"}
        self.experiments[experiment["experiment_id"]] = experiment
        return experiment

    def _create_run(self, body: dict[str, Any]) -> dict[str, Any]:
        if not body.get("display_name"):
            raise Fail(400, "run display_name is empty")
        experiment_id = body.get("experiment_id")
        if experiment_id:
            self._get(self.experiments, experiment_id, "experiment")
        reference = body.get("pipeline_version_reference")
        if reference:
            version = self._get(self.versions, reference.get("pipeline_version_id") or "", "pipeline version")
            if reference.get("pipeline_id") and reference["pipeline_id"] != version["pipeline_id"]:
                raise Fail(400, "the version does not belong to the pipeline")
        elif not isinstance(body.get("pipeline_spec"), dict):
            raise Fail(400, "a run needs pipeline_version_reference or pipeline_spec")
        now = self._now()
        run = {
            "run_id": str(uuid.uuid4()),
            "experiment_id": experiment_id or "",
            "display_name": body["display_name"],
            "storage_state": "AVAILABLE",
            "pipeline_version_reference": reference,
            "pipeline_spec": body.get("pipeline_spec"),
            "runtime_config": body.get("runtime_config") or {},
            "service_account": body.get("service_account") or "",
            "created_at": now,
            "scheduled_at": now,
            "state": "PENDING",
            "state_history": [{"update_time": now, "state": "PENDING"}],
        }
        self.runs[run["run_id"]] = run
        return run

    # ------------------------------------------------------------------ lists
    def _matches(self, item: dict[str, Any], predicates: list[dict[str, Any]]) -> bool:
        for p in predicates:
            value = p.get("stringValue", p.get("string_value"))
            if item.get(p["key"]) != value:
                return False
        return True

    def _predicates(self, r: Request) -> list[dict[str, Any]]:
        text = r.q("filter")
        if not text or self.ignore_filters:
            return []
        try:
            predicates = json.loads(text).get("predicates") or []
        except (ValueError, AttributeError):
            raise Fail(400, "the filter is not a JSON Filter") from None
        for p in predicates:
            if p.get("operation") not in (1, "EQUALS") or p.get("key") not in ("display_name", "name"):
                raise Fail(400, f"unsupported predicate {p}")
        return predicates

    def _list(self, r: Request, items: Any, key: str) -> dict[str, Any]:
        predicates = self._predicates(r)
        selected = [i for i in items if self._matches(i, predicates)]
        sort_by = (r.q("sort_by") or "").strip()
        if sort_by:
            field_name, _, order = sort_by.partition(" ")
            if field_name not in ("created_at", "display_name", "name"):
                raise Fail(400, f"cannot sort by {field_name}")
            selected.sort(key=lambda i: i.get(field_name) or "", reverse=order.strip() == "desc")
        try:
            size = int(r.q("page_size") or 0)
        except ValueError:
            raise Fail(400, "page_size is not a number") from None
        size = min(size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        token = r.q("page_token") or ""
        if token:
            if not re.fullmatch(r"offset-\d+", token):
                raise Fail(400, "bad page_token")
            start = int(token.split("-")[1])
        else:
            start = 0
        page = selected[start:start + size]
        answer: dict[str, Any] = {key: page, "total_size": len(selected)}
        if start + size < len(selected):
            answer["next_page_token"] = f"offset-{start + size}"
        return answer
