"""Pipelines, their versions and experiments: the service keeps the registry (kfp.local has none).

An uploaded version is a compiled KFP pipeline (YAML) stored at <data_dir>/pipelines/<name>/<number>.yaml; its row
keeps that path relative to data_dir, the file's sha256 and the engine's id for it.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from ..adapters.base import AdapterError
from ..adapters.pipeline_files import yaml_documents
from ..errors import BadRequest, Conflict, NotFound, ServiceUnavailable, database_unavailable
from ..models import Experiment, Pipeline, PipelineVersion
from ..models.base import utcnow

if TYPE_CHECKING:
    from ..adapters.base import PipelineEngine

log = logging.getLogger(__name__)

# Letters, digits, '_', '-', '.'; not starting with '.' (the name is a folder: no '.', '..' or hidden ones).
PIPELINE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}")
PIPELINE_NAME_RULE = "1 to 128 letters, digits, '_', '-' or '.', not starting with '.'"
EXPERIMENT_NAME_MAX = 128
LATEST = "latest"
UPLOAD_ATTEMPTS = 5


def check_pipeline_name(name: str) -> None:
    if not isinstance(name, str) or not PIPELINE_NAME.fullmatch(name):
        raise BadRequest(f"Invalid pipeline name {name!r}: {PIPELINE_NAME_RULE}.")


def default_version_name(pipeline_name: str, number: int) -> str:
    """A version's name when its uploader gave none, as Kubeflow names them: the first after the pipeline, later
    ones by their number. A pipeline named only by digits names its first "1": its own name would be a later
    version's number."""
    if number == 1 and not pipeline_name.isdigit():
        return pipeline_name
    return str(number)


def check_version_name(name: str) -> None:
    """A version name a job can refer to without ambiguity: not a bare number (numbers name versions by their
    order) and not "latest"."""
    if not isinstance(name, str) or not PIPELINE_NAME.fullmatch(name) or name.isdigit() or name.lower() == LATEST:
        raise BadRequest(f"Invalid version_name {name!r}: {PIPELINE_NAME_RULE}, not only digits, not 'latest'.")


def parse_pipeline_spec(content: bytes) -> dict[str, Any]:
    """The pipeline spec of a compiled KFP pipeline, or BadRequest saying what is wrong with the file."""
    if not content.strip():
        raise BadRequest("The file is empty: upload the compiled pipeline (the YAML the kfp compiler writes).")
    try:
        text = content.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise BadRequest("The file is not a compiled pipeline: it is not UTF-8 text.") from None
    try:
        # A compiled pipeline may carry a second document (platform config); the first is the pipeline spec. Every
        # document is read now, so that one the engines cannot read later is refused here.
        documents = list(yaml_documents(text))
        document = documents[0] if documents else None
    except yaml.MarkedYAMLError as e:
        where = f" at line {e.problem_mark.line + 1} column {e.problem_mark.column + 1}" if e.problem_mark else ""
        raise BadRequest(f"The file is not valid YAML: {e.problem or e.context}{where}.") from None
    except yaml.YAMLError as e:
        raise BadRequest(f"The file is not valid YAML: {e}.") from None
    except RecursionError:
        raise BadRequest("The file is not valid YAML: nested too deeply.") from None
    if not isinstance(document, dict):
        raise BadRequest("The file is not a compiled pipeline: it is YAML but not a mapping (pipelineInfo, root ...).")
    problems = []
    info = document.get("pipelineInfo")
    if not isinstance(info, dict) or not isinstance(info.get("name"), str) or not info["name"]:
        problems.append("pipelineInfo.name is missing")
    root = document.get("root")
    if not isinstance(root, dict) or not isinstance(root.get("dag"), dict):
        problems.append("root.dag is missing")
    elif root.get("inputDefinitions") is not None:
        inputs = root["inputDefinitions"]
        if not isinstance(inputs, dict) or not isinstance(inputs.get("parameters") or {}, dict):
            problems.append("root.inputDefinitions.parameters is not a mapping")
    if not isinstance(document.get("components"), dict):
        problems.append("components is missing")
    deployment = document.get("deploymentSpec")
    if not isinstance(deployment, dict) or not isinstance(deployment.get("executors"), dict):
        problems.append("deploymentSpec.executors is missing")
    if problems:
        raise BadRequest(
            "The file is not a compiled KFP pipeline: " + "; ".join(problems)
            + ". Upload the YAML that kfp.compiler.Compiler().compile() writes."
        )
    return document


