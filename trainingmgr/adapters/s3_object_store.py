"""The real object store: MinIO (or any S3) through the `minio` SDK, in one of two layouts:
- the reference's (the default): bucket = model name, key = `<modelversion>/<artifactversion>/Model.zip`, so models
  stored by the reference's pipelines stay readable; a model name must then also be a valid S3 bucket name;
- one bucket (`bucket` given, TM_S3_BUCKET): key = `<modelname>/<modelversion>/<artifactversion>/Model.zip`, which
  holds any model name the service accepts.

Names are checked like the local store's (`check_bucket`, `check_key`) and, for buckets, also against S3's stricter
rules: a model name the layout cannot hold is an InvalidObjectName, never silently renamed.

Every call is bounded: connect and read timeouts of `timeout` seconds, at most 3 retries (connection errors, read
errors on idempotent requests, 5xx answers) with a short backoff, and Retry-After headers ignored. Failures become
AdapterError: retryable for outages, timeouts and 5xx, not retryable for 4xx (bad names, access denied).
"""
from __future__ import annotations

import mimetypes
import os
from pathlib import Path
from types import TracebackType
from typing import Callable, Iterator, TypeVar

import certifi
import urllib3
from minio import Minio
from minio.error import InvalidResponseError, MinioException, S3Error, ServerError
from urllib3.util import Retry, Timeout

from .base import AdapterError, ObjectStore
from .object_store import ObjectNotFound, check_bucket, check_key, check_s3_bucket

__all__ = ["S3ObjectStore", "S3Chunks"]

MAX_RETRIES = 3
BACKOFF_FACTOR = 0.2  # urllib3 sleeps 0, 0.4 then 0.8 s between the attempts
BACKOFF_MAX = 2.0
RETRY_STATUSES = (500, 502, 503, 504)
POOL_SIZE = 10
PROBE_BUCKET = "trainingmgr-readiness-probe"

