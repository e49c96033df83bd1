"""Training jobs: creating them, reading them, deleting them, and the callbacks that drive them."""
from __future__ import annotations

import logging
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import bindparam, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from ..adapters.base import AdapterError
from ..adapters.outbound import OutboundDenied, OutboundPolicy
from ..config import Settings
from ..errors import BadGateway, BadRequest, Conflict, NotFound, ValidationFailed
from ..models import FeatureGroup, JobEvent, Model, TrainingJob
from ..models.feature_group import split_names
from ..models import lifecycle as lc
from ..models.base import utcnow
from ..models.lifecycle import JobStateMachine
from ..models.work_queue import EXTRACT, STEP_KINDS, WATCH_RUN, WorkQueue
from .pagination import Page, PageRequest, as_views, keyset_page, object_view
from .run_logs import LogPiece, read_run_log, run_log_to_keep

if TYPE_CHECKING:
    from ..adapters.base import DataExtractor, ObjectStore, PipelineEngine
    from ..adapters.mme import MmeClient
    from .pipelines import PipelineService

log = logging.getLogger(__name__)

# The largest id any backend stores (SQLite's INTEGER, PostgreSQL's BIGINT); a larger one names nothing, and
# handing it to the database driver fails (OverflowError on SQLite, "out of range" on PostgreSQL).
MAX_ID = 2**63 - 1

DEFAULT_EXPERIMENT = "Default"

_JOBS, _MODELS = TrainingJob.__table__, Model.__table__
# Everything a job's representation shows (schemas.training_job.dump_training_job), in one Core SELECT: the API's
# reads of jobs build no ORM object (identity map, loader, relationship), a third of a read's CPU. Writes and the
# steps work on TrainingJob.
JOB_VIEW = select(
    _JOBS.c.id, _JOBS.c.model_id, _MODELS.c.modelname, _MODELS.c.modelversion, _JOBS.c.artifact_version,
    _JOBS.c.model_location, _JOBS.c.training_dataset, _JOBS.c.validation_dataset, _JOBS.c.training_config,
    _JOBS.c.training_config_sent, _JOBS.c.notification_url, _JOBS.c.consumer_rapp_id, _JOBS.c.producer_rapp_id,
    _JOBS.c.model_url, _JOBS.c.status, _JOBS.c.steps_state, _JOBS.c.is_retraining, _JOBS.c.run_id,
    _JOBS.c.failure_reason, _JOBS.c.waiting, _JOBS.c.deletion_in_progress, _JOBS.c.created_at, _JOBS.c.updated_at,
    _JOBS.c.started_at, _JOBS.c.finished_at, _JOBS.c.step_times,
).select_from(_JOBS.join(_MODELS, _JOBS.c.model_id == _MODELS.c.id))
_VIEW_OF_JOB = JOB_VIEW.where(_JOBS.c.id == bindparam("job_id"))
_STEPS_OF_JOB = select(_JOBS.c.steps_state).where(_JOBS.c.id == bindparam("job_id"))


def job_view(job: TrainingJob) -> dict[str, Any]:
    """A TrainingJob as its view (JOB_VIEW's columns by name; TrainingJob has them all): what the create answers,
    without a second query."""
    return object_view(JOB_VIEW, job)


def artifact_version(training_number: int) -> str:
    """The n-th training of a model: 1.0.0 first, then each retraining bumps the minor version."""
    return f"1.{training_number - 1}.0"


def featurepath(job: TrainingJob) -> str:
    return f"{job.feature_group.name}_{job.id}"


def remove_job_files(adapters: Any, run_id: str | None, path: str) -> None:
    """What a job created outside the database: its run's folder (the run is stopped first) and its dataset."""
    if run_id:
        adapters.engine.cleanup(run_id)
    adapters.extractor.remove(path)


class Adapters(Protocol):
    """What the service reaches outside (the Container provides them, each built on first use)."""

    engine: "PipelineEngine"
    extractor: "DataExtractor"
    object_store: "ObjectStore"
    mme: "MmeClient | None"  # the Model Management Service, when one is configured
    outbound: "OutboundPolicy"  # where clients may make the service connect


