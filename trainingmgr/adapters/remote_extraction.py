"""The remote data extractor: the reference's data-extraction service (wire-compat.md, "Data-extraction service
(remote mode)"), started once per job and then polled by the worker.

The wire, exactly as the reference sent it:

* start: ``POST <url>/feature-groups`` with the JSON body of `start_body` (source, transform, sink, influxdb_info,
  trainingjob_id). 200 means the service queued the task.
* status: ``GET <url>/task-status/<featurepath>`` answers ``{"task_status": "Accepted" | "In Progress" |
  "Completed", ...}``; a failed task answers ``task_status: "Error"`` (with HTTP 500; the reference's code answers
  200 there, so any status code is accepted with "Error"), and an unknown task is a bare HTTP 500 too (the
  reference service fails with a KeyError and answers Flask's HTML error page).

Never blocking: every call has a (connect, read) timeout of `timeout` seconds, the answer is read in pieces against
a deadline (a peer trickling bytes cannot hold a worker), and only connection *establishment* is retried by the
session (`connect_retries` times, at once): a request that may have reached the service is never sent again by us,
so a POST cannot start the same extraction twice. One request therefore takes at most about
``(1 + connect_retries) * timeout`` to connect plus ``2 * timeout`` to answer; `status` makes one request, `start`
two (a status check, then the POST). The service's "one task at a time",
its slowness or its outages are the worker's business: it polls with backoff within the step's deadline.

Errors: connection errors, timeouts and 5xx answers raise AdapterError(retryable=True); 3xx/4xx answers raise
AdapterError(retryable=False) carrying the service's message. The token travels in the start body (the service
needs it to read InfluxDB) and is never logged.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Mapping
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from .base import AdapterError, DataExtractor, ExtractionRequest, ExtractionStatus
from .extraction import check_featurepath
from .outbound import OutboundDenied, OutboundPolicy, parse_port

log = logging.getLogger(__name__)

MAX_ANSWER_BYTES = 1 << 20  # the service's answers are small JSON documents
RUNNING_STATES = {"Accepted": "IN_PROGRESS", "In Progress": "IN_PROGRESS"}
COMPLETED = "Completed"
ERROR = "Error"
INFLUX_FIELDS = ("host", "port", "bucket", "token", "db_org", "source_name")


def flux_string(value: str) -> str:
    """`value` as a Flux string literal: quotes, backslashes, `${` (interpolation) and line breaks escaped.

    The remote service takes a complete Flux query, so the bucket and measurement have to be written into its text;
    escaped like this they stay one string value whatever they hold.
    """
    if "\x00" in value:
        raise AdapterError("the bucket or measurement contains a NUL character", retryable=False)
    escaped = (
        value.replace("\\", "\\\\")
        .replace('"', '\\"')
        .replace("${", "\\${")
        .replace("\n", "\\n")
        .replace("\r", "\\r")
        .replace("\t", "\\t")
    )
    return f'"{escaped}"'


def influx_query(bucket: str, measurement: str) -> str:
    """The Flux query the reference sent for an InfluxSource (same text, spacing included), values escaped."""
    return (
        f"from(bucket:{flux_string(bucket)}) |> range(start: 0, stop: now()) "
        f"|> filter(fn: (r) => r._measurement == {flux_string(measurement)}) "
        '|> pivot(rowKey:["_time"], columnKey: ["_field"], valueColumn: "_value")'
    )


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def start_body(request: ExtractionRequest) -> dict[str, Any]:
    """The JSON body of POST /feature-groups for `request` (wire-compat.md)."""
    source = request.source
    if request.datalake_source == "InfluxSource":
        query = influx_query(_text(source.get("bucket")), _text(source.get("measurement")))
        source_part: dict[str, Any] = {"InfluxSource": {"query": query}}
    else:
        source_part = {request.datalake_source: {}}
    return {
        "source": source_part,
        "transform": [
            {
                "operation": "SQLTransform",
                "FeatureList": ",".join(request.feature_list),
                "SQLFilter": request.query_filter or "",
            }
        ],
        "sink": {"CassandraSink": {"CollectionName": request.featurepath}},
        "influxdb_info": {name: _text(source.get(name)) for name in INFLUX_FIELDS},
        "trainingjob_id": str(request.trainingjob_id),
    }


@dataclass(frozen=True)
class _Answer:
    status: int
    body: bytes

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except (ValueError, RecursionError):
            return None

    def message(self) -> str:
        """The service's own words: its JSON `result` (or message/error), else the start of the body."""
        data = self.json()
        if isinstance(data, dict):
            for key in ("result", "message", "error", "detail"):
                if data.get(key):
                    return str(data[key])[:500]
        text = self.body.decode("utf-8", "replace").strip()
        return text[:300] or f"HTTP {self.status}"


