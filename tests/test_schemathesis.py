"""schemathesis over the served contract (`GET /swagger.yaml` of an app on the test's database), in process (WSGI).

Every phase (the contract's examples, coverage, fuzzing, stateful sequences), both generation modes (requests the
contract allows and requests it forbids) and every check: no 5xx, every status code, content type, header and body
as documented, allowed requests accepted, forbidden ones refused. Bounded and reproducible: a fixed seed,
derandomized, a few examples per operation, one worker; a failure prints each mismatch with a curl command.

Swagger 2.0 cannot state a few rules the contract writes in prose, and some requests need state to be accepted.
`_allowed` makes the requests schemathesis generates as *allowed* follow those rules, and only those requests
(forbidden ones are sent as generated): the cross-field rules of a feature group (an InfluxSource needs its
connection fields), the one-value rule of a field's two spellings, argument names, a query filter's grammar, a
pipeline file's content, cursors the service issued, and callbacks and jobs that name things that exist. Peers
are kept out of it: no DME information job is asked for and no notification URL is given (their own tests cover
them), so every request is answered from this process.
"""
from __future__ import annotations

import re
import time
from collections import Counter
from typing import Any

import pytest
import schemathesis
from schemathesis.engine import events, from_schema
from schemathesis.generation import GenerationMode
from schemathesis.hooks import GLOBAL_HOOK_DISPATCHER
from schemathesis.transport.serialization import Binary
from schemathesis.transport.wsgi import WSGITransport

from trainingmgr import PROJECT_ROOT
from trainingmgr.adapters.api_tokens import add_token
from trainingmgr.adapters.base import RoleMap
from trainingmgr.services.pagination import encode_cursor

FG = "/ai-ml-model-training/v1/featureGroup"
JOBS = "/ai-ml-model-training/v1/training-jobs"
STREAM = "/ai-ml-model-training/v1/events"
PIPELINE_FILE = PROJECT_ROOT / "examples" / "pipelines" / "qoe_training.yaml"
FEATURES = "prbUsageDl,prbUsageUl,activeUes,sinrMean,throughputDl"
# State the allowed requests refer to.
KNOWN_FG, KNOWN_TRAINING, KNOWN_RETRAINING = "st_kpis", "st_training", "st_retraining"

SEED = 20260902
MAX_EXAMPLES = 10  # per operation and phase: about 10 s a backend
DEADLINE_SECONDS = 240  # the whole run (schemathesis' own max-time would repeat fuzzing until it is spent)


@pytest.fixture
def contract_app(build_app, tmp_path):
    # On SQLite and on PostgreSQL (whose text columns refuse what SQLite stores, such as NUL); build_app empties
    # every table when the test ends, and the files (pipelines, models) live in the test's own folder.
    # With authentication on (an admin's token): schemathesis also checks that operations the contract protects
    # refuse requests without the credential or with a made-up one, and that open ones do not ask for it.
    token = add_token(tmp_path / "api-tokens", "contract", "admin", RoleMap())
    # No step runner here (no job is meant to run while the contract is fuzzed): as with separate workers, /readyz
    # then says "none alive" and stays 200 (with TM_EMBEDDED_WORKER it would be a 503, a "server error" here).
    app = build_app(auth="token", auth_tokens_file=str(tmp_path / "api-tokens"), embedded_worker=False)
    app.config["CONTRACT_TOKEN"] = token
    return app


def _known_state(client: Any) -> int:
    """The feature group and pipelines allowed requests name, and a training job; the job's id. Recreated when a
    request schemathesis sent removed them."""
    if client.get(f"{FG}/{KNOWN_FG}").status_code == 404:
        body = {"featuregroup_name": KNOWN_FG, "feature_list": FEATURES, "datalake_source": "CsvSource",
                "measurement": "cell_kpis.csv", "enable_dme": False}
        assert client.post(FG, json=body).status_code == 201
    for name in (KNOWN_TRAINING, KNOWN_RETRAINING):
        if client.get(f"/pipelines/{name}").status_code == 404:
            with PIPELINE_FILE.open("rb") as file:
                answer = client.post(f"/pipelines/{name}/upload", data={"file": (file, "pipeline.yaml")},
                                     content_type="multipart/form-data")
            assert answer.status_code == 200, answer.get_json()
    jobs = client.get(f"{JOBS}?limit=1").get_json()
    if jobs:
        return jobs[0]["id"]
    answer = client.post(JOBS, json={
        "model_id": {"modelname": "st_model", "modelversion": "1"},
        "training_config": {
            "description": "", "dataPipeline": {"feature_group_name": KNOWN_FG, "query_filter": "", "arguments": {}},
            "trainingPipeline": {"pipeline_name": KNOWN_TRAINING, "pipeline_version": "latest",
                                 "retraining_pipeline_name": KNOWN_RETRAINING,
                                 "retraining_pipeline_version": "latest"}}})
    assert answer.status_code == 201, answer.get_json()
    return answer.get_json()["id"]


