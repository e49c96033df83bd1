"""The example training end to end on the production components: PostgreSQL, an S3 server (moto, in a process of
its own), a Kubeflow Pipelines server and the data-extraction service (local HTTP doubles that check the requests:
tests/kfp_double.py, tests/extraction_doubles.py).

The "cluster" is played by a thread: for each run the KFP double receives, it runs the uploaded pipeline spec
for real (kfp.local, through the service's own runner) on the extracted dataset, stores Model.zip in S3 under the
reference's layout, reports the metrics through the API, and marks the run SUCCEEDED, as a real pipeline would.
"""
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.extraction_doubles import DataExtractionService
from tests.factories import create_feature_group
from tests.kfp_double import KfpDouble
from tests.processes import moto_server
from tests.test_training_lifecycle import (JOBS, RETRAINING_YAML, TRAINING_YAML, EXAMPLES, job_request, upload,
                                           wait_for)
from trainingmgr import create_app

FEATURES = "prbUsageDl,prbUsageUl,activeUes,sinrMean,throughputDl"
MODEL = "qoe-remote"  # a valid S3 bucket name


@pytest.fixture
def s3_server(tmp_path):
    with moto_server(tmp_path) as endpoint:
        yield endpoint


class Cluster(threading.Thread):
    """Runs what the KFP double is asked to run, as pods of a cluster would."""

    def __init__(self, kfp: KfpDouble, s3_endpoint: str, app, work: Path):
        super().__init__(daemon=True)
        self.kfp, self.app, self.work = kfp, app, work
        from minio import Minio

        self.s3 = Minio(s3_endpoint, access_key="test", secret_key="test", secure=False)
        self.stopping = threading.Event()
        self.errors: list[str] = []

    def run(self) -> None:
        while not self.stopping.wait(0.1):
            with self.kfp.lock:
                pending = [r for r in self.kfp.runs.values() if r["state"] == "PENDING"]
                for run in pending:
                    self.kfp.set_run_state(run["run_id"], "RUNNING")
            for run in pending:
                try:
                    self.execute(run)
                    self.kfp.set_run_state(run["run_id"], "SUCCEEDED")
                except Exception as e:  # the run fails, as a pod would
                    self.errors.append(repr(e))
                    self.kfp.set_run_state(run["run_id"], "FAILED", error=str(e))

    def execute(self, run: dict) -> None:
        params = dict(run["runtime_config"].get("parameters") or {})
        # The feature store: the extraction service wrote the collection `dataset_uri` names.
        dataset = self.work / f"{params['dataset_uri']}.csv"
        pd.read_csv(EXAMPLES / "data" / "cell_kpis.csv", usecols=FEATURES.split(",")).to_csv(dataset, index=False)
        params["dataset_uri"] = str(dataset)
        params["previous_model_uri"] = ""  # an s3:// URI the example does not read: it trains from scratch
        version = self.kfp.versions[run["pipeline_version_reference"]["pipeline_version_id"]]
        run_dir = self.work / run["run_id"]
        run_dir.mkdir()
        (run_dir / "pipeline.yaml").write_text(yaml.safe_dump(version["pipeline_spec"]))
        declared = version["pipeline_spec"]["root"]["inputDefinitions"]["parameters"]
        (run_dir / "request.json").write_text(json.dumps({
            "pipeline_file": str(run_dir / "pipeline.yaml"),
            "parameters": {k: str(v) for k, v in params.items() if k in declared},
        }))
        subprocess.run([sys.executable, "-m", "trainingmgr.adapters.kfp_local_runner", str(run_dir)],
                       check=True, timeout=120, capture_output=True)
        result = json.loads((run_dir / "result.json").read_text())
        assert result["state"] == "SUCCEEDED", result
        # The pipeline stores its model under the reference's layout, and reports its metrics.
        archive = shutil.make_archive(str(run_dir / "Model"), "zip", root_dir=result["model_path"])
        if not self.s3.bucket_exists(params["modelname"]):
            self.s3.make_bucket(params["modelname"])
        self.s3.fput_object(params["modelname"], f"{params['modelversion']}/{params['artifactversion']}/Model.zip",
                            archive)
        reported = self.app.test_client().post(
            f"{JOBS}/update-model-metrics/{params['trainingjob_id']}", json=result["metrics"])
        assert reported.status_code == 200


