"""Prometheus metrics: training jobs by status, pending steps and how long due steps wait (from the shared
database, so every process answers the same), and this process's requests (each gunicorn worker counts its own)."""
from __future__ import annotations

import time
from typing import Any, Iterator

from flask import Blueprint, Flask, Response, g, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import func, or_, select

from ..extensions import db
from ..models import TrainingJob, WorkItem
from ..models.base import utcnow
from ..models import lifecycle as lc
from ..models.work_queue import KINDS

bp = Blueprint("metrics", __name__)


class DatabaseCollector:
    """Read at scrape time, inside the scrape's request."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        jobs = GaugeMetricFamily("trainingmgr_training_jobs", "Training jobs by overall status", labels=["status"])
        counts = dict(db.session.execute(select(TrainingJob.status, func.count()).group_by(TrainingJob.status)).all())
        for status in (lc.NOT_STARTED, lc.IN_PROGRESS, lc.FINISHED, lc.FAILED, lc.CANCELLED):
            jobs.add_metric([status], counts.get(status, 0))
        yield jobs
        pending = GaugeMetricFamily("trainingmgr_pending_steps", "Job steps waiting in the work queue", labels=["kind"])
        for kind, count in db.session.execute(select(WorkItem.kind, func.count()).group_by(WorkItem.kind)).all():
            pending.add_metric([kind], count)
        yield pending
        # Steps that are due and that no worker holds: a delay that keeps growing means too few workers (or none).
        delay = GaugeMetricFamily("trainingmgr_step_queue_delay_seconds",
                                  "How long the oldest due, unclaimed step of each kind has waited", labels=["kind"])
        now = utcnow()
        oldest = dict(db.session.execute(
            select(WorkItem.kind, func.min(WorkItem.due_at))
            .where(WorkItem.due_at <= now, or_(WorkItem.lease_until.is_(None), WorkItem.lease_until < now))
            .group_by(WorkItem.kind)
        ).all())
        for kind in KINDS:
            due = oldest.get(kind)
            delay.add_metric([kind], max(0.0, (now - due).total_seconds()) if due is not None else 0.0)
        yield delay


def install_metrics(app: Flask) -> None:
    """A registry per app (no global state), request hooks, and the /metrics route."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DatabaseCollector())
    requests_total = Counter("trainingmgr_http_requests", "HTTP requests served by this process",
                             ["method", "endpoint", "status"], registry=registry)
    duration = Histogram("trainingmgr_http_request_duration_seconds", "HTTP request duration in this process",
                         ["endpoint"], registry=registry)
    app.extensions["trainingmgr_metrics"] = registry

    @app.before_request
    def _start() -> None:
        g.metrics_started = time.perf_counter()

    @app.after_request
    def _count(response: Any) -> Any:
        # The endpoint (not the path) keeps the label set bounded whatever ids clients send.
        endpoint = request.endpoint or "unknown"
        requests_total.labels(request.method, endpoint, str(response.status_code)).inc()
        started = g.get("metrics_started")
        if started is not None:
            duration.labels(endpoint).observe(time.perf_counter() - started)
        return response

    app.register_blueprint(bp)


@bp.get("/metrics")
def metrics() -> Response:
    from flask import current_app

    return Response(generate_latest(current_app.extensions["trainingmgr_metrics"]), mimetype=CONTENT_TYPE_LATEST)