def _write_atomic(path: Path, content: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{id(content)}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class PipelineService:
    def __init__(self, session: Session, data_dir: Path, engine: "PipelineEngine"):
        self.session = session
        self.data_dir = Path(data_dir)
        self.engine = engine

    # ------------------------------------------------------------------------------------------ upload
    def upload(self, name: str, content: bytes, description: str | None = None,
               version_name: str | None = None) -> PipelineVersion:
        """Store a compiled pipeline as the next version of `name` (version 1 creates the pipeline), named
        `version_name`, or as Kubeflow names them: the first after the pipeline, later ones by their number."""
        check_pipeline_name(name)
        version_name = (version_name or "").strip() or None
        if version_name is not None:
            check_version_name(version_name)
        parse_pipeline_spec(content)
        description = (description or "").strip() or None
        sha256 = hashlib.sha256(content).hexdigest()
        for attempt in range(1, UPLOAD_ATTEMPTS + 1):
            try:
                return self._store_version(name, content, description, sha256, version_name)
            except (IntegrityError, OperationalError) as e:
                if database_unavailable(e):
                    raise  # an outage, not a race: answered as one (503, see errors.py)
                # Another upload created the same pipeline first (or SQLite was busy): the next try sees it.
                self.session.rollback()
                if attempt == UPLOAD_ATTEMPTS:
                    raise ServiceUnavailable(
                        f"Pipeline {name} could not be stored: too many concurrent uploads, try again"
                    ) from e
                log.info("pipeline upload retried", extra={"pipeline": name, "attempt": attempt})
        raise AssertionError("unreachable")

    def _store_version(self, name: str, content: bytes, description: str | None, sha256: str,
                       version_name: str | None) -> PipelineVersion:
        # Writing to the pipeline's row first locks it until the commit (PostgreSQL: the row; SQLite: the
        # database), so concurrent uploads of one name get numbers one after the other, never the same one.
        locked = self.session.execute(
            update(Pipeline)
            .where(Pipeline.name == name)
            .values(updated_at=utcnow())
            .execution_options(synchronize_session=False)
        ).rowcount
        if locked:
            pipeline = self.session.scalar(select(Pipeline).where(Pipeline.name == name))
        else:
            pipeline = Pipeline(name=name, description=description)
            self.session.add(pipeline)
            self.session.flush()  # IntegrityError when a concurrent upload created it first
        number = (
            self.session.scalar(
                select(func.max(PipelineVersion.number)).where(PipelineVersion.pipeline_id == pipeline.id)
            )
            or 0
        ) + 1
        if version_name is None:
            version_name = default_version_name(name, number)
        elif self.session.scalar(select(PipelineVersion.id).where(PipelineVersion.pipeline_id == pipeline.id,
                                                                  PipelineVersion.name == version_name)):
            self.session.rollback()
            raise Conflict(f"Pipeline {name} has a version named {version_name!r} already")
        relative = Path("pipelines") / name / f"{number}.yaml"
        version = PipelineVersion(
            pipeline=pipeline, number=number, name=version_name, description=description,
            file_path=relative.as_posix(), sha256=sha256,
        )
        self.session.add(version)
        self.session.flush()
        path = self.data_dir / relative
        _write_atomic(path, content)
        try:
            try:
                version.engine_ref = self.engine.register_version(name, number, path, description or "")
            except AdapterError as e:
                if e.retryable:
                    raise ServiceUnavailable(f"The pipeline engine is not available: {e}") from None
                raise BadRequest(f"The pipeline engine refused pipeline {name}: {e}") from None
            if number == 1 and version.engine_ref is not None:
                pipeline.engine_ref = version.engine_ref
            self.session.commit()
        except BaseException:
            self.session.rollback()
            path.unlink(missing_ok=True)
            raise
        log.info("pipeline version uploaded", extra={"pipeline": name, "version": number, "sha256": sha256})
        return version

    # ------------------------------------------------------------------------------------------ read
    def list_pipelines(self) -> list[Pipeline]:
        return list(self.session.scalars(select(Pipeline).order_by(Pipeline.name)))

    def get_pipeline(self, name: str) -> Pipeline:
        pipeline = self.session.scalar(select(Pipeline).where(Pipeline.name == name)) if name else None
        if pipeline is None:
            raise NotFound(f"Pipeline {name!r} does not exist")
        return pipeline

    def list_versions(self, name: str) -> list[PipelineVersion]:
        pipeline = self.get_pipeline(name)
        return list(
            self.session.scalars(
                select(PipelineVersion)
                .where(PipelineVersion.pipeline_id == pipeline.id)
                .order_by(PipelineVersion.number)
            )
        )

    def resolve_version(self, name: str, version: str | int | None) -> PipelineVersion:
        """The version `version` of pipeline `name`: its name, its number, or "latest" / "" (None) for the newest."""
        pipeline = self.get_pipeline(name)
        text = "" if version is None else str(version).strip()
        query = select(PipelineVersion).where(PipelineVersion.pipeline_id == pipeline.id)
        if text.lower() in ("", LATEST):
            found = self.session.scalar(query.order_by(PipelineVersion.number.desc()).limit(1))
        elif text.isascii() and text.isdigit() and len(text) <= 9:
            found = self.session.scalar(query.where(PipelineVersion.number == int(text)))
        elif PIPELINE_NAME.fullmatch(text):
            found = self.session.scalar(query.where(PipelineVersion.name == text))
        else:
            raise BadRequest(f"Invalid version {version!r} of pipeline {name!r}: a version name or number, or "
                             "'latest'.")
        if found is None:
            raise NotFound(f"Pipeline {name!r} has no version {text or LATEST}")
        return found

    def file_for(self, version: PipelineVersion) -> Path:
        """Where the version's compiled pipeline is on this machine."""
        return self.data_dir / version.file_path

    # ------------------------------------------------------------------------------------------ experiments
    def list_experiment_names(self) -> list[str]:
        return list(self.session.scalars(select(Experiment.name).order_by(Experiment.name)))

    def ensure_experiment(self, name: str) -> Experiment:
        """The experiment `name`, created when absent (race-safe). It is flushed: the caller's commit keeps it."""
        if not isinstance(name, str) or not name.strip() or len(name) > EXPERIMENT_NAME_MAX:
            raise BadRequest(f"Invalid experiment name {name!r}: 1 to {EXPERIMENT_NAME_MAX} characters.")
        query = select(Experiment).where(Experiment.name == name)
        experiment = self.session.scalar(query)
        if experiment is not None:
            return experiment
        savepoint = self.session.begin_nested()
        try:
            experiment = Experiment(name=name)
            self.session.add(experiment)
            self.session.flush()
        except IntegrityError:
            # Created by a concurrent request between our look and our insert: use that one.
            savepoint.rollback()
            return self.session.scalar(query)
        savepoint.commit()
        return experiment
