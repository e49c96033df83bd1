"""RemoteExtractor against a local double of the data-extraction service (tests/extraction_doubles.py)."""
from __future__ import annotations

import json
import time
from typing import Iterator

import pytest

from tests.extraction_doubles import DataExtractionService, refused_url
from trainingmgr.adapters.base import AdapterError, ExtractionRequest
from trainingmgr.adapters.remote_extraction import RemoteExtractor, influx_query, start_body
from tests.peers import LOCAL_OUTBOUND

INFLUX_SOURCE = {
    "host": "influxdb.smo.svc",
    "port": "8086",
    "bucket": "UEData",
    "db_org": "primary",
    "measurement": "liveCell",
    "token": "s3cr3t",
    "source_name": "",
}


def request(
    *,
    source: str = "InfluxSource",
    featurepath: str = "base1_52",
    trainingjob_id: int = 52,
    connection: dict[str, str] | None = None,
) -> ExtractionRequest:
    return ExtractionRequest(
        trainingjob_id=trainingjob_id,
        featurepath=featurepath,
        datalake_source=source,
        feature_list=["pdcpBytesDl", "pdcpBytesUl"],
        query_filter="nrCellIdentity = 'c1/B13'",
        source=connection or INFLUX_SOURCE,
    )


@pytest.fixture
def service() -> Iterator[DataExtractionService]:
    double = DataExtractionService().start()
    yield double
    double.stop()


@pytest.fixture
def extractor(service: DataExtractionService) -> RemoteExtractor:
    return RemoteExtractor(outbound=LOCAL_OUTBOUND, url=service.url + "/", timeout=2)


# ------------------------------------------------------------------------------------------- start
REFERENCE_QUERY = (
    'from(bucket:"UEData") |> range(start: 0, stop: now()) |> filter(fn: (r) => r._measurement == "liveCell") '
    '|> pivot(rowKey:["_time"], columnKey: ["_field"], valueColumn: "_value")'
)


def test_start_posts_the_reference_body(service: DataExtractionService, extractor: RemoteExtractor) -> None:
    status = extractor.start(request())
    assert status.state == "IN_PROGRESS" and status.dataset_uri is None
    check, post = service.recorded()
    # An unknown task first (nothing to take over), then exactly one start.
    assert (check.method, check.path) == ("GET", "/task-status/base1_52")
    assert (post.method, post.path) == ("POST", "/feature-groups")
    assert post.headers["Content-Type"] == "application/json"
    assert post.headers["Accept"] == "application/json"
    assert post.json() == {
        "source": {"InfluxSource": {"query": REFERENCE_QUERY}},
        "transform": [
            {"operation": "SQLTransform", "FeatureList": "pdcpBytesDl,pdcpBytesUl",
             "SQLFilter": "nrCellIdentity = 'c1/B13'"}
        ],
        "sink": {"CassandraSink": {"CollectionName": "base1_52"}},
        "influxdb_info": {"host": "influxdb.smo.svc", "port": "8086", "bucket": "UEData", "token": "s3cr3t",
                          "db_org": "primary", "source_name": ""},
        "trainingjob_id": "52",
    }
    assert list(post.json()) == ["source", "transform", "sink", "influxdb_info", "trainingjob_id"]
    assert service.state_of("base1_52") == "Accepted"


def test_other_sources_send_an_empty_source_object() -> None:
    body = start_body(request(source="CsvSource", connection={"measurement": "cells.csv"}))
    assert body["source"] == {"CsvSource": {}}
    assert body["influxdb_info"] == {"host": "", "port": "", "bucket": "", "token": "", "db_org": "",
                                     "source_name": ""}


def test_bucket_and_measurement_cannot_break_out_of_the_query() -> None:
    query = influx_query('pm"bucket', 'x") |> drop() //')
    assert query == (
        'from(bucket:"pm\\"bucket") |> range(start: 0, stop: now()) '
        '|> filter(fn: (r) => r._measurement == "x\\") |> drop() //") '
        '|> pivot(rowKey:["_time"], columnKey: ["_field"], valueColumn: "_value")'
    )
    assert influx_query("b", "a\\b${x}\nc").count('"a\\\\b\\${x}\\nc"') == 1
    with pytest.raises(AdapterError) as caught:
        influx_query("b", "nul\x00")
    assert caught.value.retryable is False


def test_start_does_not_post_twice_a_task_the_service_holds(
    service: DataExtractionService, extractor: RemoteExtractor
) -> None:
    # An earlier start reached the service but its answer was lost: the retry takes the queued task over.
    extractor.start(request())
    assert extractor.start(request()).state == "IN_PROGRESS"
    assert [r.method for r in service.recorded()] == ["GET", "POST", "GET"]
    # A finished task of the same name is extracted again.
    service.step()
    service.step()
    assert service.state_of("base1_52") == "Completed"
    extractor.start(request())
    assert [r.method for r in service.recorded()][3:] == ["GET", "POST"]


