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


def test_serve_stops_with_a_clear_message_when_the_schema_cannot_be_migrated(tmp_path):
    """No gunicorn starts on a database that cannot be reached: serving it would only answer 500s."""
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    env = {
        **os.environ,
        "TM_HOST": "127.0.0.1",
        "TM_PORT": str(free_port()),
        "TM_DATA_DIR": str(tmp_path),
        "TM_DATABASE_URL": f"postgresql+psycopg2://postgres@127.0.0.1:{dead}/none",
    }
    done = subprocess.run([sys.executable, "-m", "trainingmgr", "serve"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "the database schema could not be brought up to date" in done.stderr
    assert "Starting gunicorn" not in done.stdout + done.stderr


def test_serve_rejects_bad_settings_before_doing_anything(tmp_path):
    env = {**os.environ, "TM_DATA_DIR": str(tmp_path), "TM_PORT": "99999"}
    env.pop("TM_DATABASE_URL", None)
    done = subprocess.run([sys.executable, "-m", "trainingmgr", "serve"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "TM_PORT must be between 1 and 65535" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "trainingmgr.db").exists()  # not even migrated