_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_CONTROL = re.compile(r"[\x00-\x1f]")


def _without_control_characters(value: Any) -> Any:
    """A free-form JSON value (metrics, a callback's extra members) without control characters in its names and
    strings: the contract says so in words, as Swagger 2.0 has no schema for "any JSON without them"."""
    if isinstance(value, str):
        return _CONTROL.sub("", value)
    if isinstance(value, dict):
        return {_CONTROL.sub("", key): _without_control_characters(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_without_control_characters(item) for item in value]
    return value


def _one_spelling(body: Any, pairs: dict[str, str]) -> None:
    """A field given in two spellings keeps one (with two different values it is a 400 that names both)."""
    if isinstance(body, dict):
        for name, alias in pairs.items():
            if name in body and alias in body:
                del body[alias]


def _make_job_request_allowed(body: dict[str, Any]) -> None:
    _one_spelling(body, {"model_id": "modelId", "training_config": "trainingConfig",
                         "model_location": "modelLocation", "training_dataset": "trainingDataset",
                         "validation_dataset": "validationDataset", "notification_url": "notificationDestination",
                         "consumer_rapp_id": "consumerRAppId", "producer_rapp_id": "producerRAppId"})
    _one_spelling(body.get("model_id", body.get("modelId")),
                  {"modelname": "modelName", "modelversion": "modelVersion", "artifactversion": "artifactVersion"})
    for key in ("notification_url", "notificationDestination"):
        if key in body:
            body[key] = ""  # no peer: the outbound policy and delivery have their own tests
    config = body.get("training_config", body.get("trainingConfig"))
    if isinstance(config, dict):
        data = config.get("dataPipeline")
        if isinstance(data, dict):
            data["feature_group_name"] = KNOWN_FG
            data["query_filter"] = ""  # a filter's grammar is not a JSON schema
            if isinstance(data.get("arguments"), dict):
                data["arguments"] = {k: v for k, v in data["arguments"].items() if _IDENTIFIER.fullmatch(k)}
        pipeline = config.get("trainingPipeline")
        if isinstance(pipeline, dict):
            _one_spelling(pipeline, {"pipeline_name": "training_pipeline_name",
                                     "pipeline_version": "training_pipeline_version"})
            name_key = "pipeline_name" if "pipeline_name" in pipeline else "training_pipeline_name"
            version_key = "pipeline_version" if "pipeline_version" in pipeline else "training_pipeline_version"
            pipeline.update({name_key: KNOWN_TRAINING, version_key: "latest",
                             "retraining_pipeline_name": KNOWN_RETRAINING, "retraining_pipeline_version": "latest"})


def _make_feature_group_allowed(body: dict[str, Any], path_name: str | None) -> None:
    if path_name is not None:  # an update: the body names the path's feature group and sends no id it cannot know
        body["featuregroup_name"] = path_name
        body.pop("id", None)
    if body.get("token") == "****":
        body["token"] = "secret"  # a create must send the real token
    body["enable_dme"] = False  # a DME information job needs a DME: test_dme.py
    if body.get("datalake_source") == "InfluxSource":
        # The fields an InfluxSource reads, not empty (white space is trimmed); a host the outbound policy allows
        # (a private address); a token, which may be "".
        body["host"] = "10.0.0.5"
        for name, default in (("port", "8086"), ("bucket", "pm"), ("db_org", "org")):
            if not str(body.get(name) or "").strip():
                body[name] = default
        if body.get("token") is None:
            body["token"] = ""
    else:
        body.update({"host": "", "port": ""})
        body["measurement"] = "cell_kpis.csv"  # a file the file sources can read


def _allowed(app: Any):
    """A `before_call` hook: an allowed (positive) request made to follow what Swagger 2.0 cannot say. Just before
    the call, so that it also holds for the stateful phase's requests, whose values come from earlier answers;
    schemathesis then checks the request against the contract again."""
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {app.config['CONTRACT_TOKEN']}"

    def before_call(context: Any, case: Any, kwargs: Any) -> None:
        if case.meta is None or case.meta.generation.mode != GenerationMode.POSITIVE:
            return
        method, path = case.operation.method.upper(), case.operation.path
        body = case.body if isinstance(case.body, dict) else None
        if case.query and case.query.get("cursor") is not None:
            key = "a_name" if path.startswith(FG) else 1
            case.query["cursor"] = encode_cursor(key)  # only cursors the service issued are valid
        if method == "POST" and path == JOBS and body is not None:
            _known_state(client)
            _make_job_request_allowed(body)
        elif path in (FG, "/featureGroup") and method == "POST" and body is not None:
            _make_feature_group_allowed(body, None)
        elif path.endswith("/{featuregroup_name}") and method == "PUT" and body is not None:
            _make_feature_group_allowed(body, case.path_parameters["featuregroup_name"])
        elif path.endswith("/update-model-metrics/{trainingjob_id}") and body is not None:
            case.body = _without_control_characters(body)
        elif path.startswith("/trainingjob/") and body is not None:
            body = case.body = _without_control_characters(body)
            job_id = _known_state(client)  # a callback for an unknown job is a 400 (the seed's "unknown job")
            body["trainingjob_id"] = job_id if isinstance(body.get("trainingjob_id"), int) else str(job_id)

    return before_call


def map_case(context: Any, case: Any) -> Any:
    """A `map_case` hook for followed logs and uploads (when generated: schemathesis cannot validate a body with a file again, and
    would take an upload changed just before the call for a forbidden one): an allowed upload sends a compiled
    pipeline, not any bytes, and no version name that is a number or "latest"."""
    if case.operation.path.endswith("/{training_job_id}/logs") and isinstance(case.query, dict) \
            and case.query.get("follow") == "true":
        # A followed log ends with its job; here no job runs (no worker), so it would never end: its own tests
        # (test_run_logs.py, test_cli_client.py) cover it. The same request unfollowed is checked instead.
        case.query["follow"] = "false"
    body = case.body
    if (case.meta is not None and case.meta.generation.mode == GenerationMode.POSITIVE
            and case.operation.path == "/pipelines/{pipe_name}/upload" and isinstance(body, dict)):
        body["file"] = Binary(PIPELINE_FILE.read_bytes())
        version = body.get("version_name")
        if isinstance(version, str) and (version.isdigit() or version == "latest"):
            del body["version_name"]
    return case


class _NotTheServicesFault:
    """Two failures schemathesis reports where the service is right, dropped (a `filter_failure` hook) in those
    cases only:
    - ST104 on an empty 204: a 204 has no body, so no Content-Type either; schemathesis asks every Swagger 2.0
      answer for one of the operation's `produces` types;
    - ST302 ("created resource not found") on `get-model-metrics/{id}` of a job the stateful phase deleted before:
      schemathesis counts a DELETE only against paths below the deleted one, and the metrics path is not below
      `/training-jobs/{id}` (its layout is the reference's)."""

    def __init__(self) -> None:
        self.deleted_jobs: set[str] = set()

    def after_call(self, context: Any, case: Any, response: Any) -> None:
        if (case.method.upper() == "DELETE" and case.operation.path == JOBS + "/{training_job_id}"
                and response.status_code == 204):
            self.deleted_jobs.add(str(case.path_parameters["training_job_id"]))

    def filter_failure(self, context: Any, failure: Any, case: Any, response: Any) -> bool:
        if failure.code == "ST104" and response.status_code == 204 and not response.content:
            return False
        if failure.code == "ST302" and response.status_code == 404:
            job_id = (case.path_parameters or {}).get("trainingjob_id")
            return str(job_id) not in self.deleted_jobs
        return True


@pytest.fixture(autouse=True)
def _probes_reach_the_app(monkeypatch):
    """schemathesis 4.32.5 sends its authentication probes (a request repeated without the credential, or with a
    made-up one) in process with the socket-level settings its WSGI transport drops only for requests of a session
    (`max_redirects` ...), which werkzeug's client refuses; drop them for the probes too."""
    send = WSGITransport.send

    def send_without_socket_settings(self: Any, case: Any, *, session: Any = None, **kwargs: Any) -> Any:
        if session is None:
            for name in ("max_redirects", "verify", "cert", "proxies"):
                kwargs.pop(name, None)
        return send(self, case, session=session, **kwargs)

    monkeypatch.setattr(WSGITransport, "send", send_without_socket_settings)


def _run(app: Any) -> tuple[Counter, list[str], list[str]]:
    """Runs schemathesis; (requests per operation, mismatches, errors)."""
    config = schemathesis.Config.from_dict({
        "seed": SEED,
        "workers": 1,
        "cache": {"enabled": False},
        "generation": {"mode": "all", "max-examples": MAX_EXAMPLES, "deterministic": True, "database": "none"},
        "checks": {"enabled": True},
        "auth": {"openapi": {"bearer": {"api_key": f"Bearer {app.config['CONTRACT_TOKEN']}"}}},
        "phases": {"stateful": {"enabled": True, "max-steps": 20}},
    })
    # The event stream never ends while it is read: its own tests (test_event_stream.py) cover it.
    schema = schemathesis.openapi.from_wsgi("/swagger.yaml", app, config=config).exclude(path=STREAM)
    not_faults = _NotTheServicesFault()

    def after_call(context: Any, case: Any, response: Any) -> None:
        not_faults.after_call(context, case, response)

    def filter_failure(context: Any, failure: Any, case: Any, response: Any) -> bool:
        return not_faults.filter_failure(context, failure, case, response)

    schema.hook(after_call)
    schema.hook(filter_failure)
    schema.hook(map_case)
    before_call = schemathesis.hook("before_call")(_allowed(app))  # a global hook: schemathesis has no other
    try:
        return _collect(from_schema(schema).execute())
    finally:
        GLOBAL_HOOK_DISPATCHER.unregister(before_call)


def _collect(run: Any) -> tuple[Counter, list[str], list[str]]:
    requests: Counter = Counter()
    mismatches: list[str] = []
    errors: list[str] = []
    seen: set[tuple[str, str, str]] = set()
    deadline = time.monotonic() + DEADLINE_SECONDS
    for event in run:
        if time.monotonic() > deadline:
            errors.append(f"not finished in {DEADLINE_SECONDS} s")
            break
        if isinstance(event, (events.ScenarioFinished, events.FuzzScenarioFinished)):
            recorder = event.recorder
            for case_id, interaction in recorder.interactions.items():
                node = recorder.cases.get(case_id)
                requests[node.value.operation.label if node else recorder.label] += 1
            for case_id, checks in recorder.checks.items():
                for check in checks:
                    info = check.failure_info
                    if info is None:
                        continue
                    failure = info.failure
                    key = (failure.operation or "", failure.code, failure.title)
                    if key not in seen:
                        seen.add(key)
                        interaction = recorder.interactions.get(case_id)
                        answer = interaction.response if interaction is not None else None
                        answered = (f"{answer.status_code} {answer.content[:400]!r}" if answer is not None
                                    else "no answer")
                        mismatches.append(f"{failure.operation}: {failure.code} {failure.title}: "
                                          f"{failure.message.strip()[:600]}\n    {info.code_sample[:800]}\n"
                                          f"    answered {answered}")
        elif isinstance(event, events.NonFatalError):
            errors.append(f"{event.label}: {event.info.title}: {event.value!r}")
        elif isinstance(event, events.FatalError):
            errors.append(f"fatal: {event.exception!r}")
        elif isinstance(event, events.EngineFinished) and event.stop_reason.skip_explanation:
            errors.append(f"stopped early: {event.stop_reason.skip_explanation}")
    return requests, mismatches, errors


def test_the_service_keeps_its_contract(contract_app):
    requests, mismatches, errors = _run(contract_app)
    assert errors == [], "\n".join(errors)
    assert mismatches == [], f"{len(mismatches)} contract mismatches:\n" + "\n\n".join(mismatches)
    # It ran: every operation of the contract got requests.
    from tests.test_contract import load_spec, spec_operations

    built, _ = spec_operations(load_spec())
    # The contract itself is what schemathesis loads, not an operation it tests.
    missing = {f"{method} {path}" for method, path in built} - set(requests) - {"GET /swagger.yaml", f"GET {STREAM}"}
    assert missing == set(), f"operations schemathesis did not reach: {sorted(missing)}"
    assert sum(requests.values()) >= 10 * len(built), requests
