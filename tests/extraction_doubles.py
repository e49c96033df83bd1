"""Local HTTP doubles of the two data-extraction peers: the reference's data-extraction service and InfluxDB 2.

Both listen on 127.0.0.1 (a free port), serve from a thread and record every request exactly as it arrived.
"""
from __future__ import annotations

import json
import math
import socket
from dataclasses import dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pandas as pd


from tests.peers import HttpDouble as _Double  # the shared server plumbing
from tests.peers import Recorded


def refused_url() -> str:
    """An http URL on 127.0.0.1 where nothing listens (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# ==================================================================================== data-extraction service
FLASK_500_PAGE = (
    b'<!doctype html>\n<html lang=en>\n<title>500 Internal Server Error</title>\n<h1>Internal Server Error</h1>\n'
    b"<p>The server encountered an internal error and was unable to complete your request. Either the server is "
    b"overloaded or there is an error in the application.</p>\n"
)


@dataclass
class _Task:
    body: dict[str, Any]
    ticks: int = 0  # how far the service got with it (see DataExtractionService.state_of)
    status: str = "Accepted"
    error: str = ""


class DataExtractionService(_Double):
    """The reference's data-extraction service (wire-compat.md), as seen from the training manager.

    POST /feature-groups queues a task named by the sink's CollectionName and answers 200 {"featurepath", "result",
    "trainingjob_id"}. One task runs at a time, as in the reference (one worker thread over a FIFO queue): a task
    started while another one runs is accepted and waits, "Accepted", until the ones before it are done. By default
    a second start is queued like that; with `reject_when_busy` the service answers 500 {"result": "busy ..."}
    instead. Starting a name again re-queues it (the reference replaces its entry).

    Time passes with polls: every GET /task-status/* takes the answer, then moves the running task (the head of
    the queue) one step. A task answers "Accepted" for `accepted_polls` steps, "In Progress" for
    `in_progress_polls` more, then "Completed" — or, if its name is in `fail_tasks` (name -> message), task_status
    "Error" with HTTP 500 and the message as `result`. An unknown task answers a bare 500 (Flask's HTML page: the
    reference's KeyError). `start_answer` = (status, body) overrides the answer to POST; `drop_methods` (e.g.
    {"POST"}) makes those requests read and recorded, then the connection closed without an answer; `delay` makes
    answers late (see `delay_methods`); `stop()` takes the service down.
    """

    def __init__(self, *, accepted_polls: int = 1, in_progress_polls: int = 1):
        super().__init__()
        self.accepted_polls = accepted_polls
        self.in_progress_polls = in_progress_polls
        self.tasks: dict[str, _Task] = {}
        self.queue: list[str] = []
        self.fail_tasks: dict[str, str] = {}
        self.reject_when_busy = False
        self.start_answer: tuple[int, Any] | None = None
        self.drop_methods: set[str] = set()

    def start(self) -> "DataExtractionService":
        super().start()
        return self

    # ------------------------------------------------------------------ the service's behaviour
    def step(self) -> None:
        """Time passes: the running task moves one step (and the next one starts when it is done)."""
        with self.lock:
            if not self.queue:
                return
            task = self.tasks[self.queue[0]]
            task.ticks += 1
            if task.ticks >= self.accepted_polls:
                task.status = "In Progress"
            if task.ticks >= self.accepted_polls + self.in_progress_polls:
                name = self.queue.pop(0)
                if name in self.fail_tasks:
                    task.status, task.error = "Error", self.fail_tasks[name]
                else:
                    task.status = "Completed"

    def state_of(self, name: str) -> str | None:
        with self.lock:
            task = self.tasks.get(name)
            return task.status if task else None

    def handle(self, handler: BaseHTTPRequestHandler, recorded: Recorded) -> None:
        if recorded.method in self.drop_methods:
            handler.close_connection = True
            handler.connection.shutdown(socket.SHUT_RDWR)
            return
        path = urlsplit(recorded.path).path
        if recorded.method == "POST" and path == "/feature-groups":
            return self._start_task(handler, recorded)
        if recorded.method == "GET" and path.startswith("/task-status/"):
            return self._task_status(handler, path[len("/task-status/"):])
        self.answer(handler, 404, b"<h1>Not Found</h1>", "text/html")

    def _start_task(self, handler: BaseHTTPRequestHandler, recorded: Recorded) -> None:
        if self.start_answer is not None:
            return self.answer(handler, *self.start_answer)
        try:
            body = recorded.json()
            name = str(body["sink"]["CassandraSink"]["CollectionName"])
        except (ValueError, KeyError, TypeError) as e:
            return self.answer(handler, 500, {"result": f"{e.__class__.__name__}: {e}"})
        with self.lock:
            if self.reject_when_busy and self.queue:
                return self.answer(handler, 500, {"result": f"busy: task {self.queue[0]} is running"})
            self.tasks[name] = _Task(body)
            if name in self.queue:
                self.queue.remove(name)
            self.queue.append(name)
        self.answer(handler, 200, {"featurepath": name, "result": f"/task-status/{name}",
                                   "trainingjob_id": str(body.get("trainingjob_id", ""))})

    def _task_status(self, handler: BaseHTTPRequestHandler, name: str) -> None:
        with self.lock:
            task = self.tasks.get(name)
            answer = None if task is None else (task.status, task.error)
        self.step()  # before answering: the next poll, however quick, sees the step
        if answer is None:
            self.answer(handler, 500, FLASK_500_PAGE, "text/html; charset=utf-8")
        elif answer[0] == "Error":
            self.answer(handler, 500, {"task_status": "Error", "result": answer[1]})
        else:
            self.answer(handler, 200, {"task_status": answer[0], "result": f"Data Pipeline Execution {answer[0]}"})


# ==================================================================================== InfluxDB 2
def _flux_type(series: pd.Series) -> str:
    dtype = series.dtype
    if pd.api.types.is_bool_dtype(dtype):
        return "boolean"
    if pd.api.types.is_integer_dtype(dtype):
        return "long"
    if pd.api.types.is_float_dtype(dtype):
        return "double"
    if pd.api.types.is_datetime64_any_dtype(dtype):
        return "dateTime:RFC3339"
    return "string"


def _csv_cell(value: Any, flux_type: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NaT:
        return ""
    if flux_type == "boolean":
        return "true" if value else "false"
    if flux_type == "dateTime:RFC3339":
        stamp = pd.Timestamp(value)
        stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")
        return stamp.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    if flux_type == "double":
        return repr(float(value))
    text = str(value)
    if any(c in text for c in ',"\n\r'):
        return '"' + text.replace('"', '""') + '"'
    return text


def annotated_csv(tables: list[pd.DataFrame]) -> str:
    """InfluxDB's annotated CSV for `tables` (one Flux table each; a new header block when the schema changes)."""
    out: list[str] = []
    for index, frame in enumerate(tables):
        types = [_flux_type(frame[c]) for c in frame.columns]
        if out:
            out.append("")
        out.append(",".join(["#datatype", "string", "long", *types]))
        out.append(",".join(["#group", "false", "false", *["false"] * len(types)]))
        out.append(",".join(["#default", "_result", "", *[""] * len(types)]))
        out.append(",".join(["", "result", "table", *map(str, frame.columns)]))
        for row in frame.itertuples(index=False, name=None):
            out.append(",".join(["", "", str(index), *(_csv_cell(v, t) for v, t in zip(row, types))]))
    return "\r\n".join(out) + "\r\n\r\n"


def extern_params(body: dict[str, Any]) -> dict[str, Any]:
    """The bind parameters of a /api/v2/query body: influxdb-client sends them as `option name = literal`."""
    params: dict[str, Any] = {}
    for statement in (body.get("extern") or {}).get("body") or []:
        assignment = statement.get("assignment") or {}
        name = (assignment.get("id") or {}).get("name")
        if name:
            params[name] = _literal(assignment.get("init") or {})
    return params


def _literal(node: dict[str, Any]) -> Any:
    kind = node.get("type")
    if kind == "ArrayExpression":
        return [_literal(e) for e in node.get("elements") or []]
    if kind == "IntegerLiteral":
        return int(node["value"])
    return node.get("value")


class InfluxDouble(_Double):
    """POST /api/v2/query of InfluxDB 2, answering `tables` (DataFrames) as annotated CSV.

    It does not run Flux. With `keep_param` set, it keeps only the columns listed in that bind parameter (what the
    query's keep() does). `status` other than 200 answers {"code", "message"} like InfluxDB (401 "unauthorized
    access", 404 bucket not found, 500 ...). `flux_error` answers 200 with a Flux error table instead of data.
    """

    def __init__(self, tables: list[pd.DataFrame] | None = None, *, keep_param: str | None = None):
        super().__init__()
        self.tables = tables or []
        self.keep_param = keep_param
        self.status = 200
        self.message = ""
        self.flux_error = ""

    def start(self) -> "InfluxDouble":
        super().start()
        return self

    def queries(self) -> list[dict[str, Any]]:
        """The JSON bodies of the queries received."""
        return [r.json() for r in self.recorded("POST")]

    def handle(self, handler: BaseHTTPRequestHandler, recorded: Recorded) -> None:
        parts = urlsplit(recorded.path)
        if recorded.method != "POST" or parts.path != "/api/v2/query":
            return self.answer(handler, 404, {"code": "not found", "message": "path not found"})
        if self.status != 200:
            codes = {401: "unauthorized", 403: "forbidden", 404: "not found", 400: "invalid"}
            message = self.message or {401: "unauthorized access"}.get(self.status, "internal error")
            return self.answer(handler, self.status, {"code": codes.get(self.status, "internal error"),
                                                      "message": message})
        if self.flux_error:
            text = ("#datatype,string,string\r\n#group,true,true\r\n#default,,\r\n,error,reference\r\n"
                    f',"{self.flux_error}",897\r\n\r\n')
            return self.answer(handler, 200, text.encode(), "text/csv; charset=utf-8")
        tables = self.tables
        if self.keep_param:
            keep = extern_params(recorded.json()).get(self.keep_param) or []
            tables = [t[[c for c in t.columns if c in keep]] for t in tables]
        self.answer(handler, 200, annotated_csv(tables).encode("utf-8"), "text/csv; charset=utf-8")

    @staticmethod
    def org_of(recorded: Recorded) -> str | None:
        values = parse_qs(urlsplit(recorded.path).query).get("org")
        return values[0] if values else None


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc)
