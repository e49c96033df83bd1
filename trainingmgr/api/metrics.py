"""Prometheus metrics: training jobs by status and pending steps (from the shared database, so every process
answers the same), and this process's requests (each gunicorn worker counts its own)."""
from __future__ import annotations

import time
from typing import Any, Iterator

from flask import Blueprint, Flask, Response, g, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import func, select

from ..extensions import db
from ..models import TrainingJob, WorkItem
from ..services import lifecycle as lc

bp = Blueprint("metrics", __name__)


class DatabaseCollector:
    """Read at scrape time, inside the scrape's request."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        jobs = GaugeMetricFamily("trainingmgr_training_jobs", "Training jobs by overall status", labels=["status"])
        counts = dict(db.session.execute(select(TrainingJob.status, func.count()).group_by(TrainingJob.status)).all())
        for status in (lc.NOT_STARTED, lc.IN_PROGRESS, lc.FINISHED, lc.FAILED):
            jobs.add_metric([status], counts.get(status, 0))
        yield jobs
        pending = GaugeMetricFamily("trainingmgr_pending_steps", "Job steps waiting in the work queue", labels=["kind"])
        for kind, count in db.session.execute(select(WorkItem.kind, func.count()).group_by(WorkItem.kind)).all():
            pending.add_metric([kind], count)
        yield pending


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
