"""The Kubeflow Pipelines engine: pipelines are registered with, and run on, a KFP API server (v2beta1).

`kfp.Client` sets up the connection (host, bearer token, its generated `kfp_server_api` client); every call goes
through the generated API methods with a request timeout (kfp.Client's own wrappers take none and print links to
stdout). Nothing here touches the network before the first call: the client, whose constructor asks the server's
healthz once, is built on first use.

- A pipeline version becomes a KFP pipeline version: the first one uploads the pipeline (which brings its first
  version), the next ones upload versions named "<name>-v<number>". The engine's reference for a version is
  "<pipeline_id>/<pipeline_version_id>".
- A run is a KFP run of the stored version, in the experiment "Default", whose display name is OUR run id: a run is
  found again by that name (what this process learnt is kept in memory), so a restarted service still knows it.
- The run stores the model itself (bucket <modelname>, key <modelversion>/<artifactversion>/Model.zip): a
  SUCCEEDED status has no model_path.

Every call has a timeout and is tried at most `tries` times (backoff doubling) on a connection error, a timeout or
a 5xx answer; those end in AdapterError(retryable=True). A 4xx answer is AdapterError(retryable=False) at once.
Starting a run and uploading a version are made safe to retry by looking for what an earlier try created first.
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import urllib3
import yaml
from kfp_server_api.exceptions import ApiException

from .base import AdapterError, PipelineEngine, RunLog, RunStatus
from ..models.lifecycle import RunState, run_state
from .pipeline_files import load_spec, run_parameters
from .pipeline_files import yaml_documents

log = logging.getLogger(__name__)

T = TypeVar("T")

EXPERIMENT = "Default"
PAGE_SIZE = 200  # the server's cap on page_size
MAX_PAGES = 1000  # a server that keeps answering next_page_token cannot keep us forever
EQUALS = 1  # filter.proto Predicate.Operation.EQUALS, as kfp.Client sends it
CAPACITY = 1_000_000  # the cluster schedules: the service never holds a run back
_TRANSPORT_ERRORS = (urllib3.exceptions.HTTPError, OSError)  # refused, reset, timed out, DNS


class KfpError(AdapterError):
    """The KFP server answered with an error status (0: no HTTP answer, e.g. a TLS failure)."""

    def __init__(self, message: str, *, status: int, retryable: bool):
        super().__init__(message, retryable=retryable)
        self.status = status


# ------------------------------------------------------------------------------------------- helpers
def _filter(key: str, value: str) -> str:
    """A list filter (filter.proto as JSON) selecting `key` == `value`."""
    return json.dumps({"predicates": [{"operation": EQUALS, "key": key, "stringValue": value}]})


def _server_message(e: ApiException) -> str:
    """The message of a grpc-gateway error body ({"error", "code", "message"}), else the HTTP reason."""
    body = e.body
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    message = None
    if isinstance(body, str) and body.strip():
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):
            data = None
        if isinstance(data, dict):
            message = data.get("message") or data.get("error")
        if message is None and len(body) <= 200 and "<" not in body:
            message = body.strip()
    return str(message or e.reason or "").strip()[:300]


def _adapter_error(e: BaseException, what: str) -> AdapterError:
    if isinstance(e, ApiException):
        status = int(e.status or 0)
        message = _server_message(e)
        retryable = status == 0 or status >= 500 or status in (408, 429)
        text = f"{what}: Kubeflow Pipelines answered {status}" + (f" ({message})" if message else "")
        return KfpError(text, status=status, retryable=retryable)
    return AdapterError(f"{what}: Kubeflow Pipelines is not reachable ({e.__class__.__name__})", retryable=True)


def _parse_ref(engine_ref: str) -> tuple[str, str]:
    parts = engine_ref.split("/")
    if len(parts) != 2 or not all(p.strip() for p in parts):
        raise AdapterError(f"{engine_ref!r} is not a Kubeflow Pipelines version (<pipeline_id>/<version_id>)")
    return parts[0], parts[1]


def _package(file_path: Path) -> dict[str, Any]:
    """The compiled pipeline as a run's inline pipeline_spec (what kfp.Client sends for a package)."""
    try:
        with open(file_path, encoding="utf-8") as f:
            documents = [d for d in yaml_documents(f) if d is not None]
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise AdapterError(f"pipeline file {file_path} cannot be read: {e.__class__.__name__}") from None
    platform: dict[str, Any] = {}
    for document in documents[1:]:
        if isinstance(document, dict):
            platform.update(document)
    return {"pipeline_spec": documents[0], "platform_spec": platform} if platform else documents[0]


