"""The outside world, one interface per kind of peer. Each has an embedded and a real implementation,
chosen by configuration in one place (the Container). Services talk only to these interfaces.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Mapping


class AdapterError(Exception):
    """A peer failed. `retryable` says whether trying again later may help (outage, timeout) or not (bad input);
    `unreachable` that the peer could not be reached at all (connection refused, unknown host): a data source in
    that state fails the job after TM_SOURCE_UNREACHABLE_TIMEOUT rather than at the step's deadline."""

    def __init__(self, message: str, *, retryable: bool = False, unreachable: bool = False):
        super().__init__(message)
        self.retryable = retryable or unreachable
        self.unreachable = unreachable


# ------------------------------------------------------------------------------------------- data extraction
@dataclass(frozen=True)
class ExtractionRequest:
    trainingjob_id: int
    featurepath: str  # "<featuregroup>_<jobid>": the dataset's name
    datalake_source: str  # InfluxSource | CsvSource | ParquetSource
    feature_list: list[str]
    query_filter: str
    # The feature group's connection: host, port, bucket, db_org, measurement, token (clear), source_name.
    source: Mapping[str, str]


@dataclass(frozen=True)
class ExtractionStatus:
    state: str  # "IN_PROGRESS" | "COMPLETED" | "FAILED"
    dataset_uri: str | None = None  # where the pipeline finds the dataset (set when COMPLETED)
    rows: int | None = None
    error: str | None = None


class DataExtractor(abc.ABC):
    @abc.abstractmethod
    def start(self, request: ExtractionRequest) -> ExtractionStatus:
        """Start (or, embedded, do) the extraction. Raises AdapterError."""

    @abc.abstractmethod
    def status(self, request: ExtractionRequest) -> ExtractionStatus:
        """Where the extraction of this request stands now."""

    @abc.abstractmethod
    def remove(self, featurepath: str) -> None:
        """Forget the dataset (the job was deleted)."""

    def ready(self) -> bool:
        return True


