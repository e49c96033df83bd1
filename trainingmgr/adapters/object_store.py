"""The embedded object store: a folder, `<root>/<bucket>/<key>`, with the reference's layout (bucket = model name,
key = `<modelversion>/<artifactversion>/Model.zip`).

Bucket and key come (indirectly) from URLs, so they are validated strictly before they touch a path: a name that
could climb out of the root, or mean something else once decoded, is an InvalidObjectName (a 4xx for the HTTP
layer), never a file access.
"""
from __future__ import annotations

import os
import re
import shutil
import stat
import uuid
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Iterator

from .base import AdapterError, ObjectStore

MODEL_OBJECT = "Model.zip"
BUCKET_PATTERN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}")
SEGMENT_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,255}")
MAX_KEY_LENGTH = 1024
_COPY_CHUNK = 1 << 20
_PUT_ATTEMPTS = 3  # a concurrent delete may remove the folder we just created; try again, a bounded number of times


class InvalidObjectName(AdapterError):
    """A bucket or key the store refuses: the caller's input is wrong (4xx), retrying cannot help."""

    def __init__(self, message: str):
        super().__init__(message, retryable=False)


class ObjectNotFound(AdapterError):
    """The object does not exist (404 for the HTTP layer)."""

    def __init__(self, message: str):
        super().__init__(message, retryable=False)


def check_bucket(bucket: str) -> None:
    if not isinstance(bucket, str) or not BUCKET_PATTERN.fullmatch(bucket):
        raise InvalidObjectName(
            f"invalid bucket {bucket!r}: 1 to 128 letters, digits, '_', '-' or '.', not starting with '.'"
        )


_S3_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_IPV4 = re.compile(r"\d{1,3}(\.\d{1,3}){3}")
_RESERVED_PREFIXES = ("xn--", "sthree-", "amzn-s3-demo-")
_RESERVED_SUFFIXES = ("-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3")


def check_s3_bucket(bucket: str, *, what: str = "") -> None:
    """Our bucket rule, then S3's: 3 to 63 lowercase letters, digits, '-' or '.', no IP address, no reserved forms.
    `what` names the setting when the bucket is one (TM_S3_BUCKET); otherwise it is a model's bucket."""
    check_bucket(bucket)
    problem = None
    if not _S3_BUCKET.fullmatch(bucket):
        problem = "3 to 63 lowercase letters, digits, '-' or '.', starting and ending with a letter or digit"
    elif any(pair in bucket for pair in ("..", ".-", "-.")):
        problem = "no '..', '.-' or '-.'"
    elif _IPV4.fullmatch(bucket):
        problem = "not an IP address"
    elif bucket.startswith(_RESERVED_PREFIXES) or bucket.endswith(_RESERVED_SUFFIXES):
        problem = "not a name S3 reserves"
    if problem:
        if what:
            raise InvalidObjectName(f"{what} {bucket!r} is not a valid S3 bucket name: {problem}")
        raise InvalidObjectName(
            f"model name {bucket!r} cannot be an S3 bucket (the model's bucket is named after the model; set "
            f"TM_S3_BUCKET to keep every model in one bucket): {problem}"
        )


def check_key(key: str) -> list[str]:
    """The key's segments, or InvalidObjectName. Only plain names: no '.', '..', empty segments or encodings."""
    rule = "'/'-separated names of letters, digits, '_', '-' or '.', none of them '.' or '..'"
    if not isinstance(key, str) or not key or len(key) > MAX_KEY_LENGTH:
        raise InvalidObjectName(f"invalid key {key!r}: 1 to {MAX_KEY_LENGTH} characters of {rule}")
    segments = key.split("/")
    for segment in segments:
        if segment in (".", "..") or not SEGMENT_PATTERN.fullmatch(segment):
            raise InvalidObjectName(f"invalid key {key!r}: {rule}")
    return segments


def model_key(modelversion: str, artifactversion: str) -> str:
    """Where a trained model lives in its bucket (the reference's pipelines use the same layout)."""
    for part in (modelversion, artifactversion):
        # Each part must be one segment: a '/' inside would silently change the layout.
        if not isinstance(part, str) or part in (".", "..") or not SEGMENT_PATTERN.fullmatch(part):
            raise InvalidObjectName(f"invalid model or artifact version {part!r}")
    return f"{modelversion}/{artifactversion}/{MODEL_OBJECT}"