def _same_spec(remote: Any, local: dict[str, Any]) -> bool:
    """True when a version's pipeline_spec (as the server returns it) is the compiled pipeline `local`."""
    if isinstance(remote, dict) and "root" not in remote and isinstance(remote.get("pipeline_spec"), dict):
        remote = remote["pipeline_spec"]
    # The server keeps the spec as a protobuf Struct (numbers as floats): compare values, not text.
    return isinstance(remote, dict) and json.loads(json.dumps(remote)) == json.loads(json.dumps(local))


def _aware(moment: Any) -> datetime | None:
    """KFP's timestamps are UTC; the client may parse them without a zone. An unset one reads 1970-01-01."""
    if not isinstance(moment, datetime) or moment.year <= 1970:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _state_lines(run: Any) -> Iterator[tuple[str, str]]:
    """(sort key, line) for each state the run and its tasks went through, as KFP recorded them."""
    def lines(what: str, history: Any, error: Any) -> Iterator[tuple[str, str]]:
        for change in history or ():
            moment = _aware(getattr(change, "update_time", None))
            when = moment.isoformat() if moment else ""
            line = f"{when} {what} {str(getattr(change, 'state', '') or '').upper()}"
            message = getattr(getattr(change, "error", None), "message", None)
            yield when, f"{line}: {message}\n" if message else f"{line}\n"
        message = getattr(error, "message", None)
        if message and not any(getattr(getattr(c, "error", None), "message", None) for c in history or ()):
            yield "~", f"{what} error: {message}\n"  # an error KFP kept with no state change: after the changes

    yield from lines("run", getattr(run, "state_history", None), getattr(run, "error", None))
    for task in getattr(getattr(run, "run_details", None), "task_details", None) or ():
        name = getattr(task, "display_name", None) or getattr(task, "task_id", None) or "task"
        yield from lines(f"task {name}", getattr(task, "state_history", None), getattr(task, "error", None))


def _open_client(host: str, token: str, request_timeout: tuple[float, float]) -> Any:
    """A kfp.Client whose constructor asks healthz once, with the timeout (the stock one tries 5 times, 5 s apart,
    without one), and whose connections are never retried by urllib3 (the engine's retries are the only ones)."""
    import kfp

    class BoundedClient(kfp.Client):
        def get_kfp_healthz(self, sleep_duration: int = 5) -> Any:  # noqa: ARG002 (kfp's signature)
            _no_transport_retries(self._healthz_api.api_client)
            return self._healthz_api.healthz_service_get_healthz(_request_timeout=request_timeout)

        def set_user_namespace(self, namespace: str) -> None:
            # The stock one also writes ~/.config/kfp/context.json: a service keeps it in memory.
            self._context_setting["namespace"] = namespace

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="This client only works", category=FutureWarning)
        client = BoundedClient(host=host, existing_token=token or None)
    _no_transport_retries(client._healthz_api.api_client)
    return client


def _no_transport_retries(api_client: Any) -> None:
    # retries=False: a refused connection or a timeout is raised at once, not retried (up to 3 times) by urllib3.
    api_client.rest_client.pool_manager.connection_pool_kw["retries"] = False


