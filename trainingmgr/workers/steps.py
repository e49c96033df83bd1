"""What each kind of work item does. Every outcome is recorded together with finishing (or rescheduling) the item,
in one transaction, and only while the worker still holds the item's lease.
"""
from __future__ import annotations

import logging
import re
import shutil
import tempfile
import uuid
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from ..adapters.base import AdapterError, ExtractionRequest, RunStatus
from ..adapters.object_store import model_key
from ..models import PipelineVersion, TrainingJob
from ..models import lifecycle as lc
from ..models.lifecycle import JobStateMachine
from ..services.run_logs import run_log_to_keep
from ..services.training_jobs import featurepath, remove_job_files
from ..models.work_queue import EXTRACT, NOTIFY, START_RUN, WATCH_RUN, Claim, WorkQueue, utcnow

log = logging.getLogger(__name__)

MAX_BACKOFF_SECONDS = 60.0
EXTRACTION_POLL_SECONDS = 1.0  # a remote extraction's status is an HTTP call: look less often


def backoff(attempts: int) -> float:
    return min(MAX_BACKOFF_SECONDS, 0.5 * 2 ** max(0, attempts - 1))


def zip_model(model_path: Path, into: Path) -> Path:
    """Model.zip of the pipeline's model output (kept as it is when it is a zip file already)."""
    target = into / "Model.zip"
    if model_path.is_file() and model_path.suffix == ".zip":
        shutil.copyfile(model_path, target)
    elif model_path.is_dir():
        shutil.make_archive(str(target.with_suffix("")), "zip", root_dir=model_path)
    else:
        import zipfile

        with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.write(model_path, arcname=model_path.name)
    return target


RUN_ID_OF_JOB = re.compile(r"tj(\d+)-[0-9a-f]{8}")


def new_run_id(job_id: int) -> str:
    # Unique per start (a retried start reuses the recorded one); names its job, see job_id_of_run.
    return f"tj{job_id}-{uuid.uuid4().hex[:8]}"


def job_id_of_run(run_id: str) -> int | None:
    """The job a run id of new_run_id belongs to (None for any other id): no lookup by run id needed."""
    match = RUN_ID_OF_JOB.fullmatch(run_id)
    return int(match.group(1)) if match else None


def _run_end(status: RunStatus, started_at: datetime | None) -> datetime:
    """The engine's record of when the run ended, not the moment we looked; kept between the run's start and now,
    since the engine's clock is not ours."""
    now = utcnow()
    if status.ended_at is None:
        return now
    return min(max(status.ended_at, started_at or status.ended_at), now)


