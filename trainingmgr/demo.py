"""The bundled example, end to end, through the service's HTTP API only (as an rApp and an operator would).

Creates the example feature group, uploads the example pipelines, trains a model, downloads Model.zip, retrains
and shows the bumped artifact version. Returns True only when everything worked. Each run trains a model version
of its own (1, 2, ...), so every run shows 1.0.0 -> 1.1.0; the downloads go to the folder given (the CLI gives
`<TM_DATA_DIR>/demo`).
"""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any, Callable

import requests

from . import PROJECT_ROOT
from .client import JOBS, ClientError, TrainingManagerClient, Unreachable

EXAMPLES = PROJECT_ROOT / "examples"
FEATURE_GROUP = "demo_cell_kpis"
MODEL = "demo_qoe"
PIPELINES = {"demo_qoe_training": "qoe_training.yaml", "demo_qoe_retraining": "qoe_retraining.yaml"}
TIMEOUT = 10  # seconds for each request


class DemoFailed(Exception):
    pass


class Demo:
    def __init__(self, base_url: str, out_dir: Path, echo: Callable[[str], None] = print, job_timeout: float = 300,
                 token: str | None = None):
        self.api = TrainingManagerClient(base_url, token, timeout=TIMEOUT)
        self.out_dir = out_dir
        self.echo = echo
        self.job_timeout = job_timeout

    def feature_group(self) -> None:
        body = {
            "featuregroup_name": FEATURE_GROUP,
            "feature_list": "prbUsageDl,prbUsageUl,activeUes,sinrMean,throughputDl",
            "datalake_source": "CsvSource",
            "measurement": "cell_kpis.csv",
            "enable_dme": False,
        }
        response = self.api.call("POST", "/ai-ml-model-training/v1/featureGroup", (201, 409), json=body)
        self.echo(f"feature group {FEATURE_GROUP}: " + ("created" if response.status_code == 201 else "exists"))

    def pipelines(self) -> dict[str, str]:
        versions = {}
        for name, file_name in PIPELINES.items():
            path = EXAMPLES / "pipelines" / file_name
            with path.open("rb") as f:
                response = self.api.call("POST", f"/pipelines/{name}/upload", (200,),
                                      files={"file": (file_name, f)}, data={"description": "bundled example"})
            versions[name] = response.json()["version"]
            self.echo(f"pipeline {name}: uploaded version {versions[name]}")
        return versions

    def model_version(self) -> str:
        """A model version no earlier run of the demo trained: one past the highest the service knows of."""
        versions = [job["modelId"]["modelversion"] for job in self.api.pages(f"{JOBS}?limit=1000")
                    if job["modelId"]["modelname"] == MODEL]
        return str(max((int(v) for v in versions if str(v).isdigit()), default=0) + 1)

    def train(self, versions: dict[str, str], model_version: str) -> dict[str, Any]:
        body = {
            "model_id": {"modelname": MODEL, "modelversion": model_version},
            "training_config": {
                "description": "demo: predict downlink throughput from cell KPIs",
                "dataPipeline": {"feature_group_name": FEATURE_GROUP, "query_filter": "",
                                 "arguments": {"epochs": "5"}},
                "trainingPipeline": {
                    "pipeline_name": "demo_qoe_training", "pipeline_version": versions["demo_qoe_training"],
                    "retraining_pipeline_name": "demo_qoe_retraining",
                    "retraining_pipeline_version": versions["demo_qoe_retraining"],
                },
            },
        }
        job = self.api.call("POST", JOBS, (201,), json=body).json()
        kind = "retraining" if job["is_retraining"] else "training"
        self.echo(f"job {job['id']}: {kind} of {MODEL} version {model_version}, "
                  f"artifact {job['modelId']['artifactversion']}")
        return self.follow(job["id"])

    def follow(self, job_id: int) -> dict[str, Any]:
        def show(job: dict[str, Any]) -> None:
            shown = " ".join(f"{step}={state}" for step, state in job["steps_state"].items())
            waiting = job.get("waiting")
            if waiting:
                shown += (f"\n    waiting: {waiting['reason']} (attempt {waiting['attempts']}; next at "
                          f"{waiting['next_attempt_at']}; gives up at {waiting.get('gives_up_at') or 'never'})")
            self.echo(f"  job {job_id}: {shown}")

        job = self.api.wait(job_id, self.job_timeout, show)
        if job is None:
            raise DemoFailed(f"job {job_id} did not end within {self.job_timeout:.0f} s")
        if job["status"] != "FINISHED":
            raise DemoFailed(f"job {job_id} {job['status'].lower()}: {job['failure_reason']}")
        return job

    def download(self, job: dict[str, Any]) -> Path:
        model = job["modelId"]
        version, artifact = model["modelversion"], model["artifactversion"]
        self.out_dir.mkdir(parents=True, exist_ok=True)
        target = self.out_dir / f"{MODEL}-{version}-{artifact}-Model.zip"
        size = self.api.download_model(job, target)
        with zipfile.ZipFile(target) as archive:
            names = archive.namelist()
        self.echo(f"  Model.zip ({size} bytes, {', '.join(names)}) saved to {target}")
        return target

    def run(self) -> bool:
        try:
            self.api.call("GET", "/readyz", (200,))
            self.feature_group()
            versions = self.pipelines()
            model_version = self.model_version()
            first = self.train(versions, model_version)
            metrics = self.api.call("GET", f"{JOBS}/get-model-metrics/{first['id']}", (200,)).json()
            self.echo("  metrics: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                for k, v in metrics.items()))
            self.download(first)
            second = self.train(versions, model_version)
            self.download(second)
            self.echo(f"retrained: artifact {first['modelId']['artifactversion']} -> "
                      f"{second['modelId']['artifactversion']}")
        except (DemoFailed, ClientError, Unreachable, requests.RequestException, OSError, ValueError, KeyError,
                zipfile.BadZipFile) as e:
            self.echo(f"demo FAILED: {e}")
            return False
        self.echo("demo succeeded")
        self.echo(f"  see the jobs, their steps, logs and metrics in the web console: {self.api.base}/console/jobs/"
                  f"{second['id']}")
        return True