def test_example_training_on_postgresql_s3_kfp_and_remote_extraction(pg_only, app, settings, s3_server, tmp_path):
    kfp = KfpDouble().start()
    extraction = DataExtractionService().start()
    production = create_app(settings.replace(
        object_store="s3", s3_endpoint=s3_server, s3_access_key="test", s3_secret_key="test",
        pipeline_engine="kfp", kfp_host=kfp.url,
        data_extraction="remote", data_extraction_url=extraction.url, http_timeout=5.0,
    ))
    container = production.extensions["trainingmgr"]
    container.engine.watch_interval = 0.2  # the double answers at once: no need to wait 3 s between looks
    cluster = Cluster(kfp, s3_server, production, tmp_path)
    cluster.start()
    client = production.test_client()
    try:
        assert client.get("/readyz").get_json()["checks"] == {  # no step runner yet: 503, and says so
            "database": "ok", "step_runner": "none alive", "object_store": "ok", "pipeline_engine": "ok",
            "data_extraction": "ok"}
        create_feature_group(client, "pm_kpis", feature_list=FEATURES)  # an InfluxSource, read by the service
        upload(client, "qoe_training", TRAINING_YAML)
        upload(client, "qoe_retraining", RETRAINING_YAML)
        assert [p["display_name"] for p in kfp.pipelines.values()] == ["qoe_training", "qoe_retraining"]
        container.start_worker(production)
        assert client.get("/readyz").status_code == 200

        body = job_request(MODEL)
        body["training_config"]["dataPipeline"]["feature_group_name"] = "pm_kpis"
        job = client.post(JOBS, json=body).get_json()
        done = wait_for(client, job["id"], timeout=120)
        assert done["status"] == "FINISHED", (done, cluster.errors)

        # The data-extraction service got the wire-compat request.
        [start] = extraction.recorded("POST")
        sent = start.json()
        assert sent["sink"] == {"CassandraSink": {"CollectionName": f"pm_kpis_{job['id']}"}}
        assert sent["transform"][0]["FeatureList"] == FEATURES and sent["trainingjob_id"] == str(job["id"])
        # KFP ran the stored version, named after our run id, with the job's parameters.
        [run] = kfp.runs.values()
        assert run["display_name"] == done["run_id"]
        assert run["runtime_config"]["parameters"]["artifactversion"] == "1.0.0"
        # The model is served from S3, streamed.
        download = client.get(f"/model/{MODEL}/1/1.0.0/Model.zip")
        assert download.status_code == 200
        assert "model.joblib" in zipfile.ZipFile(io.BytesIO(download.data)).namelist()
        assert client.get(f"{JOBS}/get-model-metrics/{job['id']}").get_json()["r2"] > 0.5

        # A retraining runs the retraining pipeline's version and bumps the artifact version.
        again = client.post(JOBS, json=body).get_json()
        assert wait_for(client, again["id"], timeout=120)["status"] == "FINISHED", cluster.errors
        assert client.get(f"/model/{MODEL}/1/1.1.0/Model.zip").status_code == 200
        retraining_run = kfp.run_named(client.get(f"{JOBS}/{again['id']}").get_json()["run_id"])
        assert retraining_run["runtime_config"]["parameters"]["previous_model_uri"] == \
            f"s3://{MODEL}/1/1.0.0/Model.zip"
    finally:
        container.stop_worker()
        cluster.stopping.set()
        kfp.stop()
        extraction.stop()