# ------------------------------------------------------------------------------------------- object store
class ObjectStore(abc.ABC):
    """Models are addressed as bucket <modelname>, key <modelversion>/<artifactversion>/Model.zip (the reference's
    layout); a store may keep them elsewhere (S3 with TM_S3_BUCKET), but callers always use these names."""

    @abc.abstractmethod
    def check_model_name(self, modelname: str) -> None:
        """Raise an AdapterError (not retryable) saying the rule when this store cannot hold models of this name."""

    @abc.abstractmethod
    def put_file(self, bucket: str, key: str, path: Path) -> None: ...

    @abc.abstractmethod
    def size(self, bucket: str, key: str) -> int | None:
        """Bytes of the object, or None when it does not exist."""

    @abc.abstractmethod
    def stream(self, bucket: str, key: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        """The object's bytes in chunks, never the whole object in memory."""

    @abc.abstractmethod
    def delete(self, bucket: str, key: str) -> None: ...

    @abc.abstractmethod
    def uri(self, bucket: str, key: str) -> str:
        """Where a pipeline can read the object: a local path, or s3://bucket/key."""

    def ready(self) -> bool:
        return True


# ------------------------------------------------------------------------------------------- pipeline engine
@dataclass(frozen=True)
class RunStatus:
    state: str  # "RUNNING" | "SUCCEEDED" | "FAILED"
    error: str | None = None
    model_path: str | None = None  # the trained model (file or folder) on this machine, when SUCCEEDED
    metrics: dict[str, Any] = field(default_factory=dict)
    # When the run ended, by the engine's record (not when we looked); None while running or when unknown.
    ended_at: datetime | None = field(default=None, compare=False)


@dataclass(frozen=True)
class RunLog:
    """Part of a run's output: `data` read from a byte offset, and how many bytes the output holds now."""

    data: bytes
    size: int


class PipelineEngine(abc.ABC):
    # How often the worker asks about a running run: a local file check is cheap, a remote call is not.
    watch_interval: float = 0.1
    @abc.abstractmethod
    def register_version(self, pipeline_name: str, version: int, file_path: Path, description: str) -> str | None:
        """Tell the engine about a new pipeline version; returns the engine's id for it (None: nothing to do)."""

    @abc.abstractmethod
    def start_run(self, run_id: str, file_path: Path, engine_ref: str | None, parameters: dict[str, str]) -> str:
        """Start a run; returns the engine's run id."""

    @abc.abstractmethod
    def run_status(self, run_id: str) -> RunStatus: ...

    @abc.abstractmethod
    def terminate(self, run_id: str) -> None: ...

    @abc.abstractmethod
    def cleanup(self, run_id: str) -> None:
        """Remove what the run left on this machine."""

    @abc.abstractmethod
    def capacity_left(self) -> int:
        """How many more runs may start now."""

    @abc.abstractmethod
    def run_log(self, run_id: str, offset: int, limit: int) -> RunLog:
        """The run's output (it only grows) from byte `offset` on, at most `limit` bytes. AdapterError
        (not retryable) for a run the engine does not know (never started, or cleaned up)."""

    def ready(self) -> bool:
        return True

    def start_warm_runner(self) -> None:
        """Get ready to start runs fast (the local engine's fork server); nothing to do for most engines."""

    def stop_warm_runner(self) -> None:
        """Stop what start_warm_runner started; the runs it started go on."""

    def listen_for_run_ends(self, listener: Callable[[str], None] | None) -> None:
        """An engine that learns of a run's end as it happens calls listener(run_id) then, so the run is looked at
        at once; the others are only looked at every watch_interval (the default: nothing to do). None: stop."""


# ------------------------------------------------------------------------------------------- notifier
class Notifier(abc.ABC):
    @abc.abstractmethod
    def send(self, url: str, body: Any, delivery_id: str) -> bool:
        """POST body to url once (bounded time). True when the receiver answered 200."""


# ------------------------------------------------------------------------------------------- identity
# The roles of the API, each including the ones before it: a writer may read, an admin may do anything.
READER, WRITER, ADMIN = "reader", "writer", "admin"
ROLES = (READER, WRITER, ADMIN)


@dataclass(frozen=True)
class Principal:
    """Who sent a request: a token's name or a JWT's `sub`, and the roles its credential carries."""

    name: str
    roles: frozenset[str]

    def may(self, role: str) -> bool:
        """True when one of the principal's roles includes `role`."""
        needed = ROLES.index(role)
        return any(ROLES.index(r) >= needed for r in self.roles)


class InvalidCredentials(Exception):
    """The credential is not one this service accepts (unknown, expired, badly signed ...). The message says why,
    for the log and the answer; it never quotes the credential."""


class IdentityProviderUnavailable(Exception):
    """The credential cannot be checked now (the identity provider's keys cannot be fetched): try again later."""


class Authenticator(abc.ABC):
    """Turns the credential of an `Authorization: Bearer` header into a Principal."""

    @abc.abstractmethod
    def authenticate(self, credential: str) -> Principal:
        """The principal of `credential`; InvalidCredentials or IdentityProviderUnavailable otherwise."""


class RoleMap:
    """Maps the role names credentials carry (a token file's roles, a JWT's role claim) to the API's roles. Without
    TM_AUTH_ROLE_MAP each API role name maps to itself; TM_AUTH_ROLE_MAP (`NAME=ROLE` pairs, e.g.
    `tm-reader=reader,tm-admin=admin`) replaces that, so that only the names it lists count: a realm role that
    happens to be called `admin` grants nothing unless the map says so."""

    def __init__(self, spec: str = ""):
        self.names: dict[str, str] = {}
        for pair in (p.strip() for p in spec.split(",")):
            if not pair:
                continue
            external, sep, role = (part.strip() for part in pair.partition("="))
            if not sep or not external or role not in ROLES:
                raise ValueError(f"TM_AUTH_ROLE_MAP: {pair!r} is not NAME=ROLE with ROLE one of {', '.join(ROLES)}")
            if external in self.names:
                raise ValueError(f"TM_AUTH_ROLE_MAP: {external!r} is mapped twice")
            self.names[external] = role
        if not self.names:
            self.names = {role: role for role in ROLES}

    def roles_of(self, names: Any) -> frozenset[str]:
        """The API roles of an iterable of role names; names this map does not know are ignored."""
        return frozenset(self.names[n] for n in names if isinstance(n, str) and n in self.names)