@pytest.mark.parametrize("status, retryable", [(400, False), (404, False), (422, False), (500, True), (503, True)])
def test_start_answers(service: DataExtractionService, extractor: RemoteExtractor, status: int,
                       retryable: bool) -> None:
    service.start_answer = (status, {"result": "the service's own words"})
    with pytest.raises(AdapterError) as caught:
        extractor.start(request())
    assert caught.value.retryable is retryable
    assert f"HTTP {status}" in str(caught.value) and "the service's own words" in str(caught.value)
    assert "s3cr3t" not in str(caught.value)


def test_start_while_busy_is_queued_like_the_reference(service: DataExtractionService,
                                                       extractor: RemoteExtractor) -> None:
    first, second = request(), request(featurepath="base1_53", trainingjob_id=53)
    extractor.start(first)
    extractor.start(second)
    states = []
    while True:
        status = extractor.status(second)
        states.append(status.state)
        if status.state != "IN_PROGRESS":
            break
        assert len(states) < 20
    assert states[-1] == "COMPLETED"
    assert len(states) > 3  # it waited for the first task before its own two steps
    assert extractor.status(first).state == "COMPLETED"


def test_start_while_busy_rejected_is_retryable(service: DataExtractionService, extractor: RemoteExtractor) -> None:
    service.reject_when_busy = True
    extractor.start(request())
    with pytest.raises(AdapterError) as caught:
        extractor.start(request(featurepath="base1_53", trainingjob_id=53))
    assert caught.value.retryable is True and "busy" in str(caught.value)


def test_a_post_is_never_sent_twice_by_the_client(service: DataExtractionService,
                                                  extractor: RemoteExtractor) -> None:
    # The connection drops after the service read the POST: it may have queued the task, so no resend.
    service.drop_methods = {"POST"}
    with pytest.raises(AdapterError) as caught:
        extractor.start(request())
    assert caught.value.retryable is True
    assert [r.method for r in service.recorded()] == ["GET", "POST"]
    service.drop_methods = {"GET"}
    with pytest.raises(AdapterError) as caught:
        extractor.status(request())
    assert caught.value.retryable is True
    assert [r.method for r in service.recorded()] == ["GET", "POST", "GET"]


def test_only_connection_errors_are_retried_by_the_session() -> None:
    extractor = RemoteExtractor(outbound=LOCAL_OUTBOUND, url="http://127.0.0.1:1", timeout=1)
    retry = extractor._session.get_adapter("http://127.0.0.1:1").max_retries
    assert retry.connect == 1 and retry.read is False and retry.status == 0 and retry.other == 0
    assert retry.redirect == 0


# ------------------------------------------------------------------------------------------- status
def test_states_on_successive_polls(service: DataExtractionService, extractor: RemoteExtractor) -> None:
    service.accepted_polls, service.in_progress_polls = 2, 3
    extractor.start(request())
    service.requests.clear()
    seen = [extractor.status(request()) for _ in range(6)]
    assert [s.state for s in seen] == ["IN_PROGRESS"] * 5 + ["COMPLETED"]
    assert seen[-1].dataset_uri == "base1_52"  # the pipeline reads the service's collection by name
    assert {(r.method, r.path) for r in service.recorded()} == {("GET", "/task-status/base1_52")}
    assert all(r.body == b"" for r in service.recorded())


def test_error_fails_the_extraction_with_the_service_message(service: DataExtractionService,
                                                              extractor: RemoteExtractor) -> None:
    service.fail_tasks["base1_52"] = "column nrCellIdentity does not exist"
    extractor.start(request())
    states = [extractor.status(request()) for _ in range(3)]
    assert [s.state for s in states] == ["IN_PROGRESS", "IN_PROGRESS", "FAILED"]
    assert "column nrCellIdentity does not exist" in (states[-1].error or "")


def test_error_answered_with_200_is_a_failure_too(service: DataExtractionService,
                                                  extractor: RemoteExtractor) -> None:
    # The reference's code answers "Error" with 200 (a typo in its status variable): same meaning.
    extractor.start(request())
    service.fail_tasks["base1_52"] = "boom"
    service.step()
    service.step()
    import tests.extraction_doubles as doubles

    original = doubles.DataExtractionService.answer

    def answer_200(handler, status, body, *args, **kwargs):  # type: ignore[no-untyped-def]
        return original(handler, 200 if status == 500 else status, body, *args, **kwargs)

    service.answer = answer_200  # type: ignore[method-assign]
    status = extractor.status(request())
    assert status.state == "FAILED" and "boom" in (status.error or "")


