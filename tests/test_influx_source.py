"""InfluxSource: influxdb-client queries against a local InfluxDB double (tests/extraction_doubles.py)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
import pytest

from tests.extraction_doubles import InfluxDouble, extern_params, refused_url
from trainingmgr.adapters.base import AdapterError, ExtractionRequest
from trainingmgr.adapters.extraction import EmbeddedExtractor
from trainingmgr.adapters.influx_source import COLUMNS_PARAM, FLUX_QUERY, MissingColumns, read_influx
from tests.peers import LOCAL_OUTBOUND

CELL_C1 = pd.DataFrame(
    {
        "_time": pd.to_datetime(["2024-01-01T00:00:00Z", "2024-01-01T00:01:00Z", "2024-01-01T00:02:00Z"]),
        "cellid": ["c1", "c1", "c1"],
        "pdcpBytesDl": [100, 200, 300],
        "pdcpBytesUl": [10.5, 20.5, 30.5],
        "hour": [0, 1, 2],
    }
)
CELL_C2 = pd.DataFrame(  # another series (tag cellid=c2), one more field
    {
        "_time": pd.to_datetime(["2024-01-01T00:00:00Z", "2024-01-01T00:01:00Z"]),
        "cellid": ["c2", "c2"],
        "pdcpBytesDl": [400, 500],
        "pdcpBytesUl": [40.5, 50.5],
        "hour": [3, 4],
        "prbUsage": [0.5, 0.7],
    }
)


@pytest.fixture
def influx() -> Iterator[InfluxDouble]:
    double = InfluxDouble([CELL_C1, CELL_C2], keep_param=COLUMNS_PARAM).start()
    yield double
    double.stop()


def connection(influx: InfluxDouble, **changes: str) -> dict[str, str]:
    source = {"host": "127.0.0.1", "port": str(influx.port), "bucket": "pm-bucket", "measurement": "cell_kpis",
              "db_org": "primary", "token": "s3cr3t-token", "source_name": ""}
    source.update(changes)
    return source


def read_all(source: dict[str, Any], columns: list[str], **kwargs: Any) -> list[pd.DataFrame]:
    return list(read_influx(source, columns, timeout=kwargs.pop("timeout", 2), outbound=kwargs.pop("outbound", LOCAL_OUTBOUND), **kwargs))


def request(source: dict[str, str], *, features: tuple[str, ...] = ("pdcpBytesDl", "pdcpBytesUl"),
            query_filter: str = "", featurepath: str = "cell_kpis_7") -> ExtractionRequest:
    return ExtractionRequest(trainingjob_id=7, featurepath=featurepath, datalake_source="InfluxSource",
                             feature_list=list(features), query_filter=query_filter, source=source)


@pytest.fixture
def extractor(tmp_path: Path) -> EmbeddedExtractor:
    return EmbeddedExtractor([tmp_path / "sources"], tmp_path / "datasets", influx_timeout=2, outbound=LOCAL_OUTBOUND)


def bad_input(extractor: EmbeddedExtractor, req: ExtractionRequest, message: str) -> AdapterError:
    with pytest.raises(AdapterError) as caught:
        extractor.start(req)
    assert caught.value.retryable is False, caught.value
    assert message in str(caught.value)
    assert not extractor.dataset_dir.exists() or not any(extractor.dataset_dir.iterdir())  # nothing left behind
    return caught.value


# ------------------------------------------------------------------------------------------- the query
def test_a_real_client_query_returns_the_pivoted_rows(influx: InfluxDouble) -> None:
    frames = read_all(connection(influx), ["cellid", "pdcpBytesDl", "pdcpBytesUl"])
    rows = pd.concat(frames, ignore_index=True)
    assert list(rows.columns) == ["cellid", "pdcpBytesDl", "pdcpBytesUl"]
    assert rows["cellid"].tolist() == ["c1", "c1", "c1", "c2", "c2"]
    assert rows["pdcpBytesDl"].tolist() == [100, 200, 300, 400, 500]
    assert rows["pdcpBytesUl"].tolist() == [10.5, 20.5, 30.5, 40.5, 50.5]

    (sent,) = influx.recorded()
    assert (sent.method, InfluxDouble.org_of(sent)) == ("POST", "primary")
    assert sent.path.startswith("/api/v2/query?")
    assert sent.headers["Authorization"] == "Token s3cr3t-token"
    body = sent.json()
    assert body["query"] == FLUX_QUERY
    assert extern_params(body) == {"tm_bucket": "pm-bucket", "tm_measurement": "cell_kpis",
                                   "tm_columns": ["cellid", "pdcpBytesDl", "pdcpBytesUl"]}
    assert "pm-bucket" not in body["query"] and "cell_kpis" not in body["query"]


def test_rows_come_in_bounded_chunks(influx: InfluxDouble) -> None:
    frames = read_all(connection(influx), ["hour"], chunk_rows=2)
    assert [len(f) for f in frames] == [2, 2, 1]
    assert pd.concat(frames)["hour"].tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    "bucket, measurement",
    [
        ('pm"bucket', 'x") |> drop() //'),
        ("pm_bucket_2", 'cell_kpis" or r._measurement != "'),
        ("pm\\", "m\n|> yield()"),
        ("${x}", "'; drop"),
    ],
)
def test_bucket_and_measurement_are_parameters_not_query_text(influx: InfluxDouble, bucket: str,
                                                              measurement: str) -> None:
    read_all(connection(influx, bucket=bucket, measurement=measurement), ["hour"])
    body = influx.queries()[0]
    assert body["query"] == FLUX_QUERY  # the same text whatever they hold
    assert measurement not in body["query"] and bucket not in body["query"]
    params = extern_params(body)
    assert params["tm_bucket"] == bucket and params["tm_measurement"] == measurement


def test_missing_columns_and_no_data(influx: InfluxDouble) -> None:
    with pytest.raises(MissingColumns) as caught:
        read_all(connection(influx), ["hour", "rsrp"])
    assert caught.value.missing == ["rsrp"] and caught.value.retryable is False
    influx.tables = []
    with pytest.raises(AdapterError, match="has no data") as no_data:
        read_all(connection(influx), ["hour"])
    assert no_data.value.retryable is False


@pytest.mark.parametrize(
    "status, retryable, words",
    [
        (401, False, "refused the token (HTTP 401)"),
        (403, False, "refused the token (HTTP 403)"),
        (404, False, "not found (HTTP 404)"),
        (400, False, "HTTP 400"),
        (429, True, "HTTP 429"),
        (500, True, "HTTP 500"),
        (503, True, "HTTP 503"),
    ],
)
def test_http_errors(influx: InfluxDouble, status: int, retryable: bool, words: str) -> None:
    influx.status = status
    with pytest.raises(AdapterError) as caught:
        read_all(connection(influx), ["hour"])
    assert caught.value.retryable is retryable
    assert words in str(caught.value)
    assert "s3cr3t-token" not in str(caught.value)


def test_flux_error_in_the_answer_is_not_retryable(influx: InfluxDouble, caplog) -> None:
    influx.flux_error = "schema collision: cannot group float and string types together"
    with caplog.at_level("WARNING", logger="trainingmgr.adapters.influx_source"):
        with pytest.raises(AdapterError, match="the query failed") as caught:
            read_all(connection(influx), ["hour"])
    assert caught.value.retryable is False
    # The job's reason (any client reads it) never carries the peer's words; the operator's log does.
    assert "schema collision" not in str(caught.value)
    assert "schema collision" in caplog.text


def test_a_peer_error_page_is_not_relayed_into_the_reason(influx: InfluxDouble) -> None:
    influx.status, influx.message = 400, "internal-service banner: redis_version:7.0.15"
    with pytest.raises(AdapterError) as caught:
        read_all(connection(influx), ["hour"])
    assert "redis_version" not in str(caught.value) and "HTTP 400" in str(caught.value)


def test_down_and_slow_are_retryable(influx: InfluxDouble) -> None:
    port = refused_url().rsplit(":", 1)[1]
    with pytest.raises(AdapterError, match="not reachable") as down:
        read_all(connection(influx, port=port), ["hour"])
    assert down.value.retryable is True

    influx.delay = 3
    began = time.monotonic()
    with pytest.raises(AdapterError, match="did not answer in time") as slow:
        read_all(connection(influx), ["hour"], timeout=0.3)
    assert slow.value.retryable is True
    assert time.monotonic() - began < 1.5


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"host": ""}, "InfluxDB host is empty"),
        ({"host": "evil.example/path?x="}, "is not a host name or IP address"),
        ({"host": "user@host"}, "is not a host name or IP address"),
        ({"port": "80a"}, "is not a port number"),
        ({"port": "70000"}, "is not a port number"),
        ({"bucket": ""}, "bucket is empty"),
        ({"measurement": " "}, "measurement is empty"),
    ],
)
def test_bad_connections_are_refused_before_any_request(influx: InfluxDouble, changes: dict[str, str],
                                                        message: str) -> None:
    with pytest.raises(AdapterError, match=message) as caught:
        read_all(connection(influx, **changes), ["hour"])
    assert caught.value.retryable is False
    assert influx.recorded() == []


def test_ipv6_and_bracketed_hosts_are_accepted() -> None:
    from trainingmgr.adapters.influx_source import influx_url

    assert influx_url({"host": "::1", "port": "8086"}) == "http://[::1]:8086"
    assert influx_url({"host": "[::1]", "port": "08086"}) == "http://[::1]:8086"
    assert influx_url({"host": "influxdb.smo.svc", "port": "8086"}) == "http://influxdb.smo.svc:8086"


# ------------------------------------------------------------------------------------------- embedded extractor
def test_embedded_extractor_reads_influx_selects_features_and_filters(influx: InfluxDouble,
                                                                      extractor: EmbeddedExtractor) -> None:
    status = extractor.start(request(connection(influx), query_filter="cellid = 'c2' OR hour >= 2"))
    assert status.state == "COMPLETED" and status.rows == 3
    uri = Path(status.dataset_uri or "")
    assert uri == extractor.dataset_path("cell_kpis_7")
    assert uri.read_text().splitlines() == ["pdcpBytesDl,pdcpBytesUl", "300,30.5", "400,40.5", "500,50.5"]
    # Only the features and the columns the filter reads travel; the dataset keeps the features.
    assert extern_params(influx.queries()[0])[COLUMNS_PARAM] == ["pdcpBytesDl", "pdcpBytesUl", "cellid", "hour"]
    assert extractor.status(request(connection(influx))).state == "COMPLETED"
    extractor.remove("cell_kpis_7")
    assert not uri.exists()


def test_embedded_extractor_chunks_and_fields_missing_from_a_series(influx: InfluxDouble,
                                                                    tmp_path: Path) -> None:
    extractor = EmbeddedExtractor([], tmp_path / "ds", chunk_rows=2, influx_timeout=2, outbound=LOCAL_OUTBOUND)
    # prbUsage exists only in the c2 series: c1's rows have no value and never satisfy a comparison.
    status = extractor.start(request(connection(influx), features=("hour", "prbUsage"),
                                     query_filter="prbUsage > 0.6 or hour < 1"))
    assert status.rows == 2
    written = pd.read_csv(status.dataset_uri)
    assert written["hour"].tolist() == [0, 4] and pd.isna(written["prbUsage"][0]) and written["prbUsage"][1] == 0.7
    null_test = extractor.start(request(connection(influx), features=("hour",), query_filter="prbUsage IS NULL",
                                        featurepath="fg_8"))
    assert pd.read_csv(null_test.dataset_uri)["hour"].tolist() == [0, 1, 2]


def test_embedded_extractor_reports_bad_input(influx: InfluxDouble, extractor: EmbeddedExtractor) -> None:
    source = connection(influx)
    bad_input(extractor, request(source, features=("pdcpBytesDl", "rsrp")), "feature(s) not in 'cell_kpis': rsrp")
    bad_input(extractor, request(source, query_filter="nope = 1"), "query_filter: unknown column 'nope'")
    bad_input(extractor, request(source, query_filter="cellid = 5"), "query_filter: column 'cellid' holds text")
    bad_input(extractor, request(source, query_filter="hour > 100"), "the filter left no rows")
    bad_input(extractor, request(source, features=()), "the feature list is empty")
    sent = len(influx.recorded())
    # A filter that cannot parse is refused before InfluxDB is asked anything.
    bad_input(extractor, request(source, query_filter="__import__('os')"), "query_filter: function calls")
    bad_input(extractor, request(source, query_filter="hour >"), "query_filter:")
    assert len(influx.recorded()) == sent
    influx.tables = []
    bad_input(extractor, request(source), "has no data")


def test_embedded_extractor_keeps_influx_errors_retryable_or_not(influx: InfluxDouble,
                                                                 extractor: EmbeddedExtractor) -> None:
    influx.status = 401
    bad_input(extractor, request(connection(influx)), "refused the token")
    influx.status = 500
    with pytest.raises(AdapterError) as caught:
        extractor.start(request(connection(influx)))
    assert caught.value.retryable is True
    assert not extractor.dataset_dir.exists() or not any(extractor.dataset_dir.iterdir())


def test_embedded_extractor_injection_attempt_reads_nothing_else(influx: InfluxDouble,
                                                                 extractor: EmbeddedExtractor) -> None:
    source = connection(influx, measurement='x") |> drop() //', bucket='b") |> yield() //')
    extractor.start(request(source))
    body = influx.queries()[0]
    assert body["query"] == FLUX_QUERY
    assert extern_params(body)["tm_measurement"] == 'x") |> drop() //'