class TrainingJobService:
    def __init__(self, session: Session, settings: Settings, adapters: Adapters, pipelines: "PipelineService"):
        self.session = session
        self.settings = settings
        self.adapters = adapters
        self.pipelines = pipelines
        self.state_machine = JobStateMachine(session)
        self.queue = WorkQueue(session)

    # ------------------------------------------------------------------------------------------ create
    def _check_notification_url(self, url: str) -> None:
        """The rApp's URL must be one the outbound policy lets a client name (checked again when connecting)."""
        try:
            self.adapters.outbound.check_url(url, "notification_url host")
        except OutboundDenied as e:
            raise ValidationFailed({"notification_url": [
                f"{e.target} is not allowed: {e.rule} (TM_OUTBOUND_ALLOW changes this)"]}) from None
        except ValueError as e:
            raise ValidationFailed({"notification_url": [str(e)]}) from None

    def create(self, data: dict[str, Any], *, config_as_sent: dict[str, Any] | None = None) -> TrainingJob:
        """`data` as the schema loaded it; `config_as_sent`: the client's training_config, kept to answer it back
        with the client's own spellings."""
        if data["notification_url"]:
            self._check_notification_url(data["notification_url"])
        config = data["training_config"]
        data_pipeline = config["dataPipeline"]
        training_pipeline = config["trainingPipeline"]
        fg_name = data_pipeline["feature_group_name"]
        registered = self._check_registration(data)
        if not fg_name and registered is not None:
            fg_name = self._feature_group_for(registered)
            data_pipeline["feature_group_name"] = fg_name
            if config_as_sent is not None:  # validated by the schema: an object with a dataPipeline object
                # The client's copy says which feature group was chosen for it, too.
                config_as_sent = {**config_as_sent,
                                  "dataPipeline": {**config_as_sent["dataPipeline"], "feature_group_name": fg_name}}
        if not fg_name:
            raise BadRequest("training_config.dataPipeline.feature_group_name must name a feature group")
        fg = self.session.scalar(select(FeatureGroup).where(FeatureGroup.name == fg_name))
        if fg is None:
            raise NotFound(f"Feature group {fg_name!r} does not exist")
        # Both pipelines must exist now: the later retrainings depend on the second one.
        training = self.pipelines.resolve_version(training_pipeline["pipeline_name"],
                                                  training_pipeline["pipeline_version"])
        retraining = self.pipelines.resolve_version(training_pipeline["retraining_pipeline_name"],
                                                    training_pipeline["retraining_pipeline_version"])

        model_ref = data["model_id"]
        try:
            # Refused now, not after the whole training ran: the model must fit the store's layout.
            self.adapters.object_store.check_model_name(model_ref["modelname"])
        except AdapterError as e:
            raise ValidationFailed({"model_id": {"modelname": [str(e)]}}) from None
        model_id = self._model_id(model_ref["modelname"], model_ref["modelversion"], data["model_location"])
        # Hands out the training number atomically: the row stays locked until this transaction commits, so two
        # concurrent trainings of one model never get the same artifact version.
        number = self.session.execute(
            update(Model)
            .where(Model.id == model_id)
            .values(training_count=Model.training_count + 1)
            .returning(Model.training_count)
            .execution_options(synchronize_session=False)
        ).scalar_one()
        is_retraining = number > 1
        # Runs are grouped in one experiment, as the reference's jobs were ("Default").
        self.pipelines.ensure_experiment(DEFAULT_EXPERIMENT)
        job = TrainingJob(
            model_id=model_id,
            feature_group_id=fg.id,
            artifact_version=artifact_version(number),
            is_retraining=is_retraining,
            training_config=config,
            training_config_sent=config_as_sent,
            model_location=data["model_location"] or None,
            training_dataset=data["training_dataset"] or None,
            validation_dataset=data["validation_dataset"] or None,
            notification_url=data["notification_url"] or None,
            consumer_rapp_id=data["consumer_rapp_id"] or None,
            producer_rapp_id=data["producer_rapp_id"] or None,
            steps_state=lc.initial_steps(),
            status=lc.NOT_STARTED,
            pipeline_version_id=(retraining if is_retraining else training).id,
        )
        self.session.add(job)
        self.session.flush()
        self.state_machine.created(job)
        self.queue.enqueue(job.id, EXTRACT, deadline_at=utcnow() + timedelta(seconds=self.settings.extraction_deadline))
        self.session.commit()
        log.info("training job created", extra={"trainingjob_id": job.id, "artifact_version": job.artifact_version,
                                                "is_retraining": is_retraining})
        return job

    def _check_registration(self, data: dict[str, Any]) -> dict[str, Any] | None:
        """With a Model Management Service: the model must be registered there, at the location given."""
        if self.adapters.mme is None:
            return None
        name, version = data["model_id"]["modelname"], data["model_id"]["modelversion"]
        try:
            record = self.adapters.mme.lookup(name, version)
        except AdapterError as e:
            raise BadGateway(f"The Model Management Service could not be asked about {name} {version}: {e}") from None
        if record is None:
            raise BadRequest(f"Model {name} version {version} is not registered in the Model Management Service")
        location = record.get("modelLocation") or ""
        if data["model_location"] and location and data["model_location"] != location:
            raise BadRequest(f"model_location {data['model_location']!r} differs from the registered {location!r}")
        return record

    def _feature_group_for(self, record: dict[str, Any]) -> str:
        """The feature group whose feature list equals the model's inputDataType."""
        wanted = frozenset(split_names(str((record.get("modelInformation") or {}).get("inputDataType") or "")))
        if not wanted:
            raise BadRequest("feature_group_name is empty and the registered model names no inputDataType")
        matches = [fg.name for fg in self.session.scalars(select(FeatureGroup).order_by(FeatureGroup.name))
                   if frozenset(fg.features) == wanted]
        if len(matches) != 1:
            raise BadRequest(
                f"feature_group_name is empty and {len(matches)} feature groups have the features "
                f"{', '.join(sorted(wanted))} of the model's inputDataType: name one"
            )
        return matches[0]

    def _model_id(self, modelname: str, modelversion: str, location: str) -> int:
        """The model's id, registering it on first use (race-safe: INSERT ... ON CONFLICT DO NOTHING)."""
        dialect = self.session.get_bind().dialect.name
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        now = utcnow()
        self.session.execute(
            insert(Model)
            .values(modelname=modelname, modelversion=modelversion, model_location=location or None,
                    training_count=0, created_at=now, updated_at=now)
            .on_conflict_do_nothing(index_elements=["modelname", "modelversion"])
        )
        return self.session.scalar(
            select(Model.id).where(Model.modelname == modelname, Model.modelversion == modelversion)
        )

    # ------------------------------------------------------------------------------------------ read
    def _find(self, job_id: int) -> TrainingJob | None:
        return self.session.get(TrainingJob, job_id) if 0 < job_id <= MAX_ID else None

    def get(self, job_id: int) -> TrainingJob:
        job = self._find(job_id)
        if job is None:
            raise NotFound(f"Training job {job_id} does not exist")
        return job

    def view(self, job_id: int) -> dict[str, Any]:
        """The job's view (JOB_VIEW's columns by name), or NotFound."""
        found = as_views(self.session.execute(_VIEW_OF_JOB, {"job_id": job_id})) if 0 < job_id <= MAX_ID else None
        if not found:
            raise NotFound(f"Training job {job_id} does not exist")
        return found[0]

    def steps_state(self, job_id: int) -> dict[str, str]:
        """The job's steps_state, or NotFound."""
        steps = self.session.execute(_STEPS_OF_JOB, {"job_id": job_id}).scalar() if 0 < job_id <= MAX_ID else None
        if steps is None:
            raise NotFound(f"Training job {job_id} does not exist")
        return steps

    def versions(self, page: PageRequest, *, modelname: str | None = None, modelversion: str | None = None
                 ) -> Page[dict[str, Any]]:
        """The id and updated_at of jobs, newest first, keyset-paged by id: a list's page before its jobs are read.
        Every change of a job's view moves its updated_at (the model's name and version, in the view too, never
        change), so what was rendered of a job serves while its updated_at is this one."""
        query = select(_JOBS.c.id, _JOBS.c.updated_at)
        if modelname is not None:
            query = query.join(_MODELS, _JOBS.c.model_id == _MODELS.c.id).where(
                _MODELS.c.modelname == modelname, _MODELS.c.modelversion == modelversion)
        return keyset_page(self.session, query, _JOBS.c.id, page, descending=True, views=True)

    def views_of(self, job_ids: list[int]) -> dict[int, dict[str, Any]]:
        """The views of these jobs (JOB_VIEW's columns by name) by id; a job deleted meanwhile is absent."""
        return {view["id"]: view for view in as_views(self.session.execute(JOB_VIEW.where(_JOBS.c.id.in_(job_ids))))}

    def list(self, page: PageRequest, *, modelname: str | None = None, modelversion: str | None = None
             ) -> Page[TrainingJob]:
        """Newest first, keyset-paged by id."""
        query = select(TrainingJob)
        if modelname is not None:
            query = query.join(Model, TrainingJob.model_id == Model.id).where(
                Model.modelname == modelname, Model.modelversion == modelversion
            )
        return keyset_page(self.session, query, TrainingJob.id, page, descending=True)

    def events(self, job_id: int, page: PageRequest) -> Page[JobEvent]:
        """The job's events, oldest first, keyset-paged by their number (seq)."""
        self.get(job_id)  # 404 for a job that does not exist
        return keyset_page(self.session, select(JobEvent).where(JobEvent.job_id == job_id), JobEvent.seq, page)

    def run_log(self, job_id: int, offset: int | None = None) -> LogPiece:
        """The job's pipeline run output from byte `offset` (None: its last TM_RUN_LOG_MAX_BYTES)."""
        job = self.get(job_id)
        try:
            return read_run_log(self.session, self.adapters.engine, job, offset, self.settings.run_log_max_bytes)
        except AdapterError as e:
            raise BadGateway(f"The pipeline engine cannot be reached for the run's output: {e}") from None

    def nth_training(self, modelname: str, number: int) -> TrainingJob:
        """The older `/trainingjobs/{name}/{version}`: the number-th training of the model name, from 1."""
        if number < 1:
            raise BadRequest("version must be a positive integer")
        if number > MAX_ID:
            raise NotFound(f"Training job {modelname!r} version {number} does not exist")
        job = self.session.scalars(
            select(TrainingJob).join(Model, TrainingJob.model_id == Model.id)
            .where(Model.modelname == modelname).order_by(TrainingJob.id).offset(number - 1).limit(1)
        ).first()
        if job is None:
            raise NotFound(f"Training job {modelname!r} version {number} does not exist")
        return job

    # ------------------------------------------------------------------------------------------ metrics
    def metrics(self, job_id: int) -> dict[str, Any]:
        return dict(self.get(job_id).metrics or {})

    def update_metrics(self, job_id: int, metrics: dict[str, Any]) -> dict[str, Any]:
        job = self.get(job_id)
        job.metrics = metrics
        self.session.commit()
        return metrics

    # ------------------------------------------------------------------------------------------ delete
    def delete(self, job_id: int, *, delete_model: bool = False) -> None:
        job = self.get(job_id)
        job.deletion_in_progress = True
        self.session.commit()
        run_id, path = job.run_id, featurepath(job)
        bucket, modelversion, artifact = job.model.modelname, job.model.modelversion, job.artifact_version
        if run_id and lc.ordered(job.steps_state)[lc.TRAINING] == lc.IN_PROGRESS:
            try:
                self.adapters.engine.terminate(run_id)
            except AdapterError as e:
                # Deleting now would leave the run going with nobody to stop it: keep the job, say why.
                job.deletion_in_progress = False
                self.session.commit()
                raise BadGateway(f"Training job {job_id} was not deleted: its run could not be terminated ({e})") \
                    from None
        # Lock order: the job's row, then its work items, as every worker step goes (it updates the job, then
        # finishes its item). The other order deadlocks with a step running at this moment (PostgreSQL).
        self.session.execute(select(TrainingJob.id).where(TrainingJob.id == job_id).with_for_update())
        self.queue.remove_for_job(job_id)
        self.session.delete(job)
        self.session.commit()
        # What the job created outside the database, after the row is gone (a failure here leaves only files).
        remove_job_files(self.adapters, run_id, path)
        if delete_model:
            from ..adapters.object_store import model_key

            self.adapters.object_store.delete(bucket, model_key(modelversion, artifact))
        log.info("training job deleted", extra={"trainingjob_id": job_id, "model_deleted": delete_model})

    def cancel(self, job_id: int, reason: str = "cancelled on request") -> TrainingJob:
        """End the job as CANCELLED: its pending steps are dropped and its run terminated; its record, history and
        rApp notification stay, as for any end. 409 when it has ended already."""
        job = self.get(job_id)
        # Lock order as in delete: the job's row, then its work items.
        self.session.execute(select(TrainingJob.id).where(TrainingJob.id == job_id).with_for_update())
        self.session.refresh(job)
        if not self.state_machine.cancel(job, reason):
            raise Conflict(f"Training job {job_id} has ended already ({job.status}): nothing to cancel")
        self.queue.remove_for_job(job_id, STEP_KINDS)  # its notification still goes out
        self.session.commit()
        run_id, path = job.run_id, featurepath(job)
        if run_id:
            try:
                self.adapters.engine.terminate(run_id)
            except AdapterError as e:  # a run that never started, or one that ended meanwhile
                log.warning("the cancelled job's run could not be terminated",
                            extra={"trainingjob_id": job_id, "run_id": run_id, "error": str(e)[:300]})
            kept_log = run_log_to_keep(self.adapters.engine, job, self.settings.run_log_max_bytes)
            if kept_log is not None:
                self.session.merge(kept_log)
                self.session.commit()
        remove_job_files(self.adapters, run_id, path)  # as when a job fails
        return job

    # ------------------------------------------------------------------------------------------ callbacks
    def on_data_extraction_done(self, job_id: int) -> str:
        """The data-extraction service (or a tool) says the dataset is ready. Repeated or late: no change."""
        job = self._callback_job(job_id)
        if lc.ordered(job.steps_state)[lc.DATA_EXTRACTION] != lc.IN_PROGRESS:
            return f"Training job {job_id}: nothing to do (data extraction is {job.steps_state[lc.DATA_EXTRACTION]})"
        # The extract step confirms with the extractor and moves on; bring it forward.
        self.queue.make_due(job_id, EXTRACT)
        self.session.commit()
        return f"Training job {job_id}: pipeline will be scheduled"

    def on_pipeline_status(self, job_id: int, run_status: str, run_id: str | None = None) -> str:
        job = self._callback_job(job_id)
        state = run_status.strip().upper()
        steps = lc.ordered(job.steps_state)
        if steps[lc.TRAINING] != lc.IN_PROGRESS:
            return f"Training job {job_id}: nothing to do (training is {steps[lc.TRAINING]})"
        if run_id is not None and run_id != job.run_id:
            # About another run (an old one, or made up): this job's run is not looked at sooner for it.
            return f"Training job {job_id}: nothing to do (run {run_id} is not the job's current run)"
        if lc.run_state(state) != lc.RunState.RUNNING:
            # A wake-up, never a verdict (anyone may post it): the watch step asks the engine how the run ended,
            # then collects the model or fails the job (and removes its files); bring it forward.
            self.queue.make_due(job_id, WATCH_RUN)
        else:
            return f"Training job {job_id}: run is {state}"
        self.session.commit()
        return f"Training job {job_id}: run {state} handled"

    def _callback_job(self, job_id: int) -> TrainingJob:
        job = self._find(job_id)
        if job is None:
            raise BadRequest(f"Training job {job_id} does not exist")
        return job
