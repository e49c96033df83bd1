"""SQLAlchemy 2.0 typed models. Importing this package registers every table on Base.metadata."""
from .base import Base
from .feature_group import FeatureGroup
from .pipeline import Experiment, Pipeline, PipelineVersion
from .training_job import JobEvent, JobLog, Model, TrainingJob
from .work import WorkItem

__all__ = ["Base", "Experiment", "FeatureGroup", "JobEvent", "JobLog", "Model", "Pipeline", "PipelineVersion", "TrainingJob", "WorkItem"]
