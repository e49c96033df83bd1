"""Open event streams against the API: `serve` (2 workers x 4 threads, SQLite), then GET /healthz and the job list
with no stream open and with N open streams (GET .../v1/events), how long a new job's first event takes to reach
every stream, and the server's memory (RSS of all its processes) before and after.

    .venv/bin/python bench/event_stream_bench.py              # 200 streams
    .venv/bin/python bench/event_stream_bench.py --streams 400
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.processes import free_port, ready_server  # noqa: E402

EVENTS = "/ai-ml-model-training/v1/events"
JOBS = "/ai-ml-model-training/v1/training-jobs"


def latencies(url: str, path: str, count: int = 30) -> tuple[float, float]:
    """Median and max milliseconds of `count` GETs (a timeout counts as 10 s)."""
    times = []
    for _ in range(count):
        started = time.perf_counter()
        try:
            requests.get(url + path, timeout=10).raise_for_status()
            times.append((time.perf_counter() - started) * 1000)
        except requests.RequestException:
            times.append(10_000.0)
    return statistics.median(times), max(times)


def server_rss_mb(port: int) -> float:
    """RSS of the processes whose command line is `trainingmgr serve` with this port in their environment."""
    total = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"trainingmgr" in cmdline and f"TM_PORT={port}".encode() in environ:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def open_streams(port: int, count: int) -> list[socket.socket]:
    streams = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        sock.sendall(f"GET {EVENTS} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        streams.append(sock)
    for sock in streams:
        read_until(sock, b"retry:")
    return streams


def read_until(sock: socket.socket, marker: bytes) -> None:
    seen = b""
    while marker not in seen:
        chunk = sock.recv(65536)
        if not chunk:
            raise SystemExit("a stream was closed by the server")
        seen += chunk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        port = free_port()
        env = {"TM_DATA_DIR": str(Path(folder) / "data"), "TM_WORKERS": "2", "TM_DATABASE_URL": "",
               "TM_MAX_EVENT_STREAMS": str(args.streams), "TM_LOG_LEVEL": "WARNING"}
        with ready_server(Path(folder), env, port=port) as url:
            figures = {"no stream": (latencies(url, "/healthz"), latencies(url, JOBS), server_rss_mb(port))}
            streams = open_streams(port, args.streams)
            try:
                figures[f"{args.streams} streams"] = (latencies(url, "/healthz"), latencies(url, JOBS),
                                                      server_rss_mb(port))
                fanout = first_event_everywhere(url, streams)
            finally:
                for sock in streams:
                    sock.close()
    print(f"serve: 2 workers x 4 threads, SQLite; {args.streams} open event streams")
    print(f"{'':14} {'/healthz median/max ms':>22} {'job list median/max ms':>23} {'server RSS MB':>14}")
    for name, ((h_med, h_max), (j_med, j_max), rss) in figures.items():
        print(f"{name:14} {h_med:10.1f} / {h_max:8.1f} {j_med:11.1f} / {j_max:8.1f} {rss:14.0f}")
    print(f"a new job's first event reached all {args.streams} streams {fanout * 1000:.0f} ms after its POST "
          "answered (the hub reads new events every 0.5 s)")


def first_event_everywhere(url: str, streams: list[socket.socket]) -> float:
    """Seconds from a job's creation until every stream has its first event."""
    body = {"featuregroup_name": "bench_fg", "feature_list": "a", "datalake_source": "CsvSource",
            "measurement": "cell_kpis.csv", "enable_dme": False}
    requests.post(url + "/ai-ml-model-training/v1/featureGroup", json=body, timeout=30)
    example = Path(__file__).resolve().parent.parent / "examples" / "pipelines" / "qoe_training.yaml"
    for name in ("bench_tr", "bench_re"):
        with example.open("rb") as f:
            requests.post(f"{url}/pipelines/{name}/upload", files={"file": ("p.yaml", f)}, timeout=30)
    job = {"model_id": {"modelname": "bench", "modelversion": "1"}, "training_config": {
        "description": "", "dataPipeline": {"feature_group_name": "bench_fg", "query_filter": "", "arguments": {}},
        "trainingPipeline": {"pipeline_name": "bench_tr", "pipeline_version": "latest",
                             "retraining_pipeline_name": "bench_re", "retraining_pipeline_version": "latest"}}}
    requests.post(url + JOBS, json=job, timeout=30).raise_for_status()
    created = time.perf_counter()
    for sock in streams:
        read_until(sock, b'"job_id": 1')
    return time.perf_counter() - created


if __name__ == "__main__":
    main()
