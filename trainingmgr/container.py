"""The app-scoped container: settings, adapters and the factory of request-scoped services.

Stored in app.extensions["trainingmgr"]; nothing here is module-level state. Adapters are built on first use
(no network or subprocess at import or at create_app), one per process.
"""
from __future__ import annotations

import logging
import socket
import threading
from functools import cached_property
from typing import TYPE_CHECKING, Any

from sqlalchemy import text

from .config import Settings
from .extensions import db
from .secrets import TokenCipher
from .services.feature_groups import FeatureGroupService

if TYPE_CHECKING:
    from .adapters.base import Authenticator, DataExtractor, Notifier, ObjectStore, PipelineEngine
    from .adapters.dme import DmeClient
    from .adapters.mme import MmeClient
    from .adapters.outbound import OutboundPolicy
    from .services.pipelines import PipelineService
    from .services.training_jobs import TrainingJobService

log = logging.getLogger(__name__)


class Container:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.cipher = TokenCipher(settings.secret_key, settings.data_path)
        self._lock = threading.Lock()
        self.worker: Any = None  # the embedded Worker of this process, when one runs

    def start_worker(self, app: Any) -> Any:
        """Start the embedded worker threads of this process (once)."""
        from .workers.runner import Worker

        with self._lock:
            if self.worker is None:
                self.worker = Worker(app).start()
        return self.worker

    def stop_worker(self) -> None:
        with self._lock:
            if self.worker is not None:
                self.worker.stop()
                self.worker = None

    def wake_workers(self) -> None:
        """New work was queued: an idle worker of this process looks now instead of at its next poll."""
        if self.worker is not None:
            self.worker.wake()

    # ------------------------------------------------------------------ adapters (one place chooses them)
    @cached_property
    def engine(self) -> "PipelineEngine":
        s = self.settings
        if s.pipeline_engine == "kfp":
            from .adapters.kfp_engine import KfpPipelineEngine

            return KfpPipelineEngine(s.kfp_host, token=s.kfp_token, timeout=s.http_timeout)
        from .adapters.pipeline_engine import LocalPipelineEngine

        return LocalPipelineEngine(s.data_path / "runs", s.max_concurrent_runs)

    @cached_property
    def object_store(self) -> "ObjectStore":
        s = self.settings
        if s.object_store == "s3":
            from .adapters.s3_object_store import S3ObjectStore

            return S3ObjectStore(s.s3_endpoint, access_key=s.s3_access_key, secret_key=s.s3_secret_key,
                                 secure=s.s3_secure, region=s.s3_region or None, timeout=s.http_timeout,
                                 bucket=s.s3_bucket or None)
        from .adapters.object_store import LocalObjectStore

        return LocalObjectStore(s.data_path / "models")

    @cached_property
    def extractor(self) -> "DataExtractor":
        s = self.settings
        if s.data_extraction == "remote":
            from .adapters.remote_extraction import RemoteExtractor

            return RemoteExtractor(s.data_extraction_url, timeout=s.http_timeout, outbound=self.outbound)
        from .adapters.extraction import EmbeddedExtractor

        # The local engine's warm launcher forks each extraction, so a step runner never loads pandas itself.
        fork_server = getattr(self.engine, "launcher", None) if s.pipeline_engine == "local" else None
        return EmbeddedExtractor(s.source_roots, s.data_path / "datasets", influx_timeout=s.http_timeout,
                                 outbound=self.outbound, fork_server=fork_server,
                                 answer_timeout=s.extraction_deadline)

    @cached_property
    def outbound(self) -> "OutboundPolicy":
        """Where clients may make this service connect (notification URLs, feature groups' hosts)."""
        from .adapters.outbound import OutboundPolicy

        return OutboundPolicy(self.settings.outbound_allow, self.settings.outbound_deny)

    @cached_property
    def mme(self) -> "MmeClient | None":
        if not self.settings.mme_url:
            return None
        from .adapters.mme import MmeClient

        return MmeClient(self.settings.mme_url, timeout=self.settings.http_timeout)

    @cached_property
    def dme(self) -> "DmeClient":
        from .adapters.dme import DmeClient

        s = self.settings
        return DmeClient(topic=s.dme_topic, bootstrap_servers=s.dme_bootstrap_servers, timeout=s.http_timeout,
                         outbound=self.outbound)

    @cached_property
    def notifier(self) -> "Notifier":
        from .adapters.notifier import HttpNotifier

        return HttpNotifier(timeout=self.settings.notify_timeout, hmac_key=self.settings.notify_hmac_key,
                            outbound=self.outbound)

    @cached_property
    def authenticator(self) -> "Authenticator | None":
        """The authenticator TM_AUTH chooses; None when the API is open (TM_AUTH=none)."""
        s = self.settings
        if s.auth == "token":
            from .adapters.api_tokens import StaticTokenAuthenticator

            return StaticTokenAuthenticator(s.tokens_path, s.role_map)
        if s.auth == "oidc":
            from .adapters.oidc import OidcAuthenticator

            return OidcAuthenticator(s.oidc_issuer, s.oidc_audience, s.role_map, roles_claim=s.oidc_roles_claim,
                                     jwks_url=s.oidc_jwks_url, timeout=s.http_timeout)
        if s.auth != "none":  # never an open API by a typo, even with settings that skipped validate()
            raise ValueError(f"unknown TM_AUTH {s.auth!r}")
        return None

    # ------------------------------------------------------------------ services (share the request's session)
    def feature_groups(self) -> FeatureGroupService:
        return FeatureGroupService(db.session, self.cipher, self.dme, self.outbound)

    def pipelines(self) -> "PipelineService":
        from .services.pipelines import PipelineService

        return PipelineService(db.session, self.settings.data_path, self.engine)

    def training_jobs(self) -> "TrainingJobService":
        from .services.training_jobs import TrainingJobService

        # The container is the Adapters: each adapter is built when a use case first needs it (reading a job
        # builds none, so an API-only process never loads pandas or kfp).
        return TrainingJobService(db.session, self.settings, self, self.pipelines())

    def model_url(self, modelname: str, modelversion: str, artifactversion: str) -> str:
        base = self.settings.advertised_url.rstrip("/") or f"http://{socket.gethostname()}:{self.settings.port}"
        return f"{base}/model/{modelname}/{modelversion}/{artifactversion}/Model.zip"

    def readiness(self) -> tuple[dict[str, str], list[str]]:
        """Each check's state ("ok" or what is wrong), and the checks that make the service not ready. No step
        runner alive is a fault where `serve` keeps one (TM_EMBEDDED_WORKER), and only said where separate
        `trainingmgr worker` processes are expected: the API serves without them, jobs wait."""
        from .models.work_wake import live_step_runners

        checks: dict[str, str] = {}
        try:
            db.session.execute(text("SELECT 1"))
            checks["database"] = "ok"
        except Exception as e:  # any driver error means "not ready", and is worth a log line
            log.warning("database not reachable: %s", e.__class__.__name__)
            db.session.rollback()
            checks["database"] = "unreachable"
        else:
            try:
                alive = self.worker is not None or live_step_runners(db.session) > 0
                checks["step_runner"] = "ok" if alive else "none alive"
            except Exception as e:  # noqa: BLE001 - cannot tell: say so, never a 500 of /readyz
                log.warning("step runner check failed: %s", e.__class__.__name__)
                db.session.rollback()
                checks["step_runner"] = "unknown"
        # Every configured component; the embedded ones are always ready.
        s = self.settings
        # Only the real components are asked; the embedded ones are part of this process.
        components = [("object_store", "object_store", s.object_store != "local"),
                      ("pipeline_engine", "engine", s.pipeline_engine != "local"),
                      ("data_extraction", "extractor", s.data_extraction != "embedded"),
                      ("model_management", "mme", bool(s.mme_url))]
        for name, adapter, remote in components:
            if not remote:
                if adapter != "mme":
                    checks[name] = "ok"
                continue
            try:
                ok = getattr(self, adapter).ready()
            except Exception as e:  # a broken adapter is "not ready", never a 500 of /readyz
                log.warning("%s readiness check failed: %s", name, e.__class__.__name__)
                ok = False
            checks[name] = "ok" if ok else "unreachable"
        advisory = () if self.settings.embedded_worker else ("step_runner",)
        return checks, [name for name, state in checks.items() if state != "ok" and name not in advisory]