class RemoteExtractor(DataExtractor):
    """Talks to the data-extraction service at `url` (e.g. http://dataextraction:32000).

    `status` and an unknown task: the service answers a bare HTTP 500 both for a task it does not know (it was
    restarted and lost its in-memory tasks, or never got ours) and when it is broken for a moment. A 500 whose body
    says ``task_status: "Error"`` is the task's failure: FAILED at once, with the service's message. Any other 500
    is treated as a transient failure (retryable AdapterError, so the worker backs off and asks again) up to
    `unknown_task_limit` consecutive times for the same task; the next one returns FAILED "the data-extraction
    service does not know task ...", so a job whose task was lost fails within a few polls instead of waiting for
    the extraction deadline. The count is per process and reset by any other answer.

    `start` first asks /task-status: when the service already holds this task as Accepted or In Progress (an
    earlier start reached it although its answer was lost), it is not posted a second time.
    """

    def __init__(self, url: str, *, timeout: float, outbound: OutboundPolicy, connect_retries: int = 1,
                 unknown_task_limit: int = 3):
        parts = urlsplit(url or "")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"the data-extraction URL must be an http(s) URL, not {url!r}")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.url = url.rstrip("/")
        self.timeout = float(timeout)
        self.unknown_task_limit = max(1, unknown_task_limit)
        self.outbound = outbound
        retry = Retry(
            total=connect_retries, connect=connect_retries, read=False, status=0, other=0, redirect=0,
            backoff_factor=0, raise_on_status=False, raise_on_redirect=False,
        )
        self._session = requests.Session()
        self._session.mount("http://", HTTPAdapter(max_retries=retry))
        self._session.mount("https://", HTTPAdapter(max_retries=retry))
        self._unknown: dict[str, int] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ DataExtractor
    def start(self, request: ExtractionRequest) -> ExtractionStatus:
        check_featurepath(request.featurepath)
        self._check_source(request)
        body = start_body(request)
        current = self._task_status(self._call("GET", self._status_path(request.featurepath)))
        if current in RUNNING_STATES:
            log.info("extraction already queued by the service, not started twice",
                     extra={"trainingjob_id": request.trainingjob_id, "task_status": current})
            return ExtractionStatus("IN_PROGRESS")
        answer = self._call("POST", "/feature-groups", body=body)
        if answer.status == 200:
            self._forget(request.featurepath)
            log.info("extraction started", extra={"trainingjob_id": request.trainingjob_id})
            return ExtractionStatus("IN_PROGRESS")
        raise self._error("starting the extraction", answer)

    def _check_source(self, request: ExtractionRequest) -> None:
        """The data-extraction service connects to the feature group's InfluxDB with its token: the host must be one
        the outbound policy lets a client name, and resolve (here, now) only to addresses it allows."""
        if request.datalake_source != "InfluxSource":
            return
        host, port = _text(request.source.get("host")), _text(request.source.get("port"))
        try:
            self.outbound.resolve(host, parse_port(port))
        except OutboundDenied as e:
            raise AdapterError(f"InfluxDB at {host}:{port} may not be called: {e.rule} (TM_OUTBOUND_ALLOW changes "
                               "this)", retryable=False) from None
        except ValueError as e:
            raise AdapterError(f"InfluxDB at {host}:{port}: {e}", retryable=False) from None
        except OSError:
            pass  # a name that does not resolve here may resolve where the service runs: it reports that itself

    def status(self, request: ExtractionRequest) -> ExtractionStatus:
        check_featurepath(request.featurepath)
        answer = self._call("GET", self._status_path(request.featurepath))
        task_status = self._task_status(answer)
        if task_status == ERROR:
            self._forget(request.featurepath)
            return ExtractionStatus("FAILED", error=f"the data-extraction service reports: {answer.message()}")
        if answer.status == 200:
            self._forget(request.featurepath)
            if task_status in RUNNING_STATES:
                return ExtractionStatus(RUNNING_STATES[task_status])
            if task_status == COMPLETED:
                # The pipeline reads the dataset (the service's Cassandra collection) by this name.
                return ExtractionStatus("COMPLETED", dataset_uri=request.featurepath)
            raise AdapterError(
                f"the data-extraction service answered an unknown task_status {task_status!r}", retryable=False
            )
        if answer.status == 500:
            if self._count_unknown(request.featurepath) >= self.unknown_task_limit:
                self._forget(request.featurepath)
                return ExtractionStatus(
                    "FAILED",
                    error=f"the data-extraction service does not know task {request.featurepath!r} "
                    f"(HTTP 500 {self.unknown_task_limit} times in a row; was it restarted?)",
                )
            raise AdapterError(
                f"the data-extraction service failed to give the task's status: HTTP 500: {answer.message()}",
                retryable=True,
            )
        raise self._error("asking the extraction's status", answer)

    def remove(self, featurepath: str) -> None:
        """Nothing to delete remotely: the wire has no call for it. The service's task entry is in-memory and the
        dataset is the service's collection `<featurepath>` in its own store; only our bookkeeping is dropped."""
        check_featurepath(featurepath)
        self._forget(featurepath)

    def close(self) -> None:
        self._session.close()

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _status_path(featurepath: str) -> str:
        return f"/task-status/{featurepath}"  # featurepath is [A-Za-z0-9_]: nothing to quote

    @staticmethod
    def _task_status(answer: _Answer) -> str | None:
        data = answer.json()
        if isinstance(data, dict) and isinstance(data.get("task_status"), str):
            return data["task_status"]
        return None

    def _count_unknown(self, featurepath: str) -> int:
        with self._lock:
            self._unknown[featurepath] = self._unknown.get(featurepath, 0) + 1
            return self._unknown[featurepath]

    def _forget(self, featurepath: str) -> None:
        with self._lock:
            self._unknown.pop(featurepath, None)

    def _error(self, doing: str, answer: _Answer) -> AdapterError:
        retryable = answer.status >= 500 or answer.status == 429
        return AdapterError(
            f"{doing}: the data-extraction service answered HTTP {answer.status}: {answer.message()}",
            retryable=retryable,
        )

    def _call(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> _Answer:
        """One bounded request; the whole answer is read before `2 * timeout` has passed, or a retryable error."""
        url = self.url + path
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            headers["Content-Type"] = "application/json"
            data = json.dumps(body).encode("utf-8")
        try:
            with self._session.request(
                method, url, data=data, headers=headers, timeout=(self.timeout, self.timeout),
                allow_redirects=False, stream=True,
            ) as response:
                deadline = time.monotonic() + 2 * self.timeout
                chunks: list[bytes] = []
                size = 0
                for chunk in response.iter_content(8192):
                    chunks.append(chunk)
                    size += len(chunk)
                    if size > MAX_ANSWER_BYTES:
                        raise AdapterError(
                            f"the data-extraction service's answer to {method} {path} is too large", retryable=True
                        )
                    if time.monotonic() > deadline:
                        raise AdapterError(
                            f"the data-extraction service's answer to {method} {path} was too slow", retryable=True
                        )
                return _Answer(response.status_code, b"".join(chunks))
        except AdapterError:
            raise
        except requests.Timeout as e:
            raise AdapterError(
                f"the data-extraction service did not answer {method} {path} within {self.timeout:g} s",
                retryable=True,
            ) from e
        except (requests.RequestException, OSError) as e:
            raise AdapterError(
                f"the data-extraction service at {self._where()} is not reachable ({e.__class__.__name__})",
                retryable=True, unreachable=isinstance(e, (requests.ConnectionError, ConnectionError)),
            ) from e

    def _where(self) -> str:
        parts = urlsplit(self.url)
        return f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)
