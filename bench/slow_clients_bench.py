"""Slow clients against `serve`: how long /healthz and GET of the job list take while N uploads stall.

Runs the service twice on SQLite in a temporary folder, each time with 2 workers x 4 threads: once as `serve` runs
it (trainingmgr.http_worker.RequestBufferingWorker) and once with gunicorn's plain gthread worker (what `serve` ran
before issue 9). For each, N connections send a head announcing `Content-Length: 100000` and 5 bytes of body, then
stall; then GET /healthz and GET /ai-ml-model-training/v1/training-jobs are timed 10 times each (5 s timeout, a
timeout counts as 5 s). Also prints when the stalled connections were closed (TM_REQUEST_READ_TIMEOUT=5 here).

    .venv/bin/python bench/slow_clients_bench.py [--stalled 50]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.processes import assert_ready, free_port, started  # noqa: E402

READ_TIMEOUT = 5
PLAIN_GTHREAD = """
import sys
from trainingmgr.config import Settings
from trainingmgr.serving import gunicorn_application
app = gunicorn_application(Settings.from_env())
app.cfg.set("worker_class", "gthread")
sys.argv = ["gunicorn"]
app.run()
"""


@contextlib.contextmanager
def server(kind: str, folder: Path) -> Iterator[str]:
    port = free_port()
    env = {**os.environ, "TM_HOST": "127.0.0.1", "TM_PORT": str(port), "TM_WORKERS": "2", "TM_THREADS": "4",
           "TM_DATA_DIR": str(folder / "data"), "TM_DATABASE_URL": "", "TM_LOG_LEVEL": "WARNING",
           "TM_REQUEST_READ_TIMEOUT": str(READ_TIMEOUT)}
    subprocess.run([sys.executable, "-m", "trainingmgr", "db", "upgrade"], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    argv = [sys.executable, "-m", "trainingmgr", "serve"] if kind == "serve" else [sys.executable, "-c", PLAIN_GTHREAD]
    log = folder / f"{kind}.log"
    with started(argv, log_path=log, env=env) as process:
        url = f"http://127.0.0.1:{port}"
        assert_ready(url, process, 120, log)
        yield url


def timed_gets(url: str, path: str, times: int = 10) -> list[float]:
    out = []
    for _ in range(times):
        started = time.monotonic()
        try:
            ok = requests.get(url + path, timeout=5).status_code == 200
        except requests.RequestException:
            ok = False
        out.append(time.monotonic() - started if ok else 5.0)
    return out


def measure(kind: str, stalled: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp, server(kind, Path(tmp)) as url:
        port = int(url.rsplit(":", 1)[1])
        idle = timed_gets(url, "/healthz")
        socks = []
        try:
            for _ in range(stalled):
                sock = socket.create_connection(("127.0.0.1", port), timeout=30)
                sock.sendall(b"POST /ai-ml-model-training/v1/training-jobs HTTP/1.1\r\nHost: x\r\n"
                             b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{\"a\":")
                socks.append(sock)
            time.sleep(0.5)
            health = timed_gets(url, "/healthz")
            jobs = timed_gets(url, "/ai-ml-model-training/v1/training-jobs")
            started = time.monotonic()
            closed = 0
            for sock in socks:
                sock.settimeout(max(0.1, READ_TIMEOUT + 10 - (time.monotonic() - started)))
                with contextlib.suppress(OSError):
                    while sock.recv(65536):
                        pass
                    closed += 1
            closed_after = time.monotonic() - started
        finally:
            for sock in socks:
                sock.close()
    return {"idle": idle, "health": health, "jobs": jobs, "closed": closed, "closed_after": closed_after}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stalled", type=int, default=50)
    args = parser.parse_args()
    print(f"{args.stalled} stalled uploads, 2 workers x 4 threads, SQLite; latency of 10 GETs each "
          "(a timeout counts as 5 s)")
    print(f"{'server':<26} {'idle healthz':>14} {'healthz med/max':>18} {'job list med/max':>18} "
          f"{'stalled closed':>16}")
    for kind, label in (("gthread", "plain gthread (before)"), ("serve", "serve (after)")):
        r = measure(kind, args.stalled)
        fmt = lambda xs: f"{statistics.median(xs) * 1000:7.1f}/{max(xs) * 1000:7.1f} ms"  # noqa: E731
        closed = f"{r['closed']}/{args.stalled} in {r['closed_after']:.1f} s"
        print(f"{label:<26} {statistics.median(r['idle']) * 1000:11.1f} ms {fmt(r['health']):>18} "
              f"{fmt(r['jobs']):>18} {closed:>16}")


if __name__ == "__main__":
    main()
