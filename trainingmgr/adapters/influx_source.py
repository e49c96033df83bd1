"""Reading an InfluxDB 2 measurement for the embedded extractor, with influxdb-client.

The query is fixed text; the feature group's bucket and measurement, and the columns to keep, travel as bind
parameters (`params=` of the query API), never inside the Flux text, so no value of theirs can change the query.
influxdb-client sends each parameter as an ``option <name> = <literal>`` statement of the request's `extern` AST
(its `params=` has no nested records, hence names of their own rather than ``params.bucket``)::

    from(bucket: tm_bucket)
      |> range(start: 0, stop: now())
      |> filter(fn: (r) => r._measurement == tm_measurement)
      |> pivot(rowKey: ["_time"], columnKey: ["_field"], valueColumn: "_value")
      |> keep(columns: tm_columns)

Rows are streamed (FluxRecords) and handed out in DataFrames of at most `chunk_rows` rows, so memory stays bounded
whatever the size of the measurement. Each call to the server has `timeout` seconds (connect, and each wait for
bytes of the answer).

Errors become AdapterError: unreachable server, timeouts, 429 and 5xx are retryable; 401/403 (token), 404 (bucket
or organisation), 400 (query) and other answers, a Flux error inside the answer or a broken answer are not.
"""
from __future__ import annotations

import http.client
import logging
import socket
from typing import Any, Iterator, Mapping, Sequence

import pandas as pd
import urllib3
from influxdb_client import InfluxDBClient
from influxdb_client.client.exceptions import InfluxDBError
from influxdb_client.client.flux_csv_parser import FluxCsvParserException, FluxQueryException
from influxdb_client.rest import ApiException

from .base import AdapterError
from .outbound import OutboundDenied, OutboundPolicy, guard_pool_manager, http_url, parse_host, parse_port

log = logging.getLogger(__name__)

FLUX_QUERY = (
    "from(bucket: tm_bucket)\n"
    "  |> range(start: 0, stop: now())\n"
    "  |> filter(fn: (r) => r._measurement == tm_measurement)\n"
    '  |> pivot(rowKey: ["_time"], columnKey: ["_field"], valueColumn: "_value")\n'
    "  |> keep(columns: tm_columns)"
)
BUCKET_PARAM, MEASUREMENT_PARAM, COLUMNS_PARAM = "tm_bucket", "tm_measurement", "tm_columns"

class MissingColumns(AdapterError):
    """The measurement has rows, but some asked-for columns never appeared in them."""

    def __init__(self, measurement: str, missing: list[str], seen: set[str]):
        super().__init__(f"column(s) not in measurement {measurement!r}: {', '.join(missing)}", retryable=False)
        self.missing = missing
        self.seen = seen


def _bad(message: str) -> AdapterError:
    return AdapterError(message, retryable=False)


def influx_url(source: Mapping[str, Any]) -> str:
    """http://host:port of the feature group's InfluxDB; only a host name or an IP address, and a port number."""
    host = str(source.get("host") or "").strip()
    port = str(source.get("port") or "").strip()
    if not host:
        raise _bad("the feature group's InfluxDB host is empty")
    try:
        host, _address = parse_host(host)
    except ValueError:
        raise _bad(f"the feature group's InfluxDB host {host!r} is not a host name or IP address") from None
    try:
        return http_url(host, parse_port(port))
    except ValueError:
        raise _bad(f"the feature group's InfluxDB port {port!r} is not a port number") from None


def query_params(bucket: str, measurement: str, columns: Sequence[str]) -> dict[str, Any]:
    return {BUCKET_PARAM: bucket, MEASUREMENT_PARAM: measurement, COLUMNS_PARAM: list(columns)}


def _why_unreachable(error: Exception) -> str:
    """"connection refused" or "unknown host", as an operator reads it; the exception's class otherwise."""
    if isinstance(error, (urllib3.exceptions.NameResolutionError, socket.gaierror)):
        return "unknown host"
    cause = error.__cause__ or error.__context__
    if isinstance(error, ConnectionRefusedError) or isinstance(cause, ConnectionRefusedError) \
            or "Connection refused" in str(error):
        return "connection refused"
    return error.__class__.__name__