_MISSING = ("NoSuchKey", "NoSuchBucket", "NoSuchObject", "ResourceNotFound")
_RETRYABLE_CODES = ("InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "RequestTimeTooSkewed")
_ALREADY_EXISTS = ("BucketAlreadyOwnedByYou", "BucketAlreadyExists")

T = TypeVar("T")


def _status(e: MinioException) -> int | None:
    if isinstance(e, S3Error):
        return getattr(e.response, "status", None)
    if isinstance(e, ServerError):
        return e.status_code
    if isinstance(e, InvalidResponseError):
        return getattr(e, "_code", None)
    return None


def _failure(what: str, e: BaseException) -> AdapterError:
    """The AdapterError for a failed call: retryable for outages, timeouts and 5xx; not for other answers."""
    if isinstance(e, S3Error):
        status = _status(e)
        retryable = (status is not None and status >= 500) or e.code in _RETRYABLE_CODES
        return AdapterError(f"{what} failed: S3 answered {status} {e.code}: {e.message}", retryable=retryable)
    if isinstance(e, MinioException):
        status = _status(e)
        retryable = status is None or status >= 500 or status in (408, 429)
        return AdapterError(f"{what} failed: {e}", retryable=retryable)
    if isinstance(e, (urllib3.exceptions.HTTPError, OSError)):
        reason = getattr(e, "reason", None) or e
        return AdapterError(f"{what} failed: S3 unreachable: {reason.__class__.__name__}: {reason}", retryable=True)
    return AdapterError(f"{what} failed: {e.__class__.__name__}: {e}", retryable=False)


def _pool(timeout: float, retries: Retry | bool) -> urllib3.PoolManager:
    return urllib3.PoolManager(
        timeout=Timeout(connect=timeout, read=timeout),
        maxsize=POOL_SIZE,
        retries=retries,
        # TLS as the SDK's own client does it: verified, against SSL_CERT_FILE (a private CA) or certifi's bundle.
        cert_reqs="CERT_REQUIRED",
        ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
    )


class S3Chunks(Iterator[bytes]):
    """The body of a GET in chunks, read from the socket as they are asked for. The response is closed and its
    connection released when exhausted, when closed early (WSGI servers call close(), also when the client goes
    away), when reading fails, or when garbage-collected."""

    def __init__(self, response: urllib3.BaseHTTPResponse, chunk_size: int, what: str):
        self._response: urllib3.BaseHTTPResponse | None = response
        self._chunks = response.stream(chunk_size, decode_content=False)
        self._what = what

    @property
    def closed(self) -> bool:
        return self._response is None

    def __iter__(self) -> "S3Chunks":
        return self

    def __next__(self) -> bytes:
        if self._response is None:
            raise StopIteration
        try:
            return next(self._chunks)
        except StopIteration:
            self.close()
            raise
        except (urllib3.exceptions.HTTPError, OSError) as e:
            self.close()
            raise _failure(f"reading {self._what}", e) from e

    def close(self) -> None:
        response, self._response = self._response, None
        if response is None:
            return
        try:
            # A partly read body cannot be reused: close() drops the socket, release_conn() gives the slot back.
            response.close()
        finally:
            response.release_conn()

    def __enter__(self) -> "S3Chunks":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # never raise from a finalizer
            pass


class S3ObjectStore(ObjectStore):
    def __init__(
        self,
        endpoint: str,
        *,
        access_key: str | None,
        secret_key: str | None,
        secure: bool,
        region: str | None,
        timeout: float,
        bucket: str | None = None,
    ):
        """`endpoint` is `host:port`; an `http://` or `https://` prefix is accepted and then decides `secure`.
        `bucket`: keep every model in this one bucket (under `<modelname>/`) instead of one bucket per model."""
        if bucket:
            check_s3_bucket(bucket, what="TM_S3_BUCKET")
        self.bucket = bucket or None
        endpoint = (endpoint or "").strip()
        for scheme, is_secure in (("https://", True), ("http://", False)):
            if endpoint.lower().startswith(scheme):
                endpoint, secure = endpoint[len(scheme):].rstrip("/"), is_secure
        if not endpoint:
            raise ValueError("S3 endpoint is empty: expected host:port")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.endpoint = endpoint
        self.timeout = float(timeout)
        self._http = _pool(
            self.timeout,
            Retry(
                total=MAX_RETRIES,
                backoff_factor=BACKOFF_FACTOR,
                backoff_max=BACKOFF_MAX,
                status_forcelist=RETRY_STATUSES,
                raise_on_status=False,  # the last 5xx answer reaches the SDK, which reports the server's message
                respect_retry_after_header=False,  # a Retry-After of minutes must not stall a request
            ),
        )
        # Readiness probes are repeated by whoever asks: one attempt, no retries.
        self._probe_http = _pool(self.timeout, Retry(total=0, raise_on_status=False))
        if bool(access_key) != bool(secret_key):
            raise ValueError("the S3 access key and secret key go together: set both or neither")
        credentials = dict(access_key=access_key or None, secret_key=secret_key or None)
        try:
            self._client = Minio(endpoint, secure=secure, region=region or None, http_client=self._http, **credentials)
            self._probe = Minio(endpoint, secure=secure, region=region or None, http_client=self._probe_http,
                                **credentials)
        except ValueError as e:
            raise ValueError(f"invalid S3 endpoint {endpoint!r}: {e}") from e

    # ------------------------------------------------------------------ ObjectStore
    def check_model_name(self, modelname: str) -> None:
        if self.bucket:
            check_bucket(modelname)  # it becomes the first segment of the key
        else:
            check_s3_bucket(modelname)

    def _locate(self, model_bucket: str, key: str) -> tuple[str, str]:
        """Where the store's (bucket, key) of a model lives in S3, by the configured layout."""
        self.check_model_name(model_bucket)
        check_key(key)
        if self.bucket:
            return self.bucket, f"{model_bucket}/{key}"
        return model_bucket, key

    def put_file(self, bucket: str, key: str, path: Path) -> None:
        bucket, key = self._locate(bucket, key)
        source = Path(path)
        if not source.is_file():
            raise AdapterError(f"cannot store {source.name!r}: not a file", retryable=False)
        what = f"storing {bucket}/{key}"
        self._call(what, lambda: self._ensure_bucket(bucket))
        content_type = mimetypes.guess_type(key)[0] or mimetypes.guess_type(source.name)[0]
        # fput_object switches to a multipart upload (5 MiB parts, at most 3 in flight) for big files.
        self._call(what, lambda: self._client.fput_object(
            bucket, key, str(source), content_type=content_type or "application/octet-stream"
        ))

    def size(self, bucket: str, key: str) -> int | None:
        bucket, key = self._locate(bucket, key)
        try:
            info = self._call(f"looking up {bucket}/{key}", lambda: self._client.stat_object(bucket, key),
                              missing=f"{bucket}/{key}")
        except ObjectNotFound:
            return None
        return info.size

    def stream(self, bucket: str, key: str, chunk_size: int = 1 << 20) -> S3Chunks:
        if chunk_size < 1:
            raise ValueError("chunk_size must be positive")
        bucket, key = self._locate(bucket, key)
        what = f"{bucket}/{key}"
        # Asked now, not at the first chunk: a missing object is an error the caller sees before answering 200.
        response = self._call(f"reading {what}", lambda: self._client.get_object(bucket, key), missing=what)
        return S3Chunks(response, chunk_size, what)

    def uri(self, bucket: str, key: str) -> str:
        bucket, key = self._locate(bucket, key)
        return f"s3://{bucket}/{key}"

    def delete(self, bucket: str, key: str) -> None:
        bucket, key = self._locate(bucket, key)
        try:
            self._call(f"deleting {bucket}/{key}", lambda: self._client.remove_object(bucket, key),
                       missing=f"{bucket}/{key}")
        except ObjectNotFound:
            return  # no bucket: nothing to delete (a missing key is no error in S3 either)

    def ready(self) -> bool:
        """The server answers S3 requests (one attempt within the timeout). Any answer but a 5xx counts: wrong
        credentials or missing rights show up as non-retryable errors of the calls that need them."""
        try:
            self._probe.bucket_exists(PROBE_BUCKET)
        except MinioException as e:
            status = _status(e)
            return status is not None and status < 500
        except (urllib3.exceptions.HTTPError, OSError):
            return False
        return True

    # ------------------------------------------------------------------ helpers
    def _ensure_bucket(self, bucket: str) -> None:
        if self._client.bucket_exists(bucket):
            return
        try:
            self._client.make_bucket(bucket)
        except S3Error as e:
            if e.code not in _ALREADY_EXISTS:  # someone created it meanwhile: fine
                raise

    @staticmethod
    def _call(what: str, call: Callable[[], T], *, missing: str | None = None) -> T:
        """Run one SDK call; its failures as AdapterError, or ObjectNotFound when `missing` (the object's name) is
        given and the bucket or the object does not exist."""
        try:
            return call()
        except S3Error as e:
            if missing is not None and e.code in _MISSING:
                raise ObjectNotFound(f"no object {missing}") from e
            raise _failure(what, e) from e
        except (MinioException, urllib3.exceptions.HTTPError, OSError) as e:
            raise _failure(what, e) from e
