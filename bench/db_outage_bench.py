"""Database outage: what the service answers and how much it logs while its PostgreSQL is down (issue 9 item 4).

Usage: .venv/bin/python bench/db_outage_bench.py [--idle 20] [--requests 40] [--workers 1] [--worker-threads 4]

What it does (everything on 127.0.0.1; every wait bounded; the server and the cluster are stopped and the cluster's
folder removed at the end, also on error or Ctrl-C):
  1. initdb a PostgreSQL cluster of its own on a free port (tests/private_postgres.py) and migrate it;
  2. starts `python -m trainingmgr serve` on it (TM_WORKERS=--workers, embedded worker threads, default poll),
     and waits for /readyz;
  3. stops the cluster (fast shutdown) and, without any request, counts the server's log lines and bytes for
     --idle seconds (idle workers polling a database that is away);
  4. sends --requests requests (GETs of training jobs, a POST of a feature group, /readyz) and counts their statuses,
     Retry-After headers, content types and the log bytes they cost;
  5. starts the cluster again and measures how long until /readyz is 200 and a request succeeds.
"""
from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.private_postgres import private_cluster  # noqa: E402
from tests.processes import assert_ready, free_port, served  # noqa: E402

JOBS = "/ai-ml-model-training/v1/training-jobs"
FEATURE_GROUPS = "/ai-ml-model-training/v1/featureGroup"
# A valid feature group (the README's), so the POST gets past validation to the database.
FEATURE_GROUP = {"featuregroup_name": "outage_kpis", "datalake_source": "CsvSource", "measurement": "cell_kpis.csv",
                 "feature_list": "prbUsageDl,prbUsageUl", "enable_dme": False}


def log_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes() if path.exists() else b""
    return data.count(b"\n"), len(data)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--idle", type=float, default=20.0, help="seconds of outage measured without requests")
    parser.add_argument("--requests", type=int, default=40, help="requests sent during the outage")
    parser.add_argument("--workers", type=int, default=1, help="gunicorn worker processes (TM_WORKERS)")
    parser.add_argument("--worker-threads", type=int, default=4, help="TM_WORKER_THREADS")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="tm-outage-") as tmp, private_cluster() as cluster:
        tmp_path = Path(tmp)
        env = {"TM_DATABASE_URL": cluster.url, "TM_DATA_DIR": str(tmp_path / "data"), "TM_SECRET_KEY": "bench",
               "TM_WORKERS": str(args.workers), "TM_WORKER_THREADS": str(args.worker_threads),
               "TM_LOG_LEVEL": "INFO"}
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log = tmp_path / "server.log"
        with served(tmp_path, port, env) as server:
            assert_ready(url, server, 120, log)
            time.sleep(2)  # the workers' first polls
            lines0, bytes0 = log_size(log)
            stopped = time.monotonic()
            cluster.stop()
            time.sleep(max(0.0, args.idle - (time.monotonic() - stopped)))
            lines1, bytes1 = log_size(log)
            idle_lines, idle_bytes = lines1 - lines0, bytes1 - bytes0
            tracebacks_idle = log.read_bytes()[bytes0:bytes1].count(b"Traceback")
            worker_lines = [line for line in log.read_bytes()[bytes0:bytes1].decode(errors="replace").splitlines()
                            if "trainingmgr.workers" in line][:5]

            statuses: collections.Counter[str] = collections.Counter()
            with_retry_after = problem_json = 0
            started = time.monotonic()
            for i in range(args.requests):
                method, path = [("GET", JOBS), ("POST", FEATURE_GROUPS), ("GET", f"{JOBS}/1"), ("GET", "/readyz")][i % 4]
                r = requests.request(method, url + path, json=FEATURE_GROUP if method == "POST" else None, timeout=30)
                statuses[f"{method} {path} {r.status_code}"] += 1
                with_retry_after += "Retry-After" in r.headers
                problem_json += r.headers.get("Content-Type", "").startswith("application/problem+json")
            request_seconds = time.monotonic() - started
            lines2, bytes2 = log_size(log)
            tracebacks_requests = log.read_bytes()[bytes1:bytes2].count(b"Traceback")

            bytes3 = bytes2
            cluster.start()
            back = time.monotonic()
            deadline = back + 120
            ready_after = ok_after = None
            while time.monotonic() < deadline and (ready_after is None or ok_after is None):
                try:
                    if ready_after is None and requests.get(url + "/readyz", timeout=5).status_code == 200:
                        ready_after = time.monotonic() - back
                    if ok_after is None and requests.get(url + JOBS, timeout=5).status_code == 200:
                        ok_after = time.monotonic() - back
                except requests.RequestException:
                    pass
                time.sleep(0.1)
            time.sleep(min(35.0, max(0.0, back + 35 - time.monotonic())))  # the workers' longest backoff
            recovery_lines = [line for line in log.read_bytes()[bytes3:].decode(errors="replace").splitlines()
                              if "trainingmgr.workers" in line][:5]

        print(f"outage, no requests, {args.idle:.0f} s, {args.workers} server process(es) x "
              f"{args.worker_threads} worker threads:")
        print(f"  log: {idle_lines} lines, {idle_bytes} bytes ({idle_bytes / args.idle:.0f} B/s), "
              f"{tracebacks_idle} tracebacks")
        for line in worker_lines:
            print(f"    {line[:200]}")
        print(f"outage, {args.requests} requests in {request_seconds:.1f} s:")
        for key, count in sorted(statuses.items()):
            print(f"  {key}: {count}")
        print(f"  with Retry-After: {with_retry_after}/{args.requests}; application/problem+json: "
              f"{problem_json}/{args.requests}")
        print(f"  log: {lines2 - lines1} lines, {bytes2 - bytes1} bytes "
              f"({(bytes2 - bytes1) / max(1, args.requests):.0f} B/request), {tracebacks_requests} tracebacks")
        print(f"database back: /readyz 200 after {ready_after if ready_after is None else round(ready_after, 2)} s, "
              f"GET jobs 200 after {ok_after if ok_after is None else round(ok_after, 2)} s")
        for line in recovery_lines:
            print(f"    {line[:200]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
