"""Settings: every TM_* environment variable, its default and its meaning, in one object.

The README's settings table is the user-facing copy of this file; keep them in step.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class SettingsError(ValueError):
    """A TM_* variable holds a value the service cannot use."""


def _bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise SettingsError(f"{name} must be true or false, not {raw!r}")


def _int(name: str, raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be an integer, not {raw!r}") from None


def _float(name: str, raw: str) -> float:
    try:
        return float(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a number, not {raw!r}") from None


@dataclass(frozen=True)
class Settings:
    # Each field's metadata["env"] names its environment variable and ["doc"] says what it does.
    host: str = field(default="0.0.0.0", metadata={"env": "TM_HOST", "doc": "address to listen on"})
    port: int = field(default=32002, metadata={"env": "TM_PORT", "doc": "port to listen on"})
    # One web process by default: the steps run in a process of their own, so a web process only answers requests
    # (about 1,000 reads/s of one CPU); each more costs about 57 MB.
    workers: int = field(default=1, metadata={"env": "TM_WORKERS", "doc": "gunicorn worker (web) processes"})
    threads: int = field(default=8, metadata={"env": "TM_THREADS", "doc": "threads per gunicorn worker"})
    data_dir: str = field(
        default="data", metadata={"env": "TM_DATA_DIR", "doc": "folder for the SQLite file, key file and local stores"}
    )
    database_url: str = field(
        default="",
        metadata={
            "env": "TM_DATABASE_URL",
            "doc": "SQLAlchemy URL; empty means sqlite:///<TM_DATA_DIR>/trainingmgr.db. "
            "PostgreSQL: postgresql+psycopg2://user:pass@host:5432/db",
        },
    )
    db_pool_size: int = field(default=5, metadata={"env": "TM_DB_POOL_SIZE", "doc": "PostgreSQL pool size per process"})
    db_max_overflow: int = field(
        default=10, metadata={"env": "TM_DB_MAX_OVERFLOW", "doc": "PostgreSQL connections beyond the pool size"}
    )
    db_pool_timeout: int = field(
        default=10, metadata={"env": "TM_DB_POOL_TIMEOUT", "doc": "seconds to wait for a pooled connection"}
    )
    log_level: str = field(default="INFO", metadata={"env": "TM_LOG_LEVEL", "doc": "DEBUG, INFO, WARNING or ERROR"})
    max_body_bytes: int = field(
        default=16 * 1024 * 1024,
        metadata={"env": "TM_MAX_BODY_BYTES", "doc": "largest request body accepted (413 above it)"},
    )
    max_metrics_bytes: int = field(
        default=1024 * 1024,
        metadata={"env": "TM_MAX_METRICS_BYTES", "doc": "largest model-metrics body accepted (413 above it)"},
    )
    max_json_bytes: int = field(
        default=1024 * 1024,
        metadata={
            "env": "TM_MAX_JSON_BYTES",
            "doc": "largest JSON (or URL-encoded form) request body accepted (413 above it); pipeline uploads "
            "(multipart) are bounded by TM_MAX_BODY_BYTES only",
        },
    )
    request_read_timeout: float = field(
        default=30.0,
        metadata={
            "env": "TM_REQUEST_READ_TIMEOUT",
            "doc": "seconds a request may take to arrive in full (head and body); slower ones get 408 and are closed",
        },
    )
    outbound_allow: str = field(
        default="",
        metadata={
            "env": "TM_OUTBOUND_ALLOW",
            "doc": "comma-separated CIDRs and host names clients may make the service call although the default "
            "rules deny them (e.g. 127.0.0.1/32 for a receiver on this machine)",
        },
    )
    outbound_deny: str = field(
        default="",
        metadata={
            "env": "TM_OUTBOUND_DENY",
            "doc": "comma-separated CIDRs and host names clients may never make the service call (beyond the "
            "defaults: loopback, link-local, metadata, unspecified, multicast, reserved)",
        },
    )
    cors_origins: str = field(
        default="*",
        metadata={
            "env": "TM_CORS_ORIGINS",
            "doc": "origins browsers may call the API from: * (any, as the framework deploys it), a comma-separated "
            "list (e.g. http://dashboard.smo:32005), or empty (CORS off)",
        },
    )
    secret_key: str = field(
        default="",
        metadata={
            "env": "TM_SECRET_KEY",
            "doc": "key(s) encrypting feature-group tokens at rest, comma-separated (first encrypts, all decrypt); "
            "empty means a key generated once into <TM_DATA_DIR>/secret.key",
        },
    )

    max_event_streams: int = field(
        default=256,
        metadata={
            "env": "TM_MAX_EVENT_STREAMS",
            "doc": "open event streams (GET .../v1/events) and followed run logs per server process; more are "
            "answered 503. Under serve "
            "a stream holds no request thread",
        },
    )
    run_log_max_bytes: int = field(
        default=1024 * 1024,
        metadata={
            "env": "TM_RUN_LOG_MAX_BYTES",
            "doc": "how much of a pipeline run's output is kept with its job when the run ends (its last bytes); "
            "served at GET .../training-jobs/{id}/logs",
        },
    )
    auth: str = field(
        default="none",
        metadata={
            "env": "TM_AUTH",
            "doc": "who may call the API: none (anyone, as the framework's clients expect), token (static API tokens "
            "from TM_AUTH_TOKENS_FILE) or oidc (JWTs of TM_OIDC_ISSUER); see Securing the service",
        },
    )
    auth_tokens_file: str = field(
        default="",
        metadata={
            "env": "TM_AUTH_TOKENS_FILE",
            "doc": "TM_AUTH=token: the file of `NAME ROLE SHA256` lines (`trainingmgr auth add-token` writes it; "
            "reread when it changes); empty means <TM_DATA_DIR>/api-tokens",
        },
    )
    auth_role_map: str = field(
        default="",
        metadata={
            "env": "TM_AUTH_ROLE_MAP",
            "doc": "comma-separated NAME=ROLE pairs mapping the role names of tokens and JWT claims to the API's "
            "roles reader, writer and admin, e.g. tm-admin=admin; only the names listed count. Empty: each of "
            "reader, writer, admin maps to itself",
        },
    )
    oidc_issuer: str = field(
        default="",
        metadata={
            "env": "TM_OIDC_ISSUER",
            "doc": "TM_AUTH=oidc: the issuer URL tokens must name in `iss` (Keycloak: https://HOST/realms/REALM)",
        },
    )
    oidc_audience: str = field(
        default="", metadata={"env": "TM_OIDC_AUDIENCE", "doc": "TM_AUTH=oidc: the audience tokens must name in `aud`"}
    )
    oidc_jwks_url: str = field(
        default="",
        metadata={
            "env": "TM_OIDC_JWKS_URL",
            "doc": "TM_AUTH=oidc: where the issuer's signing keys are; empty means the jwks_uri of "
            "<TM_OIDC_ISSUER>/.well-known/openid-configuration",
        },
    )
    oidc_roles_claim: str = field(
        default="realm_access.roles",
        metadata={
            "env": "TM_OIDC_ROLES_CLAIM",
            "doc": "TM_AUTH=oidc: the claim (a dotted path) holding the caller's role names, e.g. "
            "resource_access.trainingmgr.roles for Keycloak client roles",
        },
    )
    metrics_auth: bool = field(
        default=False,
        metadata={"env": "TM_METRICS_AUTH", "doc": "true: /metrics needs a reader credential like any read"},
    )
    callback_auth: str = field(
        default="none",
        metadata={
            "env": "TM_CALLBACK_AUTH",
            "doc": "none: the data-extraction and pipeline callbacks need no credential (the framework's senders "
            "have none; a callback only wakes the job up); role: they need a writer credential like any write",
        },
    )
    callback_allowed_networks: str = field(
        default="",
        metadata={
            "env": "TM_CALLBACK_ALLOWED_NETWORKS",
            "doc": "comma-separated CIDRs the callbacks are accepted from (403 from elsewhere); empty means any",
        },
    )

    advertised_url: str = field(
        default="",
        metadata={
            "env": "TM_ADVERTISED_URL",
            "doc": "base URL clients reach the service at, used in model_url; empty means http://<hostname>:<TM_PORT>",
        },
    )
    pipeline_engine: str = field(
        default="local",
        metadata={"env": "TM_PIPELINE_ENGINE", "doc": "local (kfp.local, runs in subprocesses) or kfp (a KFP server)"},
    )
    max_concurrent_runs: int = field(
        default=4, metadata={"env": "TM_MAX_CONCURRENT_RUNS", "doc": "pipeline runs at once (local engine)"}
    )
    object_store: str = field(
        default="local", metadata={"env": "TM_OBJECT_STORE", "doc": "local (<TM_DATA_DIR>/models) or s3 (MinIO)"}
    )
    data_extraction: str = field(
        default="embedded",
        metadata={"env": "TM_DATA_EXTRACTION", "doc": "embedded (in-process reader) or remote (data-extraction service)"},
    )
    file_source_dirs: str = field(
        default="",
        metadata={
            "env": "TM_FILE_SOURCE_DIRS",
            "doc": "folders (separated by ':') that CsvSource/ParquetSource feature groups may read from; "
            "empty means <TM_DATA_DIR>/sources and the bundled examples/data",
        },
    )
    extraction_deadline: int = field(
        default=3600, metadata={"env": "TM_EXTRACTION_DEADLINE", "doc": "seconds data extraction may take"}
    )
    source_unreachable_timeout: int = field(
        default=300,
        metadata={
            "env": "TM_SOURCE_UNREACHABLE_TIMEOUT",
            "doc": "seconds data extraction keeps retrying a source (InfluxDB, the data-extraction service) that "
            "cannot be reached (connection refused, unknown host) before the job fails",
        },
    )
    training_deadline: int = field(
        default=86400, metadata={"env": "TM_TRAINING_DEADLINE", "doc": "seconds a pipeline run may take"}
    )
    embedded_worker: bool = field(
        default=True,
        metadata={
            "env": "TM_EMBEDDED_WORKER",
            "doc": "`serve` keeps one step runner process (restarted if it ends; /readyz is 503 while none is "
            "alive); false when separate `trainingmgr worker` processes run the steps",
        },
    )
    worker_threads: int = field(default=4, metadata={"env": "TM_WORKER_THREADS", "doc": "threads per worker"})
    worker_poll_seconds: float = field(
        default=0.5,
        metadata={"env": "TM_WORKER_POLL_SECONDS",
                  "doc": "shortest wait of an idle worker between two looks for work; with an in-memory SQLite "
                  "database (no wake-up between processes), how often it looks"},
    )
    worker_idle_poll_seconds: float = field(
        default=30.0,
        metadata={"env": "TM_WORKER_IDLE_POLL_SECONDS",
                  "doc": "idle workers are woken when work is queued (LISTEN/NOTIFY on PostgreSQL, a pipe beside "
                  "an SQLite file); how long they wait at most before they look anyway"},
    )
    lease_seconds: int = field(
        default=60, metadata={"env": "TM_LEASE_SECONDS", "doc": "a claimed step returns to the queue after this long"}
    )
    notify_timeout: float = field(
        default=5.0, metadata={"env": "TM_NOTIFY_TIMEOUT", "doc": "seconds one rApp notification may take"}
    )
    notify_attempts: int = field(
        default=5, metadata={"env": "TM_NOTIFY_ATTEMPTS", "doc": "tries of each rApp notification (backoff between)"}
    )
    notify_threads: int = field(
        default=2,
        metadata={
            "env": "TM_NOTIFY_THREADS",
            "doc": "threads per worker that deliver rApp notifications, apart from the step threads, so receivers "
            "that hang delay only notifications",
        },
    )
    notify_hmac_key: str = field(
        default="",
        metadata={"env": "TM_NOTIFY_HMAC_KEY", "doc": "when set, notifications carry X-TM-Signature: sha256=<hmac>"},
    )

    s3_endpoint: str = field(
        default="", metadata={"env": "TM_S3_ENDPOINT", "doc": "MinIO/S3 host:port (TM_OBJECT_STORE=s3)"}
    )
    s3_access_key: str = field(default="", metadata={"env": "TM_S3_ACCESS_KEY", "doc": "S3 access key"})
    s3_secret_key: str = field(default="", metadata={"env": "TM_S3_SECRET_KEY", "doc": "S3 secret key"})
    s3_secure: bool = field(default=False, metadata={"env": "TM_S3_SECURE", "doc": "use TLS to reach S3"})
    s3_region: str = field(default="", metadata={"env": "TM_S3_REGION", "doc": "S3 region; empty lets the SDK ask"})
    s3_bucket: str = field(
        default="",
        metadata={
            "env": "TM_S3_BUCKET",
            "doc": "one bucket for every model, keys <modelname>/<modelversion>/<artifactversion>/Model.zip (holds "
            "any model name); empty means the reference's layout, a bucket per model (names must be S3 bucket names)",
        },
    )
    kfp_host: str = field(
        default="", metadata={"env": "TM_KFP_HOST", "doc": "Kubeflow Pipelines API URL (TM_PIPELINE_ENGINE=kfp)"}
    )
    kfp_token: str = field(default="", metadata={"env": "TM_KFP_TOKEN", "doc": "bearer token for the KFP API"})
    data_extraction_url: str = field(
        default="",
        metadata={"env": "TM_DATA_EXTRACTION_URL", "doc": "data-extraction service URL (TM_DATA_EXTRACTION=remote)"},
    )
    http_timeout: float = field(
        default=10.0, metadata={"env": "TM_HTTP_TIMEOUT", "doc": "seconds for one call to a peer service"}
    )

    dme_topic: str = field(
        default="pmreports", metadata={"env": "TM_DME_TOPIC", "doc": "Kafka topic named in DME information jobs"}
    )
    dme_bootstrap_servers: str = field(
        default="kafka-1-kafka-bootstrap.nonrtric:9097",
        metadata={"env": "TM_DME_BOOTSTRAP_SERVERS", "doc": "Kafka bootstrap servers named in DME information jobs"},
    )

    mme_url: str = field(
        default="",
        metadata={"env": "TM_MME_URL", "doc": "Model Management Service URL; empty means models are kept in our table"},
    )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> "Settings":
        """Read every TM_* variable; keyword overrides win (tests use them)."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            env_name = f.metadata["env"]
            if env_name not in environ:
                continue
            raw = environ[env_name]
            if f.type == "int":
                values[f.name] = _int(env_name, raw)
            elif f.type == "float":
                values[f.name] = _float(env_name, raw)
            elif f.type == "bool":
                values[f.name] = _bool(env_name, raw)
            else:
                values[f.name] = raw
        values.update(overrides)
        settings = cls(**values)
        settings.validate()
        return settings

    def replace(self, **changes: Any) -> "Settings":
        return dataclasses.replace(self, **changes)

    def validate(self) -> None:
        if not 0 < self.port < 65536:
            raise SettingsError(f"TM_PORT must be between 1 and 65535, not {self.port}")
        if self.workers < 1 or self.threads < 1:
            raise SettingsError("TM_WORKERS and TM_THREADS must be at least 1")
        if self.max_body_bytes < 1024:
            raise SettingsError("TM_MAX_BODY_BYTES must be at least 1024")
        from .adapters.outbound import OutboundPolicy  # the rules' parser only: no network, no SDK

        try:
            OutboundPolicy(self.outbound_allow, self.outbound_deny)
        except ValueError as e:
            raise SettingsError(str(e)) from None
        if self.max_metrics_bytes < 1024:
            raise SettingsError("TM_MAX_METRICS_BYTES must be at least 1024")
        if self.max_json_bytes < 1024:
            raise SettingsError("TM_MAX_JSON_BYTES must be at least 1024")
        if not 0 < self.request_read_timeout <= 3600:
            raise SettingsError("TM_REQUEST_READ_TIMEOUT must be between 0 and 3600 seconds")
        for name, value, choices in (
            ("TM_PIPELINE_ENGINE", self.pipeline_engine, ("local", "kfp")),
            ("TM_OBJECT_STORE", self.object_store, ("local", "s3")),
            ("TM_DATA_EXTRACTION", self.data_extraction, ("embedded", "remote")),
        ):
            if value not in choices:
                raise SettingsError(f"{name} must be one of {', '.join(choices)}, not {value!r}")
        for name, chosen, needed in (
            ("TM_S3_ENDPOINT", self.object_store == "s3", self.s3_endpoint),
            ("TM_KFP_HOST", self.pipeline_engine == "kfp", self.kfp_host),
            ("TM_DATA_EXTRACTION_URL", self.data_extraction == "remote", self.data_extraction_url),
        ):
            if chosen and not needed:
                raise SettingsError(f"{name} must be set for the component chosen")
        if self.s3_bucket:
            from .adapters.object_store import InvalidObjectName, check_s3_bucket  # name rules only, no SDK

            try:
                check_s3_bucket(self.s3_bucket, what="TM_S3_BUCKET")
            except InvalidObjectName as e:
                raise SettingsError(str(e)) from None
        if self.pipeline_engine == "kfp" and (self.object_store != "s3" or self.data_extraction != "remote"):
            # Pods of a cluster cannot read this machine's folders: the dataset and the model must be shared.
            raise SettingsError("TM_PIPELINE_ENGINE=kfp needs TM_OBJECT_STORE=s3 and TM_DATA_EXTRACTION=remote")
        if self.source_unreachable_timeout < 0:
            raise SettingsError("TM_SOURCE_UNREACHABLE_TIMEOUT must not be negative")
        if self.worker_poll_seconds <= 0 or self.worker_idle_poll_seconds < 1:
            raise SettingsError("TM_WORKER_POLL_SECONDS must be positive and TM_WORKER_IDLE_POLL_SECONDS at least 1")
        if self.max_event_streams < 1:
            raise SettingsError("TM_MAX_EVENT_STREAMS must be at least 1")
        if not 4096 <= self.run_log_max_bytes <= 64 * 1024 * 1024:
            raise SettingsError("TM_RUN_LOG_MAX_BYTES must be between 4096 and 67108864 (64 MiB)")
        if self.max_concurrent_runs < 1 or self.worker_threads < 1 or self.notify_threads < 1:
            raise SettingsError("TM_MAX_CONCURRENT_RUNS, TM_WORKER_THREADS and TM_NOTIFY_THREADS must be at least 1")
        self._validate_auth()
        if self.log_level.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise SettingsError(f"TM_LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR, not {self.log_level!r}")

    def _validate_auth(self) -> None:
        if self.auth not in ("none", "token", "oidc"):
            raise SettingsError(f"TM_AUTH must be one of none, token, oidc, not {self.auth!r}")
        if self.callback_auth not in ("none", "role"):
            raise SettingsError(f"TM_CALLBACK_AUTH must be none or role, not {self.callback_auth!r}")
        if self.callback_auth == "role" and self.auth == "none":
            raise SettingsError("TM_CALLBACK_AUTH=role needs TM_AUTH=token or oidc (there is no credential to ask for)")
        if self.metrics_auth and self.auth == "none":
            raise SettingsError("TM_METRICS_AUTH=true needs TM_AUTH=token or oidc (there is no credential to ask for)")
        if self.auth == "oidc":
            if not self.oidc_issuer.startswith(("https://", "http://")):
                raise SettingsError("TM_AUTH=oidc needs TM_OIDC_ISSUER, an http(s) URL")
            if not self.oidc_audience:
                raise SettingsError("TM_AUTH=oidc needs TM_OIDC_AUDIENCE")
            if self.oidc_jwks_url and not self.oidc_jwks_url.startswith(("https://", "http://")):
                raise SettingsError("TM_OIDC_JWKS_URL must be an http(s) URL")
        try:
            self.role_map  # noqa: B018 - parsed to validate
        except ValueError as e:
            raise SettingsError(str(e)) from None
        try:
            self.callback_networks  # noqa: B018 - parsed to validate
        except ValueError as e:
            raise SettingsError(f"TM_CALLBACK_ALLOWED_NETWORKS: {e}") from None

    @cached_property
    def role_map(self) -> Any:
        """TM_AUTH_ROLE_MAP parsed (a RoleMap)."""
        from .adapters.base import RoleMap  # parsing only

        return RoleMap(self.auth_role_map)

    @cached_property
    def callback_networks(self) -> list[Any]:
        """TM_CALLBACK_ALLOWED_NETWORKS as ip_network objects (empty: any address)."""
        import ipaddress

        return [ipaddress.ip_network(n.strip(), strict=False)
                for n in self.callback_allowed_networks.split(",") if n.strip()]

    @property
    def tokens_path(self) -> Path:
        return Path(self.auth_tokens_file) if self.auth_tokens_file else self.data_path / "api-tokens"

    @cached_property  # resolved once: services built per request use it
    def data_path(self) -> Path:
        return Path(self.data_dir).resolve()

    @property
    def sqlalchemy_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_path / 'trainingmgr.db'}"

    @property
    def is_sqlite(self) -> bool:
        return self.sqlalchemy_url.startswith("sqlite")

    @property
    def source_roots(self) -> list[Path]:
        if self.file_source_dirs:
            return [Path(d).resolve() for d in self.file_source_dirs.split(":") if d]
        return [self.data_path / "sources", Path(__file__).resolve().parent.parent / "examples" / "data"]

    @classmethod
    def documented(cls) -> list[tuple[str, str, str]]:
        """(variable, default, meaning) for every setting: the README table is generated from this."""
        return [(f.metadata["env"], str(f.default), f.metadata["doc"]) for f in fields(cls)]