def test_unknown_task_is_retried_a_few_times_then_failed(service: DataExtractionService) -> None:
    extractor = RemoteExtractor(outbound=LOCAL_OUTBOUND, url=service.url, timeout=2, unknown_task_limit=3)
    for _ in range(2):
        with pytest.raises(AdapterError) as caught:
            extractor.status(request())
        assert caught.value.retryable is True and "HTTP 500" in str(caught.value)
    status = extractor.status(request())
    assert status.state == "FAILED" and "does not know task 'base1_52'" in (status.error or "")
    # The count starts again afterwards, and any good answer resets it.
    with pytest.raises(AdapterError):
        extractor.status(request())
    extractor.start(request())
    for _ in range(3):
        assert extractor.status(request()).state in ("IN_PROGRESS", "COMPLETED")


def test_unexpected_task_status_is_not_retried(service: DataExtractionService, extractor: RemoteExtractor) -> None:
    extractor.start(request())
    service.tasks["base1_52"].status = "Paused"
    with pytest.raises(AdapterError) as caught:
        extractor.status(request())
    assert caught.value.retryable is False and "Paused" in str(caught.value)


def test_status_4xx_is_not_retryable(service: DataExtractionService) -> None:
    extractor = RemoteExtractor(outbound=LOCAL_OUTBOUND, url=service.url + "/not-the-service", timeout=2)
    with pytest.raises(AdapterError) as caught:
        extractor.status(request())
    assert caught.value.retryable is False and "HTTP 404" in str(caught.value)


# ------------------------------------------------------------------------------------------- slow, down
def test_slow_service_times_out_retryably_within_bounds(service: DataExtractionService) -> None:
    service.delay = 3
    extractor = RemoteExtractor(outbound=LOCAL_OUTBOUND, url=service.url, timeout=0.3)
    for call in (extractor.start, extractor.status):
        began = time.monotonic()
        with pytest.raises(AdapterError) as caught:
            call(request())
        assert time.monotonic() - began < 1.5
        assert caught.value.retryable is True and "within 0.3 s" in str(caught.value)
    assert service.recorded("POST") == []  # the status check timed out: nothing was started


def test_slow_start_is_not_resent(service: DataExtractionService) -> None:
    service.delay, service.delay_methods = 3, {"POST"}
    extractor = RemoteExtractor(outbound=LOCAL_OUTBOUND, url=service.url, timeout=0.3)
    began = time.monotonic()
    with pytest.raises(AdapterError) as caught:
        extractor.start(request())
    assert time.monotonic() - began < 1.5
    assert caught.value.retryable is True
    assert [r.method for r in service.recorded()] == ["GET", "POST"]


def test_down_service_is_retryable(service: DataExtractionService) -> None:
    url = service.url
    service.stop()
    for target in (url, refused_url()):
        extractor = RemoteExtractor(outbound=LOCAL_OUTBOUND, url=target, timeout=1)
        for call in (extractor.start, extractor.status):
            began = time.monotonic()
            with pytest.raises(AdapterError) as caught:
                call(request())
            assert caught.value.retryable is True and "not reachable" in str(caught.value)
            assert time.monotonic() - began < 1.5


def test_remove_has_nothing_to_delete(service: DataExtractionService, extractor: RemoteExtractor) -> None:
    extractor.remove("base1_52")
    assert service.recorded() == []
    with pytest.raises(AdapterError, match="invalid featurepath"):
        extractor.remove("../x")


@pytest.mark.parametrize("featurepath", ["../x", "a/b", "a?b", ""])
def test_featurepath_never_reaches_the_url_unchecked(service: DataExtractionService, extractor: RemoteExtractor,
                                                      featurepath: str) -> None:
    for call in (extractor.start, extractor.status):
        with pytest.raises(AdapterError, match="invalid featurepath"):
            call(request(featurepath=featurepath))
    assert service.recorded() == []


@pytest.mark.parametrize("url", ["", "ftp://x", "dataextraction:32000", "http://"])
def test_bad_urls_are_refused_at_construction(url: str) -> None:
    with pytest.raises(ValueError):
        RemoteExtractor(outbound=LOCAL_OUTBOUND, url=url, timeout=1)


def test_the_token_is_not_logged(service: DataExtractionService, extractor: RemoteExtractor,
                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    extractor.start(request())
    extractor.status(request())
    assert "s3cr3t" not in caplog.text
    assert json.loads(service.recorded("POST")[0].body)["influxdb_info"]["token"] == "s3cr3t"


def test_polling_like_the_worker(service: DataExtractionService, extractor: RemoteExtractor) -> None:
    """start once, then status while IN_PROGRESS (what workers/steps.py does)."""
    req = request()
    status = extractor.start(req)
    polls = 0
    while status.state == "IN_PROGRESS":
        status = extractor.status(req)
        polls += 1
        assert polls < 10
    assert status.state == "COMPLETED" and status.dataset_uri == req.featurepath
    assert len(service.recorded("POST")) == 1