class StepExecutor:
    def __init__(self, container: Any, session: Session):
        self.container = container
        self.settings = container.settings
        self.session = session
        self.queue = WorkQueue(session)
        self.state_machine = JobStateMachine(session)

    def execute(self, claim: Claim) -> None:
        handler = {EXTRACT: self.extract, START_RUN: self.start_run, WATCH_RUN: self.watch_run,
                   NOTIFY: self.notify}[claim.kind]
        handler(claim)

    # -------------------------------------------------------------------------------------- helpers
    def _job(self, claim: Claim) -> TrainingJob | None:
        return self.session.get(TrainingJob, claim.job_id)

    def _past_deadline(self, claim: Claim) -> bool:
        return claim.deadline_at is not None and utcnow() > claim.deadline_at

    def _redacted(self, job: TrainingJob, text: str) -> str:
        """`text` without the feature group's clear token: a peer's error may echo the request that carried it, and
        the text goes into the job's answers and the log."""
        try:
            token = self.container.cipher.decrypt(job.feature_group.token_encrypted)
        except Exception:  # noqa: BLE001 - an undecryptable token cannot be in the text either
            return text
        return text.replace(token, "****") if len(token) >= 4 else text

    def _fail(self, claim: Claim, job: TrainingJob, reason: str) -> None:
        reason = self._redacted(job, reason)
        kept_log = run_log_to_keep(self.container.engine, job, self.settings.run_log_max_bytes)
        failed = self.state_machine.fail(job, reason, attempt=claim.attempts)
        if failed and kept_log is not None:
            self.session.merge(kept_log)
        self.queue.finish(claim)
        self.session.commit()
        if failed:
            self._remove_files(job)

    def _remove_files(self, job: TrainingJob) -> None:
        """A failed job keeps its record, not its files (as on delete)."""
        try:
            remove_job_files(self.container, job.run_id, featurepath(job))
        except (AdapterError, OSError) as e:
            log.warning("files of a failed job not removed", extra={"trainingjob_id": job.id, "error": str(e)})

    def _drop(self, claim: Claim) -> None:
        self.queue.finish(claim)
        self.session.commit()

    def _later(self, claim: Claim, delay: float, *, job: TrainingJob | None = None, **kwargs: Any) -> None:
        """Give the item back for later. With `job`: the step is not waiting for a failing peer (any more), so the
        time it was unreachable since is forgotten too."""
        if job is not None:
            if job.waiting is not None:
                job.waiting = None
            payload = kwargs.get("payload", claim.payload)
            if "unreachable_since" in payload:
                kwargs["payload"] = {k: v for k, v in payload.items() if k != "unreachable_since"}
        self.queue.retry_later(claim, delay, **kwargs)
        self.session.commit()

    def _retry_or_fail(self, claim: Claim, job: TrainingJob, error: AdapterError, reason: str) -> None:
        """A peer failed: try again with backoff while that may help and the step's deadline allows, else fail.

        Data extraction from a source that cannot be reached at all gives up after TM_SOURCE_UNREACHABLE_TIMEOUT
        (a wrong host is not worth an hour). While it waits, the job says why, how often it tried, when it tries
        next and until when (its `waiting`), and the log says so at WARNING."""
        if not error.retryable or self._past_deadline(claim):
            return self._fail(claim, job, f"{reason}: {error}")
        now = utcnow()
        payload = dict(claim.payload)
        gives_up_at = claim.deadline_at
        if claim.kind == EXTRACT and error.unreachable:
            since = datetime.fromisoformat(payload.setdefault("unreachable_since", now.isoformat()))
            limit = self.settings.source_unreachable_timeout
            if (now - since).total_seconds() >= limit:
                return self._fail(claim, job, f"{reason}: {error}; gave up after {claim.attempts} attempts in "
                                              f"{(now - since).total_seconds():.0f} s (TM_SOURCE_UNREACHABLE_TIMEOUT"
                                              f"={limit})")
            gives_up_at = min(filter(None, (gives_up_at, since + timedelta(seconds=limit))))
        else:
            payload.pop("unreachable_since", None)
        delay = backoff(claim.attempts)
        if gives_up_at is not None:  # look once more at the moment it gives up, not a backoff later
            delay = max(0.0, min(delay, (gives_up_at - now).total_seconds()))
        next_attempt_at = now + timedelta(seconds=delay)
        waiting = {
            "step": lc.step_in_progress(job.steps_state),
            "reason": self._redacted(job, f"{reason}: {error}")[:1000],
            "attempts": claim.attempts,
            "next_attempt_at": next_attempt_at.isoformat(),
            "gives_up_at": gives_up_at.isoformat() if gives_up_at is not None else None,
        }
        job.waiting = waiting
        log.warning("step waiting to retry a peer", extra={"trainingjob_id": job.id, **waiting})
        self._later(claim, delay, payload=payload)

    def _fail_overdue_run(self, claim: Claim, job: TrainingJob) -> None:
        self._terminate_quietly(job.run_id)
        self._fail(claim, job, f"the pipeline run did not finish within {self.settings.training_deadline} s")

    # -------------------------------------------------------------------------------------- extract
    def extract(self, claim: Claim) -> None:
        job = self._job(claim)
        if job is None:
            return
        state = lc.ordered(job.steps_state)[lc.DATA_EXTRACTION]
        if state in lc.ENDED or job.status in lc.ENDED:
            return self._drop(claim)
        if self._past_deadline(claim):
            return self._fail(claim, job,
                              f"data extraction did not finish within {self.settings.extraction_deadline} s")
        if state == lc.NOT_STARTED:
            self.state_machine.move(job, (lc.DATA_EXTRACTION, lc.IN_PROGRESS))
            self.session.commit()
        fg = job.feature_group
        request = ExtractionRequest(
            trainingjob_id=job.id,
            featurepath=featurepath(job),
            datalake_source=fg.datalake_source,
            feature_list=fg.features,
            query_filter=job.training_config["dataPipeline"]["query_filter"],
            source={
                "host": fg.host, "port": fg.port, "bucket": fg.bucket, "db_org": fg.db_org,
                "measurement": fg.measurement, "source_name": fg.source_name or "",
                "token": self.container.cipher.decrypt(fg.token_encrypted),
            },
        )
        self.session.commit()  # no transaction (and, on SQLite, no lock) held while the data is read
        started = bool(claim.payload.get("started"))
        try:
            # A remote extraction is started once, then polled; the embedded one completes in start().
            extractor = self.container.extractor
            status = extractor.status(request) if started else extractor.start(request)
        except AdapterError as e:
            return self._retry_or_fail(claim, job, e, "data extraction failed")
        if status.state == "COMPLETED":
            self.state_machine.move(job, (lc.DATA_EXTRACTION, lc.FINISHED),
                                    (lc.DATA_EXTRACTION_AND_TRAINING, lc.IN_PROGRESS))
            self.queue.enqueue(job.id, START_RUN, {"dataset_uri": status.dataset_uri or ""})
            self.queue.finish(claim)
            self.session.commit()
        elif status.state == "FAILED":
            self._fail(claim, job, f"data extraction failed: {status.error or 'no reason given'}")
        else:  # a remote extraction still running: look again later
            self._later(claim, EXTRACTION_POLL_SECONDS, job=job, payload={**claim.payload, "started": True},
                        count_attempt=False)

    # -------------------------------------------------------------------------------------- start the run
    def _parameters(self, job: TrainingJob, dataset_uri: str) -> dict[str, str]:
        model = job.model
        params = dict(job.training_config["dataPipeline"].get("arguments") or {})
        params.update(
            trainingjob_id=str(job.id),
            featurepath=featurepath(job),
            dataset_uri=dataset_uri,
            modelname=model.modelname,
            modelversion=model.modelversion,
            artifactversion=job.artifact_version,
            # Where the model is kept (s3://... with the S3 store): a remote pipeline that stores Model.zip itself
            # writes it there, whatever the store's layout.
            model_uri=self.container.object_store.uri(model.modelname,
                                                      model_key(model.modelversion, job.artifact_version)),
        )
        params.setdefault("epochs", "1")
        if job.is_retraining:
            params["previous_model_uri"] = self._previous_model_uri(job)
        return params

    def _previous_model_uri(self, job: TrainingJob) -> str:
        """Where the pipeline finds the newest finished artifact of the same model ("" when there is none)."""
        previous = self.session.scalars(
            select(TrainingJob).where(TrainingJob.model_id == job.model_id, TrainingJob.id < job.id,
                                      TrainingJob.status == lc.FINISHED)
            .order_by(TrainingJob.id.desc()).limit(1)
        ).first()
        if previous is None:
            return ""
        store = self.container.object_store
        key = model_key(job.model.modelversion, previous.artifact_version)
        return store.uri(job.model.modelname, key) if store.size(job.model.modelname, key) is not None else ""

    def start_run(self, claim: Claim) -> None:
        job = self._job(claim)
        if job is None:
            return
        steps = lc.ordered(job.steps_state)
        if steps[lc.DATA_EXTRACTION_AND_TRAINING] != lc.IN_PROGRESS:
            return self._drop(claim)
        engine = self.container.engine
        if engine.capacity_left() <= 0:
            # Wait for a free slot; waiting is not a failed attempt.
            return self._later(claim, 0.2, count_attempt=False)
        version = self.session.get(PipelineVersion, job.pipeline_version_id)
        if version is None:
            return self._fail(claim, job, "the job's pipeline version no longer exists")
        run_id = job.run_id or new_run_id(job.id)
        if job.run_id is None:
            # Recorded before the start, so a crash right after it cannot leave a run nobody knows of.
            job.run_id = run_id
            self.session.commit()
        try:
            engine.run_status(run_id)
            started = True  # a previous attempt started it already
        except AdapterError:
            started = False
        if not started:
            file_path, engine_ref = self.settings.data_path / version.file_path, version.engine_ref
            parameters = self._parameters(job, claim.payload.get("dataset_uri", ""))
            self.session.commit()
            try:
                engine.start_run(run_id, file_path, engine_ref, parameters)
            except AdapterError as e:
                return self._retry_or_fail(claim, job, e, "the pipeline run could not start")
        job.run_started_at = utcnow()
        try:
            self.state_machine.move(job, (lc.DATA_EXTRACTION_AND_TRAINING, lc.FINISHED),
                                    (lc.TRAINING, lc.IN_PROGRESS))
        except lc.InvalidTransition:  # cancelled while the run was starting: the cancel found no run to stop
            self._terminate_quietly(run_id)
            raise
        self.queue.enqueue(
            job.id, WATCH_RUN, delay=engine.watch_interval,
            deadline_at=utcnow() + timedelta(seconds=self.settings.training_deadline),
        )
        self.queue.finish(claim)
        self.session.commit()
        log.info("pipeline run started", extra={"trainingjob_id": claim.job_id, "run_id": run_id})

    # -------------------------------------------------------------------------------------- watch the run
    def watch_run(self, claim: Claim) -> None:
        job = self._job(claim)
        if job is None:
            return
        steps = lc.ordered(job.steps_state)
        engine = self.container.engine
        if steps[lc.TRAINING] == lc.IN_PROGRESS:
            try:
                status = engine.run_status(job.run_id)
            except AdapterError as e:
                if e.retryable and self._past_deadline(claim):
                    return self._fail_overdue_run(claim, job)
                # An engine outage fails no job early: look again, within the step's deadline.
                return self._retry_or_fail(claim, job, e, "the pipeline run cannot be followed")
            if status.state == "RUNNING":
                if self._past_deadline(claim):
                    return self._fail_overdue_run(claim, job)
                return self._later(claim, engine.watch_interval, job=job, count_attempt=False)
            job.run_ended_at = _run_end(status, job.run_started_at)
            if status.state != "SUCCEEDED":
                return self._fail(claim, job, f"the pipeline run failed: {status.error or 'no reason given'}")
            self.state_machine.move(job, (lc.TRAINING, lc.FINISHED), (lc.TRAINING_AND_TRAINED_MODEL, lc.IN_PROGRESS))
            self.session.commit()
            steps = lc.ordered(job.steps_state)
        if steps[lc.TRAINING_AND_TRAINED_MODEL] != lc.IN_PROGRESS:
            return self._drop(claim)
        self._store_model(claim, job)

    def _store_model(self, claim: Claim, job: TrainingJob) -> None:
        engine = self.container.engine
        store = self.container.object_store
        try:
            status = engine.run_status(job.run_id)
        except AdapterError as e:
            return self._retry_or_fail(claim, job, e, "the pipeline run's outcome cannot be read")
        model = job.model
        modelname, modelversion, artifact = model.modelname, model.modelversion, job.artifact_version
        key = model_key(modelversion, artifact)
        self.session.commit()  # none held while the model is zipped and stored
        try:
            if status.state == "SUCCEEDED" and status.model_path:
                with tempfile.TemporaryDirectory(dir=self.settings.data_path) as tmp:
                    archive = zip_model(Path(status.model_path), Path(tmp))
                    store.put_file(modelname, key, archive)
            elif store.size(modelname, key) is None:
                # A remote run stores the model itself, under the reference's layout; it is not there.
                return self._fail(claim, job, f"the pipeline run left no model at {modelname}/{key}")
        except AdapterError as e:
            return self._retry_or_fail(claim, job, e, "the trained model could not be stored")
        kept_log = run_log_to_keep(engine, job, self.settings.run_log_max_bytes)
        job.metrics = status.metrics or job.metrics
        job.model_url = model_url = self.container.model_url(modelname, modelversion, artifact)
        run_id = job.run_id
        if kept_log is not None:
            self.session.merge(kept_log)
        self.state_machine.move(job, (lc.TRAINING_AND_TRAINED_MODEL, lc.FINISHED), (lc.TRAINED_MODEL, lc.FINISHED))
        self.queue.finish(claim)
        self.session.commit()
        # The job's attributes are not read again after the commit: that would begin a transaction (on SQLite,
        # the write lock) for a log line.
        engine.cleanup(run_id)
        log.info("training job finished", extra={"trainingjob_id": claim.job_id, "model_url": model_url})

    def _terminate_quietly(self, run_id: str | None) -> None:
        if not run_id:
            return
        try:
            self.container.engine.terminate(run_id)
        except AdapterError as e:
            log.warning("pipeline run could not be terminated", extra={"run_id": run_id, "error": str(e)})

    # -------------------------------------------------------------------------------------- notify the rApp
    def notify(self, claim: Claim) -> None:
        # In order per job: WorkQueue.claim hands out only a job's oldest pending notification.
        payload = claim.payload
        self.session.commit()  # no transaction (on SQLite: no write lock) held while the receiver takes its time
        delivered = self.container.notifier.send(payload["url"], payload["body"], payload["delivery_id"])
        if delivered or claim.attempts >= self.settings.notify_attempts:
            if not delivered:
                log.warning("notification given up", extra={"trainingjob_id": claim.job_id,
                                                            "attempts": claim.attempts})
            self._drop(claim)
        else:
            self._later(claim, backoff(claim.attempts))
