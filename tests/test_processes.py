"""The real processes: `serve` without embedded workers, a separate `worker` process, and the demo against them."""
from __future__ import annotations

import os
import subprocess
import sys

from tests.test_serve import free_port
from trainingmgr.cli import _wait_ready


def test_demo_trains_through_a_server_and_a_separate_worker_process(tmp_path):
    port = free_port()
    env = {
        **os.environ,
        "TM_HOST": "127.0.0.1",
        "TM_PORT": str(port),
        "TM_DATA_DIR": str(tmp_path / "data"),
        "TM_WORKERS": "2",
        "TM_EMBEDDED_WORKER": "false",
        "TM_WORKER_POLL_SECONDS": "0.1",
    }
    env.pop("TM_DATABASE_URL", None)
    server = subprocess.Popen([sys.executable, "-m", "trainingmgr", "serve"], env=env, cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    worker = None
    try:
        url = f"http://127.0.0.1:{port}"
        assert _wait_ready(url, 30), "server did not become ready"
        worker = subprocess.Popen([sys.executable, "-m", "trainingmgr", "worker"], env=env, cwd=tmp_path,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        demo = subprocess.run([sys.executable, "-m", "trainingmgr", "demo", "--url", url, "--timeout", "120"],
                              env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert demo.returncode == 0, demo.stdout + demo.stderr
        assert "retrained: artifact 1.0.0 -> 1.1.0" in demo.stdout
        assert (tmp_path / "demo_qoe-1.1.0-Model.zip").stat().st_size > 0
    finally:
        for process in (worker, server):
            if process is not None:
                process.terminate()
                process.wait(30)
    assert worker.returncode == 0  # a clean stop on SIGTERM


def test_demo_fails_with_status_1_when_the_service_is_unreachable(tmp_path):
    port = free_port()
    demo = subprocess.run([sys.executable, "-m", "trainingmgr", "demo", "--url", f"http://127.0.0.1:{port}"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert demo.returncode == 1
    assert "demo FAILED" in demo.stdout
