"""Row and body factories for tests."""
from __future__ import annotations

from typing import Any

FG_V1 = "/ai-ml-model-training/v1/featureGroup"


def feature_group_body(name: str = "cell_kpis", **changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "featuregroup_name": name,
        "feature_list": "pdcpBytesDl,pdcpBytesUl,prbUsage",
        "datalake_source": "InfluxSource",
        "host": "influxdb.smo.svc",
        "port": "8086",
        "bucket": "pm-bucket",
        "token": "s3cr3t-influx-token",
        "db_org": "primary",
        "measurement": "cell_kpis",
        "enable_dme": False,
    }
    body.update(changes)
    return body


def create_feature_group(client: Any, name: str = "cell_kpis", **changes: Any) -> dict[str, Any]:
    response = client.post(FG_V1, json=feature_group_body(name, **changes))
    assert response.status_code == 201, response.get_json()
    return response.get_json()["featuregroup"]


def create_file_feature_group(client: Any, name: str, *, measurement: str, feature_list: str,
                              datalake_source: str = "CsvSource") -> dict[str, Any]:
    """A CsvSource/ParquetSource feature group: only the fields a file source reads."""
    body = {"featuregroup_name": name, "feature_list": feature_list, "datalake_source": datalake_source,
            "measurement": measurement, "enable_dme": False}
    response = client.post(FG_V1, json=body)
    assert response.status_code == 201, response.get_json()
    return response.get_json()["featuregroup"]


def add_training_job(app: Any, featuregroup_name: str) -> int:
    """A training-job row that uses the feature group (the job API comes with the training-job resource)."""
    from trainingmgr.extensions import db
    from trainingmgr.models import FeatureGroup, Model, TrainingJob
    from sqlalchemy import select

    with app.app_context():
        fg = db.session.scalar(select(FeatureGroup).where(FeatureGroup.name == featuregroup_name))
        model = Model(modelname="qoe_model", modelversion="1")
        db.session.add(model)
        db.session.flush()
        job = TrainingJob(
            model_id=model.id,
            feature_group_id=fg.id,
            artifact_version="1.0.0",
            training_config={},
            steps_state={},
        )
        db.session.add(job)
        db.session.commit()
        return job.id


PROBLEM = "application/problem+json"
TITLES = {400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 409: "Conflict",
          413: "Request Entity Too Large", 415: "Unsupported Media Type", 500: "Internal Server Error",
          502: "Bad Gateway", 503: "Service Unavailable"}


def assert_problem_details(response: Any, status: int, title: str | None = None) -> dict[str, Any]:
    """A ProblemDetails answer with `status`: title, status, detail; `Exception` (= detail) only outside the R1AP
    prefix, as the older routes' clients read it."""
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == PROBLEM
    body = response.get_json()
    assert body["status"] == status
    assert body["title"] == (title or TITLES[status])
    assert isinstance(body["detail"], str) and body["detail"].strip()
    if response.request.path.startswith("/ai-ml-model-training/"):
        assert "Exception" not in body
    else:
        assert body["Exception"] == body["detail"]
    return body


def upload_pipeline(client: Any, name: str, path: Any, **form: str) -> dict[str, Any]:
    """Upload a compiled pipeline file as the multipart form of POST /pipelines/{name}/upload (other form fields:
    `form`); the answer."""
    import io

    response = client.post(
        f"/pipelines/{name}/upload",
        data={"file": (io.BytesIO(path.read_bytes()), path.name), "description": "example", **form},
        content_type="multipart/form-data",
    )
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def step_runner_listening(app: Any) -> bool:
    """Whether a step runner listens for work on the app's database (as any process would ask: work_wake)."""
    from trainingmgr.extensions import db
    from trainingmgr.models.work_wake import live_step_runners

    with app.app_context():
        try:
            return live_step_runners(db.session) >= 1
        finally:
            db.session.remove()
