"""The real start-up path: `python -m trainingmgr serve` migrates the database and serves with gunicorn."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import requests

from trainingmgr import PROJECT_ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_migrates_and_answers_on_the_configured_port(tmp_path):
    port = free_port()
    env = {
        **os.environ,
        "TM_HOST": "127.0.0.1",
        "TM_PORT": str(port),
        "TM_DATA_DIR": str(tmp_path),
        "TM_WORKERS": "2",
    }
    env.pop("TM_DATABASE_URL", None)
    server = subprocess.Popen(
        [sys.executable, "-m", "trainingmgr", "serve"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if requests.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert server.poll() is None, "server exited early"
            assert time.monotonic() < deadline, "server did not become ready in 30 s"
            time.sleep(0.2)
        assert (tmp_path / "trainingmgr.db").exists()
        created = requests.post(
            f"{base}/ai-ml-model-training/v1/featureGroup",
            json={
                "featuregroup_name": "served_fg",
                "feature_list": "a,b",
                "datalake_source": "InfluxSource",
                "host": "influx",
                "port": "8086",
                "bucket": "b",
                "token": "tok-never-logged",
                "db_org": "org",
                "measurement": "m",
                "enable_dme": False,
            },
            timeout=5,
        )
        assert created.status_code == 201
        assert requests.get(f"{base}/featureGroup/served_fg", timeout=5).json()["token"] == "****"
        assert requests.get(f"{base}/nowhere", timeout=5).json()["status"] == 404
    finally:
        server.terminate()
        output, _ = server.communicate(timeout=30)
    assert "Running upgrade" in output  # the schema was migrated before serving
    assert '"path": "/featureGroup/served_fg"' in output  # structured access log
    assert "tok-never-logged" not in output