# ------------------------------------------------------------------------------------------- the engine
class KfpPipelineEngine(PipelineEngine):
    watch_interval = 3.0  # each look is an HTTP call to the KFP API
    def __init__(self, host: str, *, token: str = "", timeout: float = 10.0, tries: int = 3, backoff: float = 0.5,
                 experiment: str = EXPERIMENT):
        if not host or not host.strip():
            raise ValueError("the Kubeflow Pipelines host is required")
        self.host = host.strip()
        self.token = token
        self.timeout = float(timeout)
        self.tries = max(1, int(tries))
        self.backoff = max(0.0, float(backoff))
        self.experiment = experiment
        self._lock = threading.Lock()
        self._kfp: Any = None  # the kfp.Client, built on first use
        self._experiment_id: str | None = None
        self._runs: dict[str, str] = {}  # our run id -> KFP run id

    @property
    def _request_timeout(self) -> tuple[float, float]:
        return (self.timeout, self.timeout)  # (connect, read); a single float would be ignored by kfp_server_api

    # ------------------------------------------------------------------ PipelineEngine
    def register_version(self, pipeline_name: str, version: int, file_path: Path, description: str) -> str | None:
        """Upload the version (the pipeline too, for its first one); returns "<pipeline_id>/<pipeline_version_id>".

        A version of the same name and the same content that an earlier try left is used again; one of the same
        name but another content (another installation's) makes the upload go under "<name>-v<n>-<sha256[:8]>".
        """
        file_path = Path(file_path)
        spec = load_spec(file_path)
        digest = hashlib.sha256(file_path.read_bytes()).hexdigest()[:8]
        primary = f"{pipeline_name}-v{version}"
        fallback = f"{primary}-{digest}"
        what = f"registering pipeline {pipeline_name} version {version}"

        def attempt() -> str:
            pipeline_id = self._find_pipeline(pipeline_name)
            if pipeline_id is None:
                try:
                    created = self._api(what, lambda c: c._upload_api.upload_pipeline(
                        str(file_path), name=pipeline_name, description=description or None,
                        _request_timeout=self._request_timeout))
                except KfpError as e:
                    if e.status == 409:  # uploaded meanwhile by someone else: look again
                        raise AdapterError(str(e), retryable=True) from None
                    raise
                # The upload made the pipeline's first version, holding this file.
                first = self._newest_version(created.pipeline_id)
                if first is not None:
                    return f"{created.pipeline_id}/{first}"
                pipeline_id = created.pipeline_id
            # An earlier try (or, for version 1, the pipeline's upload) may have made it already.
            taken = False
            for name in [primary] + ([pipeline_name] if version == 1 else []):
                for found in self._versions_named(pipeline_id, name):
                    if _same_spec(found.pipeline_spec, spec):
                        return f"{pipeline_id}/{found.pipeline_version_id}"
                    taken = taken or name == primary
            name = primary
            if taken:  # another content under our name: the content's own name
                name = fallback
                found = self._versions_named(pipeline_id, fallback)
                if found:
                    return f"{pipeline_id}/{found[0].pipeline_version_id}"
            uploaded = self._api(what, lambda c: c._upload_api.upload_pipeline_version(
                str(file_path), name=name, pipelineid=pipeline_id, description=description or None,
                _request_timeout=self._request_timeout))
            return f"{pipeline_id}/{uploaded.pipeline_version_id}"

        ref = self._retrying(attempt)
        log.info("pipeline version registered with Kubeflow Pipelines",
                 extra={"pipeline": pipeline_name, "version": version, "engine_ref": ref})
        return ref

    def start_run(self, run_id: str, file_path: Path, engine_ref: str | None, parameters: dict[str, str]) -> str:
        """Start a run of the stored version named `run_id`; returns the KFP run id. Starting a run id that
        started already does nothing (a retried step may do that).

        Parameters the pipeline does not declare are left out; strings are converted to the declared types.
        Without an engine_ref (a version uploaded while the embedded engine was in use) the compiled file is sent
        with the run.
        """
        from kfp_server_api import V2beta1PipelineVersionReference, V2beta1Run, V2beta1RuntimeConfig

        file_path = Path(file_path)
        params = run_parameters(load_spec(file_path), parameters, run_id)
        reference = package = None
        if engine_ref:
            pipeline_id, version_id = _parse_ref(engine_ref)
            reference = V2beta1PipelineVersionReference(pipeline_id=pipeline_id, pipeline_version_id=version_id)
        else:
            package = _package(file_path)
        what = f"starting run {run_id}"

        def attempt() -> str:
            existing = self._find_run(run_id)
            if existing is not None:
                return existing
            body = V2beta1Run(
                experiment_id=self._experiment(),
                display_name=run_id,
                pipeline_version_reference=reference,
                pipeline_spec=package,
                runtime_config=V2beta1RuntimeConfig(parameters=params),
            )
            try:
                run = self._api(what, lambda c: c._run_api.run_service_create_run(
                    run=body, _request_timeout=self._request_timeout))
            except KfpError as e:
                if not e.retryable:
                    with self._lock:  # the experiment may have been deleted: look for it again next time
                        self._experiment_id = None
                raise
            with self._lock:
                self._runs[run_id] = run.run_id
            return run.run_id

        kfp_run_id = self._retrying(attempt)
        log.info("pipeline run started on Kubeflow Pipelines", extra={"run_id": run_id, "kfp_run_id": kfp_run_id})
        return kfp_run_id

    def run_status(self, run_id: str) -> RunStatus:
        """The run's state. AdapterError(retryable=False) when no run has that name; retryable on an outage."""
        run = self._get_run(run_id)
        state = str(run.state or "").upper()
        ended_at = _aware(getattr(run, "finished_at", None))
        ended = run_state(state)  # KFP's word in the service's vocabulary (the lifecycle module owns it)
        if ended == RunState.SUCCEEDED:
            return RunStatus(RunState.SUCCEEDED.value, ended_at=ended_at)
        if ended == RunState.FAILED:
            message = getattr(run.error, "message", None) if run.error is not None else None
            return RunStatus("FAILED", error=f"pipeline run ended {state}" + (f": {message}" if message else ""),
                             ended_at=ended_at)
        return RunStatus("RUNNING")

    def terminate(self, run_id: str) -> None:
        """Ask KFP to stop the run. A run that ended already, or that does not exist, is left as it is."""
        try:
            status = self.run_status(run_id)
        except AdapterError as e:
            if e.retryable:
                raise
            return  # no such run
        if status.state != "RUNNING":
            return
        kfp_run_id = self._known_run(run_id)
        try:
            self._retrying(lambda: self._api(f"terminating run {run_id}", lambda c: (
                c._run_api.run_service_terminate_run(run_id=kfp_run_id, _request_timeout=self._request_timeout))))
        except KfpError as e:
            if e.retryable:
                raise
            # It ended (or went away) between our look and the request.
            log.info("run not terminated", extra={"run_id": run_id, "reason": str(e)})
            return
        log.info("pipeline run terminated", extra={"run_id": run_id, "kfp_run_id": kfp_run_id})

    def run_log(self, run_id: str, offset: int, limit: int) -> RunLog:
        """The run's and its tasks' state changes, one line each, oldest first, with each task's error.

        KFP's API keeps no container output: its UI reads the pods' logs from Kubernetes, which this service does not
        reach. Lines are ordered by time, so the text grows at its end as the run goes on."""
        run = self._get_run(run_id)
        data = "".join(line for _, line in sorted(_state_lines(run))).encode()
        return RunLog(data[max(0, offset):max(0, offset) + max(0, limit)], len(data))

    def cleanup(self, run_id: str) -> None:
        """Nothing is left on this machine; KFP keeps the run's record (and the cluster its garbage collection)."""
        with self._lock:
            self._runs.pop(run_id, None)

    def capacity_left(self) -> int:
        return CAPACITY

    def ready(self) -> bool:
        """The server answers healthz within the timeout (one try)."""
        try:
            with self._lock:
                built = self._kfp is not None
            if not built:
                self._client()  # its constructor asked healthz
                return True
            self._api("asking healthz", lambda c: c._healthz_api.healthz_service_get_healthz(
                _request_timeout=self._request_timeout))
        except AdapterError:
            return False
        return True

    # ------------------------------------------------------------------ calls
    def _client(self) -> Any:
        with self._lock:
            if self._kfp is None:
                try:
                    self._kfp = _open_client(self.host, self.token, self._request_timeout)
                except ApiException as e:
                    raise _adapter_error(e, "connecting to Kubeflow Pipelines") from None
                except _TRANSPORT_ERRORS as e:
                    raise _adapter_error(e, "connecting to Kubeflow Pipelines") from None
            return self._kfp

    def _api(self, what: str, call: Callable[[Any], T]) -> T:
        """One request (no retry); its failure as an AdapterError."""
        client = self._client()
        try:
            return call(client)
        except ApiException as e:
            raise _adapter_error(e, what) from None
        except _TRANSPORT_ERRORS as e:
            raise _adapter_error(e, what) from None

    def _retrying(self, attempt: Callable[[], T]) -> T:
        """`attempt` up to `tries` times while it fails with a retryable AdapterError, waiting more each time."""
        delay = self.backoff
        for number in range(1, self.tries + 1):
            try:
                return attempt()
            except AdapterError as e:
                if not e.retryable or number == self.tries:
                    raise
                log.info("Kubeflow Pipelines call retried", extra={"attempt": number, "reason": str(e)})
            time.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")

    def _pages(self, what: str, method: Callable[[Any], Callable[..., Any]], items: str, **query: Any) -> Iterator[Any]:
        """Every item of a paged list: `method(client)` is the generated list call, asked for pages of 200
        (the server's cap) until there is no next_page_token."""
        token = ""
        seen = set()
        for _ in range(MAX_PAGES):
            page = self._api(what, lambda c: method(c)(
                page_token=token, page_size=PAGE_SIZE, _request_timeout=self._request_timeout, **query))
            yield from getattr(page, items) or []
            token = page.next_page_token or ""
            if not token or token in seen:
                return
            seen.add(token)

    # ------------------------------------------------------------------ lookups
    def _find_pipeline(self, name: str) -> str | None:
        """The id of the KFP pipeline whose display name is `name` (the filter narrows; the name decides)."""
        pages = self._pages(f"looking for pipeline {name}", lambda c: c._pipelines_api.pipeline_service_list_pipelines,
                            "pipelines", filter=_filter("display_name", name))
        for pipeline in pages:
            if (pipeline.display_name or pipeline.name) == name:
                return pipeline.pipeline_id
        return None

    def _versions_named(self, pipeline_id: str, name: str) -> list[Any]:
        pages = self._pages(f"looking for pipeline version {name}",
                            lambda c: c._pipelines_api.pipeline_service_list_pipeline_versions, "pipeline_versions",
                            pipeline_id=pipeline_id, filter=_filter("display_name", name))
        return [v for v in pages if (v.display_name or v.name) == name]

    def _newest_version(self, pipeline_id: str) -> str | None:
        page = self._api("reading the new pipeline's version", lambda c: (
            c._pipelines_api.pipeline_service_list_pipeline_versions(
                pipeline_id=pipeline_id, page_size=1, sort_by="created_at desc",
                _request_timeout=self._request_timeout)))
        versions = page.pipeline_versions or []
        return versions[0].pipeline_version_id if versions else None

    def _experiment(self) -> str:
        """The id of the experiment runs go to, created when the server has none of that name (kept once known)."""
        from kfp_server_api import V2beta1Experiment

        with self._lock:
            if self._experiment_id is not None:
                return self._experiment_id
        what = f"looking for experiment {self.experiment}"
        pages = self._pages(what, lambda c: c._experiment_api.experiment_service_list_experiments, "experiments",
                            filter=_filter("display_name", self.experiment))
        found = [e for e in pages if e.display_name == self.experiment]
        if found:
            experiment_id = found[0].experiment_id
        else:
            try:
                experiment_id = self._api(f"creating experiment {self.experiment}", lambda c: (
                    c._experiment_api.experiment_service_create_experiment(
                        experiment=V2beta1Experiment(display_name=self.experiment),
                        _request_timeout=self._request_timeout))).experiment_id
            except KfpError as e:
                if e.status == 409:  # created meanwhile by another process: the next try finds it
                    raise AdapterError(str(e), retryable=True) from None
                raise
            log.info("experiment created on Kubeflow Pipelines", extra={"experiment": self.experiment})
        with self._lock:
            self._experiment_id = experiment_id
        return experiment_id

    def _get_run(self, run_id: str) -> Any:
        kfp_run_id = self._known_run(run_id)
        try:
            return self._retrying(lambda: self._api(f"reading run {run_id}", lambda c: c._run_api.run_service_get_run(
                run_id=kfp_run_id, _request_timeout=self._request_timeout)))
        except KfpError as e:
            if e.status == 404:
                with self._lock:
                    self._runs.pop(run_id, None)
                raise AdapterError(f"unknown run {run_id!r}") from None
            raise

    def _find_run(self, run_id: str) -> str | None:
        """The KFP id of the run named `run_id` (the newest if there are several), None when there is none."""
        with self._lock:
            known = self._runs.get(run_id)
        if known is not None:
            return known
        pages = self._pages(f"looking for run {run_id}", lambda c: c._run_api.run_service_list_runs, "runs",
                            filter=_filter("display_name", run_id))
        runs = [r for r in pages if r.display_name == run_id]
        if not runs:
            return None
        newest = max(runs, key=lambda r: r.created_at.timestamp() if r.created_at is not None else 0.0)
        with self._lock:
            self._runs[run_id] = newest.run_id
        return newest.run_id

    def _known_run(self, run_id: str) -> str:
        kfp_run_id = self._retrying(lambda: self._find_run(run_id))
        if kfp_run_id is None:
            raise AdapterError(f"unknown run {run_id!r}")
        return kfp_run_id
