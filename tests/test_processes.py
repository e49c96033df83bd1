"""The real processes: `serve --demo` (the quick start), `serve` without embedded workers with a separate `worker`
process, and the demo against them."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.processes import assert_ready, cpu_kept_busy, free_port, listening, served, stop

DEMO_TIMEOUT = 600  # seconds a whole demo may take on a loaded machine


def wait_for_line(log_path, pattern: str, process: subprocess.Popen, seconds: float) -> str:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        text = log_path.read_text(errors="replace") if log_path.exists() else ""
        if re.search(pattern, text) or process.poll() is not None:
            return text
        time.sleep(0.5)
    raise AssertionError(f"{pattern!r} not seen in {seconds:.0f} s:\n{log_path.read_text(errors='replace')[-3000:]}")


def test_serve_demo_trains_keeps_serving_and_stops_on_sigterm_on_a_busy_machine(tmp_path):
    """`make run`: the demo passes on a loaded machine, its lines are not buried in access logs, the service keeps
    serving afterwards and stops quickly on SIGTERM. Run twice: the second run shows 1.0.0 -> 1.1.0 again."""
    port = free_port()
    env = {"TM_DATA_DIR": str(tmp_path / "data"), "TM_WORKERS": "2", "TM_DATABASE_URL": ""}
    with cpu_kept_busy():
        for run in (1, 2):
            log = tmp_path / f"run-{run}.log"
            with served(tmp_path, port, env, name=f"run-{run}", argv=("serve", "--demo")) as demo:
                output = wait_for_line(log, r"keeps serving|demo FAILED", demo, DEMO_TIMEOUT)
                assert demo.poll() is None, output
                assert "demo succeeded" in output, output
                assert "retrained: artifact 1.0.0 -> 1.1.0" in output
                assert f"training of demo_qoe version {run}," in output
                # While the demo ran, the service's INFO lines (one access log line per poll) were held back.
                demo_part = output.split("keeps serving")[0]
                assert '"level": "INFO"' not in demo_part and '"path": "/readyz"' not in demo_part
                # Still serving; then SIGTERM stops it, and the server it started, quickly.
                assert_ready(f"http://127.0.0.1:{port}", demo, 30, log)
                began = time.monotonic()
                demo.send_signal(signal.SIGTERM)
                demo.wait(60)
                assert time.monotonic() - began < 15
    assert sorted(p.name for p in (tmp_path / "data" / "demo").iterdir()) == [
        "demo_qoe-1-1.0.0-Model.zip", "demo_qoe-1-1.1.0-Model.zip",
        "demo_qoe-2-1.0.0-Model.zip", "demo_qoe-2-1.1.0-Model.zip"]
    assert not list(tmp_path.glob("*.zip"))  # nothing left in the working directory
    assert not listening(port)


def test_serve_demo_that_fails_says_so_stops_the_service_and_exits_1(tmp_path):
    port = free_port()
    empty = tmp_path / "no-sources"
    empty.mkdir()
    # The bundled dataset is not where the feature group's files may come from: the training fails.
    env = {"TM_DATA_DIR": str(tmp_path / "data"), "TM_WORKERS": "1", "TM_DATABASE_URL": "",
           "TM_FILE_SOURCE_DIRS": str(empty)}
    with served(tmp_path, port, env, argv=("serve", "--demo")) as demo:
        demo.wait(DEMO_TIMEOUT)
    output = (tmp_path / "server.log").read_text()
    assert demo.returncode == 1, output
    assert "demo FAILED" in output and "stopping the service" in output
    assert not listening(port)


def test_demo_trains_through_a_server_and_a_separate_worker_process(tmp_path):
    port = free_port()
    env = {
        "TM_DATA_DIR": str(tmp_path / "data"),
        "TM_WORKERS": "2",
        "TM_EMBEDDED_WORKER": "false",
        "TM_WORKER_POLL_SECONDS": "0.1",
        "TM_DATABASE_URL": "",
    }
    url = f"http://127.0.0.1:{port}"
    with served(tmp_path, port, env) as server:
        assert_ready(url, server, 120, tmp_path / "server.log")
        with served(tmp_path, port, env, name="worker", argv=("worker",)) as worker:
            demo = subprocess.run([sys.executable, "-m", "trainingmgr", "demo", "--url", url, "--timeout", "300"],
                                  env={**os.environ, **env}, cwd=tmp_path, capture_output=True, text=True,
                                  timeout=DEMO_TIMEOUT)
            assert demo.returncode == 0, demo.stdout + demo.stderr
            assert "retrained: artifact 1.0.0 -> 1.1.0" in demo.stdout
            assert (tmp_path / "data" / "demo" / "demo_qoe-1-1.1.0-Model.zip").stat().st_size > 0
            assert stop(worker) == 0  # a clean stop on SIGTERM


def test_demo_fails_with_status_1_when_the_service_is_unreachable(tmp_path):
    port = free_port()
    demo = subprocess.run([sys.executable, "-m", "trainingmgr", "demo", "--url", f"http://127.0.0.1:{port}"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert demo.returncode == 1
    assert "demo FAILED" in demo.stdout


def test_demo_on_the_s3_object_store(tmp_path):
    """The bundled demo on the production object store (moto's S3 server): with TM_S3_BUCKET it stores
    `demo_qoe` (not a valid bucket name) in the one bucket; without it, the job is refused at creation with the rule,
    instead of failing after the whole training."""
    from minio import Minio

    from tests.processes import moto_server

    with moto_server(tmp_path) as endpoint:
        env = {**os.environ, "TM_DATA_DIR": str(tmp_path / "data"), "TM_DATABASE_URL": "", "TM_OBJECT_STORE": "s3",
               "TM_S3_ENDPOINT": endpoint, "TM_S3_ACCESS_KEY": "demo", "TM_S3_SECRET_KEY": "demo-secret"}
        refused = subprocess.run([sys.executable, "-m", "trainingmgr", "demo", "--timeout", "300"], env=env,
                                 cwd=tmp_path, capture_output=True, text=True, timeout=DEMO_TIMEOUT)
        assert refused.returncode == 1
        assert "answered 400" in refused.stdout and "cannot be an S3 bucket" in refused.stdout
        assert "TM_S3_BUCKET" in refused.stdout

        env["TM_S3_BUCKET"] = "trainingmgr-models"
        demo = subprocess.run([sys.executable, "-m", "trainingmgr", "demo", "--timeout", "300"], env=env,
                              cwd=tmp_path, capture_output=True, text=True, timeout=DEMO_TIMEOUT)
        assert demo.returncode == 0, demo.stdout + demo.stderr
        assert "retrained: artifact 1.0.0 -> 1.1.0" in demo.stdout
        s3 = Minio(endpoint, access_key="demo", secret_key="demo-secret", secure=False)
        stored = sorted(o.object_name for o in s3.list_objects("trainingmgr-models", recursive=True))
        assert stored == ["demo_qoe/1/1.0.0/Model.zip", "demo_qoe/1/1.1.0/Model.zip"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_serve_demo_stopped_during_the_demo_takes_its_server_with_it(tmp_path, signum):
    """`docker stop`, systemd or a closed terminal while the demo runs: the server it started stops too (no
    orphan keeps the port)."""
    port = free_port()
    env = {"TM_DATA_DIR": str(tmp_path / "data"), "TM_WORKERS": "1", "TM_DATABASE_URL": ""}
    with served(tmp_path, port, env, argv=("serve", "--demo")) as demo:
        wait_for_line(tmp_path / "server.log", r"pipeline demo_qoe_training: uploaded", demo, DEMO_TIMEOUT)
        assert listening(port)
        demo.send_signal(signum)
        demo.wait(60)
        deadline = time.monotonic() + 30
        while listening(port):
            assert time.monotonic() < deadline, "the server outlived the demo that started it"
            time.sleep(0.2)
    assert demo.returncode == 128 + signum


def test_a_served_service_with_tokens_and_the_demo_that_sends_one(tmp_path):
    """TM_AUTH=token end to end: tokens made with the command, the real server, the demo without a token, with a
    reader's and with a writer's; the log has the principals and never a token."""
    data = tmp_path / "data"
    env = {"TM_DATA_DIR": str(data), "TM_WORKERS": "1", "TM_DATABASE_URL": "", "TM_AUTH": "token"}
    full_env = {**os.environ, **env}
    tokens = {}
    for name, role in (("demo", "writer"), ("viewer", "reader")):
        made = subprocess.run([sys.executable, "-m", "trainingmgr", "auth", "add-token", name, role], env=full_env,
                              capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        assert made.returncode == 0, made.stderr
        tokens[role] = made.stdout.strip()
    refused = subprocess.run([sys.executable, "-m", "trainingmgr", "serve", "--demo"], env=full_env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert refused.returncode == 1 and "TM_TOKEN" in refused.stderr, "serve --demo needs the demo's token first"
    port = free_port()
    url = f"http://127.0.0.1:{port}"

    def demo(token: str | None) -> subprocess.CompletedProcess:
        argv = [sys.executable, "-m", "trainingmgr", "demo", "--url", url, "--timeout", "300"]
        return subprocess.run(argv, env={**full_env, **({"TM_TOKEN": token} if token else {})}, cwd=tmp_path,
                              capture_output=True, text=True, timeout=DEMO_TIMEOUT, stdin=subprocess.DEVNULL)

    with served(tmp_path, port, env) as server:
        assert_ready(url, server, 120, tmp_path / "server.log")
        anonymous = demo(None)
        assert anonymous.returncode == 1 and "401" in anonymous.stdout + anonymous.stderr
        assert "pass --token or set TM_TOKEN" in anonymous.stdout + anonymous.stderr
        reader = demo(tokens["reader"])
        assert reader.returncode == 1 and "403" in reader.stdout + reader.stderr
        writer = demo(tokens["writer"])
        assert writer.returncode == 0, writer.stdout + writer.stderr
        assert "retrained: artifact 1.0.0 -> 1.1.0" in writer.stdout
    log = (tmp_path / "server.log").read_text()
    assert '"principal": "demo"' in log and '"principal": "viewer"' in log
    assert "without authentication" not in log
    assert not any(token in log for token in tokens.values())


def test_an_open_service_on_a_network_address_warns_at_start(tmp_path):
    port = free_port()
    env = {"TM_DATA_DIR": str(tmp_path / "data"), "TM_WORKERS": "1", "TM_DATABASE_URL": "", "TM_HOST": "0.0.0.0"}
    with served(tmp_path, port, env) as server:
        assert_ready(f"http://127.0.0.1:{port}", server, 120, tmp_path / "server.log")
    warnings = [json.loads(line) for line in (tmp_path / "server.log").read_text().splitlines()
                if line.startswith("{") and "without authentication" in line]
    assert [w["level"] for w in warnings] == ["WARNING"]
    assert "0.0.0.0" in warnings[0]["message"] and "Securing the service" in warnings[0]["message"]