class FileChunks(Iterator[bytes]):
    """The bytes of an open file in chunks. Closes the file when exhausted, when closed early (WSGI servers call
    close() on a response's iterable, also when the client goes away) or when garbage-collected."""

    def __init__(self, file: BinaryIO, chunk_size: int):
        self._file = file
        self._chunk_size = chunk_size

    @property
    def closed(self) -> bool:
        return self._file.closed

    def __iter__(self) -> "FileChunks":
        return self

    def __next__(self) -> bytes:
        if self._file.closed:
            raise StopIteration
        chunk = self._file.read(self._chunk_size)
        if not chunk:
            self.close()
            raise StopIteration
        return chunk

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "FileChunks":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def __del__(self) -> None:
        self._file.close()


class LocalObjectStore(ObjectStore):
    def __init__(self, root: Path):
        self.root = Path(root)

    def uri(self, bucket: str, key: str) -> str:
        return str(self._path(bucket, key))

    def _path(self, bucket: str, key: str) -> Path:
        check_bucket(bucket)
        return self.root.joinpath(bucket, *check_key(key))

    # ------------------------------------------------------------------ ObjectStore
    def check_model_name(self, modelname: str) -> None:
        check_bucket(modelname)

    def put_file(self, bucket: str, key: str, path: Path) -> None:
        target = self._path(bucket, key)
        source = Path(path)
        if not source.is_file():
            raise AdapterError(f"cannot store {source.name!r}: not a file", retryable=False)
        for attempt in range(_PUT_ATTEMPTS):
            try:
                self._copy(source, target)
                return
            except FileNotFoundError as e:
                if not source.is_file():
                    raise AdapterError(f"cannot store {source.name!r}: it disappeared", retryable=False) from e
                if attempt == _PUT_ATTEMPTS - 1:
                    raise AdapterError(f"storing {bucket}/{key} failed: {e.strerror}", retryable=True) from e
            except OSError as e:
                raise AdapterError(f"storing {bucket}/{key} failed: {e.strerror or e}", retryable=True) from e

    def size(self, bucket: str, key: str) -> int | None:
        target = self._path(bucket, key)
        try:
            info = os.stat(target)
        except (FileNotFoundError, NotADirectoryError):
            return None
        return info.st_size if stat.S_ISREG(info.st_mode) else None

    def stream(self, bucket: str, key: str, chunk_size: int = 1 << 20) -> FileChunks:
        if chunk_size < 1:
            raise ValueError("chunk_size must be positive")
        target = self._path(bucket, key)
        # Opened now, not at the first chunk: a missing object is an error the caller sees before answering 200.
        try:
            file = open(target, "rb")
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as e:
            raise ObjectNotFound(f"no object {bucket}/{key}") from e
        except OSError as e:
            raise AdapterError(f"reading {bucket}/{key} failed: {e.strerror or e}", retryable=True) from e
        if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
            file.close()
            raise ObjectNotFound(f"no object {bucket}/{key}")
        return FileChunks(file, chunk_size)

    def delete(self, bucket: str, key: str) -> None:
        target = self._path(bucket, key)
        if target.is_dir() and not target.is_symlink():
            return  # a key prefix, not an object: nothing to delete, as in S3
        try:
            target.unlink(missing_ok=True)
        except NotADirectoryError:
            return
        except OSError as e:
            raise AdapterError(f"deleting {bucket}/{key} failed: {e.strerror or e}", retryable=True) from e
        # Prune the folders the key left empty; the bucket itself stays (as an S3 bucket would).
        bucket_dir = self.root / bucket
        parent = target.parent
        while parent != bucket_dir:
            try:
                parent.rmdir()
            except OSError:  # not empty (or already gone, or someone is writing there): stop pruning
                break
            parent = parent.parent

    def ready(self) -> bool:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError:
            return False
        return os.access(self.root, os.W_OK | os.X_OK)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _copy(source: Path, target: Path) -> None:
        """Copy into a temporary file beside the target, then rename: a reader sees the old object or the new one."""
        target.parent.mkdir(parents=True, exist_ok=True)
        # Not named after the target: a 255-character key segment plus a suffix would exceed NAME_MAX.
        tmp = target.parent / f".upload-{uuid.uuid4().hex}.tmp"
        try:
            with open(source, "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, _COPY_CHUNK)
                dst.flush()
                os.fsync(dst.fileno())
            os.replace(tmp, target)
        finally:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:  # never mask the error that brought us here
                pass