def _error(where: str, error: Exception) -> AdapterError:
    """Sort an influxdb-client failure into retryable (the server or the network) or not (our request).

    The reason goes on the job, which any client may read, and the host is a client's choice: it says what kind
    of failure it was, never what the peer answered (its error text could be any internal service's page). The
    log has the peer's words."""
    if isinstance(error, OutboundDenied):
        return _bad(f"InfluxDB at {where} may not be called: {error.rule} (TM_OUTBOUND_ALLOW changes this)")
    if isinstance(error, (ApiException, FluxQueryException, FluxCsvParserException, InfluxDBError)):
        log.warning("InfluxDB at %s failed: %s", where, str(getattr(error, "message", "") or error)[:1000])
    if isinstance(error, ApiException):
        status = error.status or 0
        if status == 0:  # TLS trouble, or a request the client could not build
            return _bad(f"InfluxDB at {where} could not be asked ({error.__class__.__name__})")
        if status in (401, 403):
            return _bad(f"InfluxDB at {where} refused the token (HTTP {status})")
        if status == 404:
            return _bad(f"InfluxDB at {where}: bucket or organisation not found (HTTP 404)")
        retryable = status >= 500 or status == 429
        return AdapterError(f"InfluxDB at {where} answered HTTP {status}", retryable=retryable)
    if isinstance(error, FluxQueryException):
        return _bad(f"InfluxDB at {where}: the query failed (the service log has InfluxDB's message)")
    if isinstance(error, FluxCsvParserException):
        return _bad(f"InfluxDB at {where} gave an answer that is not annotated CSV")
    if isinstance(error, urllib3.exceptions.MaxRetryError) and isinstance(error.reason, Exception):
        error = error.reason
    if isinstance(error, urllib3.exceptions.NewConnectionError):
        return AdapterError(f"InfluxDB at {where} is not reachable ({_why_unreachable(error)})", unreachable=True)
    if isinstance(error, (urllib3.exceptions.TimeoutError, TimeoutError)):
        return AdapterError(f"InfluxDB at {where} did not answer in time", retryable=True)
    if isinstance(error, (ConnectionRefusedError, socket.gaierror)):
        return AdapterError(f"InfluxDB at {where} is not reachable ({_why_unreachable(error)})", unreachable=True)
    if isinstance(error, (urllib3.exceptions.HTTPError, http.client.HTTPException, OSError)):
        return AdapterError(f"InfluxDB at {where} is not reachable ({error.__class__.__name__})", retryable=True)
    if isinstance(error, InfluxDBError):
        return AdapterError(f"InfluxDB at {where} failed (the service log has InfluxDB's message)", retryable=False)
    log.warning("reading InfluxDB at %s failed: %r", where, error)
    return _bad(f"reading InfluxDB at {where} failed: {error.__class__.__name__}")


def _frame(rows: list[dict[str, Any]], columns: list[str]) -> pd.DataFrame:
    # A column absent from the whole chunk holds None only (dtype object): the filter treats it as missing values.
    return pd.DataFrame.from_records(rows, columns=columns)


def read_influx(
    source: Mapping[str, Any], columns: Sequence[str], *, timeout: float, outbound: OutboundPolicy,
    chunk_rows: int = 100_000,
) -> Iterator[pd.DataFrame]:
    """The rows of the feature group's measurement, `columns` only (in that order), in chunks of `chunk_rows`.

    `source` holds host, port, token, db_org, bucket and measurement. A row without one of the columns (its series
    has no such field or tag) has a missing value there. At the end, raises AdapterError when the measurement has
    no rows, and MissingColumns when some column appeared in none of them (a typo in a feature or the filter).
    """
    url = influx_url(source)
    where = url[len("http://"):]
    bucket = str(source.get("bucket") or "").strip()
    measurement = str(source.get("measurement") or "").strip()
    org = str(source.get("db_org") or "").strip()
    if not bucket:
        raise _bad("the feature group's bucket is empty")
    if not measurement:
        raise _bad("the feature group's measurement is empty")
    wanted = list(dict.fromkeys(columns))
    if not wanted:
        raise _bad("no columns to read")
    chunk_rows = max(1, chunk_rows)
    timeout_ms = max(1, int(timeout * 1000))

    client = InfluxDBClient(url=url, token=str(source.get("token") or ""), org=org or None, timeout=timeout_ms)
    # The host is a client's choice: the token goes only to an address the outbound policy allows when connecting.
    guard_pool_manager(client.api_client.rest_client.pool_manager, outbound)
    stream = None
    try:
        try:
            stream = client.query_api().query_stream(
                FLUX_QUERY, org=org or None, params=query_params(bucket, measurement, wanted)
            )
        except Exception as e:  # sorted into retryable or not by _error
            raise _error(where, e) from e
        seen: set[str] = set()
        batch: list[dict[str, Any]] = []
        total = 0
        while True:
            try:
                record = next(stream)
            except StopIteration:
                break
            except Exception as e:  # the answer broke off, or carries a Flux error
                raise _error(where, e) from e
            values = record.values
            seen.update(c for c in wanted if c in values)
            batch.append({c: values.get(c) for c in wanted})
            if len(batch) >= chunk_rows:
                total += len(batch)
                yield _frame(batch, wanted)
                batch = []
        if batch:
            total += len(batch)
            yield _frame(batch, wanted)
        if total == 0:
            raise _bad(f"measurement {measurement!r} in bucket {bucket!r} has no data (are the names right?)")
        missing = [c for c in wanted if c not in seen]
        if missing:
            raise MissingColumns(measurement, missing, seen)
    finally:
        if stream is not None:
            stream.close()
        client.close()
