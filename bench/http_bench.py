"""HTTP read benchmark: the service under gunicorn against PostgreSQL, side by side with the limit proxy.

Usage: .venv/bin/python bench/http_bench.py [--workers 1,4] [--connections 1,16] [--duration 10] [--rounds 1]
                                            [--jobs 10000] [--small-jobs 100] [--threads T]

What it does (everything on 127.0.0.1; every loop bounded in time and count; every process it started is stopped
and both databases dropped at the end, also on error or Ctrl-C):
  1. creates two fresh PostgreSQL databases on --pg-url (default: TM_TEST_POSTGRES_URL, else
     postgresql+psycopg2://postgres@127.0.0.1:5432/postgres), migrates them with `python -m trainingmgr db upgrade`
     and loads a feature group (through the API, in-process), a model and --jobs (10,000) finished training-job
     rows into the first, --small-jobs (100) into the second (bulk INSERT through SQLAlchemy core);
  2. counts the SQL statements of one request in-process (create_app on the same database, a
     `before_cursor_execute` counter, Flask's test client), with the pool check-outs
     and transactions beside them;
  3. for each --workers N: starts `python -m trainingmgr serve` on each database (TM_WORKERS=N, TM_THREADS=T,
     TM_EMBEDDED_WORKER=false, TM_LOG_LEVEL=WARNING) and bench/limit_proxy.py with the same gunicorn settings,
     then, for each connection count, loads every scenario in turn (the proxy first) with wrk (or, when wrk is
     missing, a small Python keep-alive load generator) for --duration seconds after a 1 s warm-up; with
     --rounds R it does that R times and keeps each scenario's median round;
  4. prints one table: scenario, workers, connections, req/s, p50, p99, non-2xx/socket errors, the ratio of the
     req/s to the limit proxy's at the same workers and connections, and the server's CPU time per request (user +
     system of all its processes from /proc/<pid>/stat, over the measured seconds); then the service's RSS (sum over its
     gunicorn master and workers, from /proc) at its peak during the load and after it, and the figures the
     targets of docs/performance.md are stated in.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

HOST = "127.0.0.1"  # all traffic stays on this machine
JOBS = "/ai-ml-model-training/v1/training-jobs"
FG = "/ai-ml-model-training/v1/featureGroup"
FG_NAME = "cell_kpis"
SECRET = "http-bench-secret"
MAX_REQUESTS = 5_000_000  # the Python load generator's bound per scenario, beside the time bound
START_TIMEOUT = 90.0  # seconds a server may take to become ready


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------- processes
class Processes:
    """Every process this run starts, each in a session (process group) of its own, stopped at the end."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, argv: list[str], env: dict[str, str], logfile: Path) -> subprocess.Popen:
        out = open(logfile, "ab")
        try:
            proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            out.close()
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen, timeout: float = 35.0) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)  # the group of the process we started: master and workers
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        # Workers left behind by a killed master are still in its group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in list(self.procs):
            with contextlib.suppress(Exception):
                self.stop(proc)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_ready(proc: subprocess.Popen, port: int, path: str, logfile: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; its log:\n{logfile.read_text()[-3000:]}")
        with contextlib.suppress(OSError):
            if http_get(port, path, timeout=2)[0] == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"server on port {port} not ready after {START_TIMEOUT:.0f} s; log:\n"
                       f"{logfile.read_text()[-3000:]}")


def process_tree(pid: int) -> list[int]:
    """pid and its descendants (gunicorn master and its workers), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo and len(tree) < 1000:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    return tree


def memory_mb(pid: int) -> tuple[float, float]:
    """(sum of VmRSS, sum of Pss) in MB over the process tree."""
    rss = pss = 0
    for p in process_tree(pid):
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss += int(line.split()[1])
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1])
    return rss / 1024, pss / 1024


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of the process tree so far (gunicorn master and workers), from /proc/<pid>/stat."""
    ticks = 0
    for p in process_tree(pid):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


class PeakMemory:
    """Samples a process tree's memory every 0.5 s in a thread while the load runs."""

    def __init__(self, pid: int):
        self.pid, self.peak_rss, self.peak_pss = pid, 0.0, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            rss, pss = memory_mb(self.pid)
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(5)


# ----------------------------------------------------------------------------------------------- databases
def admin_connect(pg_url: str) -> Any:
    import psycopg2

    conn = psycopg2.connect(pg_url.replace("postgresql+psycopg2://", "postgresql://", 1))
    conn.autocommit = True
    return conn


def db_url(pg_url: str, name: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(pg_url).set(database=name).render_as_string(hide_password=False)


def create_database(pg_url: str, name: str) -> None:
    conn = admin_connect(pg_url)
    try:
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
    finally:
        conn.close()


def drop_database(pg_url: str, name: str) -> None:
    conn = admin_connect(pg_url)
    try:
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        conn.close()


def service_env(url: str, data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TM_")}
    env.update({"TM_DATABASE_URL": url, "TM_DATA_DIR": str(data_dir), "TM_SECRET_KEY": SECRET,
                "TM_LOG_LEVEL": "WARNING", "TM_EMBEDDED_WORKER": "false", "TM_HOST": HOST,
                "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def migrate(url: str, data_dir: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "trainingmgr", "db", "upgrade"], cwd=ROOT,
                            env=service_env(url, data_dir), capture_output=True, text=True, timeout=180)
    if result.returncode != 0:
        raise RuntimeError(f"db upgrade failed:\n{result.stdout}\n{result.stderr}")


def training_config(i: int) -> dict[str, Any]:
    return {
        "description": "QoE prediction for cell S1/B13: retrained nightly on the last week of cell KPIs",
        "dataPipeline": {
            "feature_group_name": FG_NAME,
            "query_filter": "cellId = 'S1/B13/C1' AND prbUsageDl > 20",
            "arguments": {"epochs": "10", "batch_size": "64", "learning_rate": "0.001",
                          "trainingjob_name": f"qoe_model_{i}", "window": "7d"},
        },
        "trainingPipeline": {"pipeline_name": "qoe_training", "pipeline_version": "1",
                             "retraining_pipeline_name": "qoe_retraining", "retraining_pipeline_version": "1"},
    }


def job_rows(count: int, model_id: int, fg_id: int) -> list[dict[str, Any]]:
    from trainingmgr.models import lifecycle as lc

    rng = random.Random(count)
    start = datetime.now(timezone.utc) - timedelta(minutes=10 * count)
    rows = []
    for i in range(count):
        created = start + timedelta(minutes=10 * i)
        run_started = created + timedelta(seconds=3 + rng.random() * 5)
        run_ended = run_started + timedelta(seconds=60 + rng.random() * 240)
        finished = run_ended + timedelta(seconds=1 + rng.random() * 2)
        artifact = f"1.{i}.0"
        # Each step's times, as the state machine writes them for a finished job (a list shows them all).
        moments = [created + timedelta(seconds=1), created + timedelta(seconds=2), run_started, run_ended,
                   finished - timedelta(milliseconds=50), finished]
        step_times = {}
        for step, begin, end in zip(lc.STEPS, moments, moments[1:]):
            step_times[step] = {"started_at": begin.isoformat(), "ended_at": end.isoformat(),
                                "seconds": lc.step_seconds(begin.isoformat(), end.isoformat())}
        rows.append({
            "model_id": model_id, "feature_group_id": fg_id, "artifact_version": artifact,
            "is_retraining": i > 0, "training_config": training_config(i),
            "model_location": None, "training_dataset": None, "validation_dataset": None,
            "notification_url": "http://rapp-qoe.smo.svc:8080/trainingjob/notification",
            "consumer_rapp_id": "rapp-qoe-consumer", "producer_rapp_id": "rapp-qoe-producer",
            "steps_state": {s: lc.FINISHED for s in lc.STEPS}, "status": lc.FINISHED,
            "run_id": str(uuid.UUID(int=rng.getrandbits(128))),
            "model_url": f"http://trainingmgr.smo.svc:32002/model/qoe_model/1/{artifact}/Model.zip",
            "metrics": {"accuracy": round(0.85 + rng.random() * 0.1, 4), "loss": round(rng.random() * 0.3, 4),
                        "rmse": round(rng.random() * 2, 4), "mae": round(rng.random(), 4)},
            "failure_reason": None, "deletion_in_progress": False, "pipeline_version_id": None,
            "run_started_at": run_started, "run_ended_at": run_ended, "started_at": created + timedelta(seconds=1),
            "finished_at": finished, "step_times": step_times,
            "created_at": created, "updated_at": finished,
        })
    return rows


@dataclass
class Loaded:
    url: str
    app: Any
    ids: tuple[int, int]  # smallest and largest job id
    jobs: int


def load_database(url: str, data_dir: Path, jobs: int) -> Loaded:
    """A feature group through the API, a model and `jobs` finished jobs by bulk INSERT."""
    from sqlalchemy import func, insert, select, text

    from trainingmgr import create_app
    from trainingmgr.config import Settings
    from trainingmgr.extensions import db
    from trainingmgr.models import FeatureGroup, Model, TrainingJob
    from tests.factories import feature_group_body

    settings = Settings(database_url=url, data_dir=str(data_dir), secret_key=SECRET, log_level="WARNING",
                        embedded_worker=False)
    app = create_app(settings)
    client = app.test_client()
    r = client.post(FG, json=feature_group_body(FG_NAME))
    if r.status_code != 201:
        raise RuntimeError(f"feature group not created: {r.status_code} {r.get_data(as_text=True)}")
    started = time.perf_counter()
    with app.app_context():
        with db.engine.begin() as conn:
            fg_id = conn.scalar(select(FeatureGroup.id).where(FeatureGroup.name == FG_NAME))
            now = datetime.now(timezone.utc)
            model_id = conn.execute(
                insert(Model).values(modelname="qoe_model", modelversion="1", model_location=None,
                                     training_count=jobs, created_at=now, updated_at=now).returning(Model.id)
            ).scalar_one()
            rows = job_rows(jobs, model_id, fg_id)
            for i in range(0, len(rows), 2000):
                conn.execute(insert(TrainingJob), rows[i:i + 2000])
        with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE"))
            lo, hi, n = conn.execute(select(func.min(TrainingJob.id), func.max(TrainingJob.id),
                                            func.count()).select_from(TrainingJob)).one()
    log(f"loaded {n} jobs into {url.rsplit('/', 1)[1]} in {time.perf_counter() - started:.1f} s")
    return Loaded(url, app, (lo, hi), n)


# ----------------------------------------------------------------------------------------------- SQL counts
@dataclass
class SqlCount:
    statements: int
    checkouts: int  # pool check-outs (a pre-ping round trip each, before issue 12 dropped pool_pre_ping)
    transactions: int  # BEGIN ... COMMIT/ROLLBACK sent: two round trips each on psycopg2 (0 in autocommit)
    status: int
    body_bytes: int


def count_sql(app: Any, path: str, repeat: int = 3) -> SqlCount:
    """Statements the request sends, counted in-process (the last of `repeat` identical requests)."""
    from sqlalchemy import event

    from trainingmgr.extensions import db

    counts = {"statements": 0, "checkouts": 0, "transactions": 0}

    def on_statement(*_: Any) -> None:
        counts["statements"] += 1

    def on_checkout(*_: Any) -> None:
        counts["checkouts"] += 1

    def on_begin(conn: Any) -> None:
        # A read-only request's connection is in autocommit (see create_app): no BEGIN/ROLLBACK goes out.
        if not conn.connection.dbapi_connection.autocommit:
            counts["transactions"] += 1

    with app.app_context():
        engine = db.engine
    client = app.test_client()
    event.listen(engine, "before_cursor_execute", on_statement)
    event.listen(engine.pool, "checkout", on_checkout)
    event.listen(engine, "begin", on_begin)
    try:
        for _ in range(repeat):
            for key in counts:
                counts[key] = 0
            response = client.get(path)
            status, size = response.status_code, len(response.get_data())
    finally:
        event.remove(engine, "before_cursor_execute", on_statement)
        event.remove(engine.pool, "checkout", on_checkout)
        event.remove(engine, "begin", on_begin)
    return SqlCount(counts["statements"], counts["checkouts"], counts["transactions"], status, size)


# ----------------------------------------------------------------------------------------------- load
@dataclass
class Result:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int  # non-2xx/3xx answers, socket errors and timeouts
    cpu_ms: float = 0.0  # the server's CPU time per request (all its processes, from /proc)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


@dataclass
class Target:
    """What a scenario requests: a fixed path, prefix + an id spread over [lo, hi] + suffix, or one of `paths`."""
    port: int
    prefix: str
    suffix: str = ""
    ids: tuple[int, int] | None = None
    paths: tuple[str, ...] = ()

    def path(self, rng: random.Random) -> str:
        if self.paths:
            return rng.choice(self.paths)
        if self.ids is None:
            return self.prefix
        return f"{self.prefix}{rng.randint(*self.ids)}{self.suffix}"


WRK_SCRIPT = r"""
local lo, hi = %(lo)d, %(hi)d
local prefix, suffix = "%(prefix)s", "%(suffix)s"
local paths = {%(paths)s}
local threads = 0
setup = function(thread)
  threads = threads + 1
  thread:set("tid", threads)
end
init = function(args)
  math.randomseed(os.time() * 100 + tid)
end
request = function()
  if #paths > 0 then
    return wrk.format("GET", paths[math.random(#paths)])
  end
  if hi > 0 then
    return wrk.format("GET", prefix .. math.random(lo, hi) .. suffix)
  end
  return wrk.format("GET", prefix)
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH_RESULT {\"requests\": %%d, \"duration_us\": %%d, \"p50_us\": %%d, \"p99_us\": %%d, \"errors\": %%d}\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.status + e.timeout))
end
"""


def run_wrk(target: Target, connections: int, seconds: float, workdir: Path) -> Result:
    lo, hi = target.ids or (0, 0)
    script = workdir / f"wrk_{target.port}_{abs(hash((target.prefix, target.suffix, target.paths))) % 10**8}.lua"
    script.write_text(WRK_SCRIPT % {"lo": lo, "hi": hi, "prefix": target.prefix, "suffix": target.suffix,
                                    "paths": ", ".join(f'"{path}"' for path in target.paths)})
    threads = max(1, min(connections, os.cpu_count() or 1, 4))
    argv = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{max(1, round(seconds))}s",
            "--timeout", "10s", "-s", str(script), f"http://{HOST}:{target.port}/"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    for line in out.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            d = json.loads(line[len("BENCH_RESULT "):])
            return Result(d["requests"], d["duration_us"] / 1e6, d["p50_us"] / 1000, d["p99_us"] / 1000,
                          d["errors"])
    raise RuntimeError(f"wrk gave no result: {out.stdout}\n{out.stderr}")


def run_python(target: Target, connections: int, seconds: float, workdir: Path) -> Result:
    """Fallback load generator: one thread per connection, http.client keep-alive, bounded in time and count."""
    import http.client

    deadline = time.monotonic() + seconds
    lock = threading.Lock()
    latencies: list[float] = []
    state = {"requests": 0, "errors": 0}

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        mine: list[float] = []
        errors = 0
        conn = http.client.HTTPConnection(HOST, target.port, timeout=10)
        try:
            while time.monotonic() < deadline and len(mine) + errors < MAX_REQUESTS // connections:
                t0 = time.perf_counter()
                try:
                    conn.request("GET", target.path(rng))
                    response = conn.getresponse()
                    response.read()
                    if response.status >= 400:
                        errors += 1
                    mine.append(time.perf_counter() - t0)
                except (OSError, http.client.HTTPException):
                    errors += 1
                    conn.close()
                    conn = http.client.HTTPConnection(HOST, target.port, timeout=10)
                    time.sleep(0.01)
        finally:
            conn.close()
        with lock:
            latencies.extend(mine)
            state["requests"] += len(mine)
            state["errors"] += errors

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 30)
    elapsed = time.perf_counter() - started
    if not latencies:
        return Result(0, elapsed, 0.0, 0.0, state["errors"])
    latencies.sort()
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000  # noqa: E731
    return Result(state["requests"], elapsed, pick(0.50), pick(0.99), state["errors"])


def median(results: list[Result]) -> Result:
    """The round with the median rate (the lower one of two), its latencies with it; errors summed."""
    ordered = sorted(results, key=lambda r: r.rps)
    mid = ordered[(len(ordered) - 1) // 2]
    cpu = sorted(r.cpu_ms for r in results)[(len(results) - 1) // 2]
    return Result(mid.requests, mid.seconds, mid.p50_ms, mid.p99_ms, sum(r.errors for r in results), cpu)


# ----------------------------------------------------------------------------------------------- servers
@dataclass
class Servers:
    workers: int
    service: subprocess.Popen
    service_port: int
    small: subprocess.Popen
    small_port: int
    proxy: subprocess.Popen
    proxy_port: int


def start_servers(procs: Processes, big: Loaded, small: Loaded, workers: int, threads: int,
                  workdir: Path) -> Servers:
    started = []
    specs = []
    for name, loaded in (("service", big), ("small", small)):
        port = free_port()
        logfile = workdir / f"{name}_w{workers}.log"
        env = service_env(loaded.url, workdir / f"data_{name}", TM_PORT=str(port), TM_WORKERS=str(workers),
                          TM_THREADS=str(threads))
        proc = procs.start([sys.executable, "-m", "trainingmgr", "serve"], env, logfile)
        started.append((proc, port))
        specs.append((proc, port, "/readyz", logfile))
    port = free_port()
    logfile = workdir / f"proxy_w{workers}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TM_")}
    env["LIMIT_PROXY_DSN"] = big.url
    proc = procs.start([sys.executable, str(ROOT / "bench" / "limit_proxy.py"), "--host", HOST, "--port", str(port),
                        "--workers", str(workers), "--threads", str(threads)], env, logfile)
    started.append((proc, port))
    specs.append((proc, port, "/hello", logfile))
    for proc, port, path, logfile in specs:
        wait_ready(proc, port, path, logfile)
    (svc, svc_port), (sml, sml_port), (prx, prx_port) = started
    return Servers(workers, svc, svc_port, sml, sml_port, prx, prx_port)


# ----------------------------------------------------------------------------------------------- main
@dataclass
class Row:
    scenario: str
    workers: int
    connections: int
    result: Result


def list_name(jobs: int) -> str:
    return f"GET job list ({jobs:,} jobs)"


def random_pages_name(jobs: int) -> str:
    return f"GET job list, random pages ({jobs:,} jobs)"


def random_pages(loaded: Loaded, count: int = 500) -> tuple[str, ...]:
    """Default pages (100 jobs) that start after a random job: across 10,000 jobs most of their jobs are not among
    those a web process last rendered (api/rendered_jobs.py keeps 2 MB, ~850 jobs), so most are rendered anew."""
    from trainingmgr.services.pagination import encode_cursor

    rng = random.Random(loaded.jobs)
    lo, hi = loaded.ids
    return tuple(f"{JOBS}?cursor={encode_cursor(rng.randint(lo + 100, hi + 1))}" for _ in range(count))


def scenarios(s: Servers, big: Loaded, small: Loaded, hello: bool) -> list[tuple[str, Target, str]]:
    """(name, target, what a successful answer must contain) in the order they are measured."""
    out = [
        ("limit proxy GET /job/<id>", Target(s.proxy_port, "/job/", ids=big.ids), '"id"'),
        ("GET one job", Target(s.service_port, f"{JOBS}/", ids=big.ids), '"steps_state"'),
        ("GET job status", Target(s.service_port, f"{JOBS}/", "/status", ids=big.ids), '"TRAINED_MODEL"'),
        ("GET one feature group", Target(s.service_port, f"{FG}/{FG_NAME}"), '"featuregroup_name"'),
        (list_name(big.jobs), Target(s.service_port, JOBS), '"steps_state"'),
        (random_pages_name(big.jobs), Target(s.service_port, JOBS, paths=random_pages(big)), '"steps_state"'),
        (list_name(small.jobs), Target(s.small_port, JOBS), '"steps_state"'),
    ]
    if hello:
        out.insert(1, ("limit proxy GET /hello (no DB)", Target(s.proxy_port, "/hello"), '"hello"'))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="1,4", help="gunicorn worker counts, comma-separated (default 1,4)")
    parser.add_argument("--connections", default="1,16", help="load connections, comma-separated (default 1,16)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per scenario (default 10)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="rounds of every scenario; the table shows each one's median round (default 1)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("TM_THREADS", "4")),
                        help="gunicorn threads per worker, both servers (default TM_THREADS or 4)")
    parser.add_argument("--jobs", type=int, default=10_000, help="training jobs in the big database")
    parser.add_argument("--small-jobs", type=int, default=100, help="training jobs in the small database")
    parser.add_argument("--pg-url", default=os.environ.get(
        "TM_TEST_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"),
        help="PostgreSQL server (a database on it to connect to for CREATE/DROP DATABASE)")
    parser.add_argument("--no-hello", action="store_true", help="skip the proxy's no-database /hello scenario")
    parser.add_argument("--python-load", action="store_true", help="use the Python load generator even with wrk")
    parser.add_argument("--keep-logs", action="store_true", help="keep the servers' logs (printed folder)")
    parser.add_argument("--json", type=Path, default=None, help="also write the table's figures to this file")
    args = parser.parse_args()
    worker_counts = [int(x) for x in args.workers.split(",") if x]
    conn_counts = [int(x) for x in args.connections.split(",") if x]
    if not (1 <= args.duration <= 120) or not all(1 <= c <= 256 for c in conn_counts) \
            or not all(1 <= w <= 32 for w in worker_counts) or not (1 <= args.jobs <= 1_000_000) \
            or not (1 <= args.small_jobs <= args.jobs) or not (1 <= args.rounds <= 10):
        parser.error("bounds: 1-120 s, 1-256 connections, 1-32 workers, 1-1,000,000 jobs, 1-10 rounds")

    if args.python_load or shutil.which("wrk") is None:
        if not args.python_load:
            log("wrk not found: install it with `apt-get install -y wrk` (Debian/Ubuntu) for the reference figures;"
                " falling back to the Python load generator (its own CPU use lowers the rates)")
        load, tool = run_python, "python http.client load generator"
    else:
        load, tool = run_wrk, "wrk"

    def on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    procs = Processes()
    workdir = Path(tempfile.mkdtemp(prefix="tm_http_bench_"))
    tag = f"tm_http_bench_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    databases = [f"{tag}_big", f"{tag}_small"]
    created: list[str] = []
    loaded: list[Loaded] = []
    rows: list[Row] = []
    memory: list[tuple[int, float, float, float, float, float, float]] = []
    try:
        for name, jobs in zip(databases, (args.jobs, args.small_jobs)):
            create_database(args.pg_url, name)
            created.append(name)
            url = db_url(args.pg_url, name)
            data_dir = workdir / f"load_{name}"
            migrate(url, data_dir)
            loaded.append(load_database(url, data_dir, jobs))
        big, small = loaded

        # SQL statements per request, in-process against the same databases.
        mid = (big.ids[0] + big.ids[1]) // 2
        sql = [
            ("GET one job", count_sql(big.app, f"{JOBS}/{mid}")),
            ("GET job status", count_sql(big.app, f"{JOBS}/{mid}/status")),
            ("GET one feature group", count_sql(big.app, f"{FG}/{FG_NAME}")),
            (f"GET job list, default page ({args.jobs:,} jobs)", count_sql(big.app, JOBS)),
            (f"GET job list, ?limit=1000 ({args.jobs:,} jobs)", count_sql(big.app, f"{JOBS}?limit=1000")),
            (f"GET job list, default page ({args.small_jobs:,} jobs)", count_sql(small.app, JOBS)),
        ]

        for workers in worker_counts:
            log(f"starting the service (2 instances: {args.jobs} and {args.small_jobs} jobs) and the limit proxy, "
                f"{workers} worker(s) x {args.threads} threads")
            servers = start_servers(procs, big, small, workers, args.threads, workdir)
            try:
                with PeakMemory(servers.service.pid) as peak_svc, PeakMemory(servers.proxy.pid) as peak_proxy:
                    plan = scenarios(servers, big, small, not args.no_hello)
                    for name, target, expect in plan:
                        probe = target.path(random.Random(0))
                        status, body = http_get(target.port, probe, timeout=30)
                        if status != 200 or expect.encode() not in body:
                            raise RuntimeError(f"{name}: GET {probe} answered {status}: {body[:300]!r}")
                    # Each round runs every scenario at one connection count, the proxy first: the figures a
                    # ratio compares are measured minutes apart at most.
                    measured: dict[tuple[str, int], list[Result]] = {}
                    server_of = {servers.service_port: servers.service.pid, servers.small_port: servers.small.pid,
                                 servers.proxy_port: servers.proxy.pid}
                    for round_no in range(args.rounds):
                        for connections in conn_counts:
                            for name, target, _ in plan:
                                load(target, connections, 1.0, workdir)  # warm-up: pools, imports, caches
                                cpu_before = cpu_seconds(server_of[target.port])
                                result = load(target, connections, args.duration, workdir)
                                if result.requests:
                                    result.cpu_ms = (cpu_seconds(server_of[target.port]) - cpu_before) * 1000 \
                                        / result.requests
                                measured.setdefault((name, connections), []).append(result)
                                log(f"{name:32s} w{workers} c{connections:<3d} r{round_no + 1} {result.rps:8.1f} "
                                    f"req/s  p50 {result.p50_ms:7.2f} ms  p99 {result.p99_ms:7.2f} ms  "
                                    f"CPU {result.cpu_ms:5.2f} ms/req  errors {result.errors}")
                    for name, _, _ in plan:
                        for connections in conn_counts:
                            rows.append(Row(name, workers, connections, median(measured[(name, connections)])))
                rss, pss = memory_mb(servers.service.pid)
                proxy_rss, _ = memory_mb(servers.proxy.pid)
                memory.append((workers, peak_svc.peak_rss, rss, peak_svc.peak_pss, pss, peak_proxy.peak_rss,
                               proxy_rss))
            finally:
                for proc in (servers.service, servers.small, servers.proxy):
                    procs.stop(proc)

        report(rows, sql, memory, args, tool)
        if args.json:
            proxy = {(r.workers, r.connections): r.result.rps for r in rows
                     if r.scenario.startswith("limit proxy GET /job")}
            args.json.write_text(json.dumps({"rows": [
                {"scenario": r.scenario, "workers": r.workers, "connections": r.connections, "rps": r.result.rps,
                 "ratio": r.result.rps / proxy[(r.workers, r.connections)] if proxy.get((r.workers, r.connections))
                 else None, "cpu_ms": r.result.cpu_ms, "p50_ms": r.result.p50_ms, "p99_ms": r.result.p99_ms,
                 "errors": r.result.errors} for r in rows]}, indent=1))
        return 0
    finally:
        procs.stop_all()
        for item in loaded:
            with contextlib.suppress(Exception):
                from trainingmgr.extensions import db

                with item.app.app_context():
                    db.engine.dispose()
        for name in created:
            try:
                drop_database(args.pg_url, name)
            except Exception as e:  # noqa: BLE001
                log(f"could not drop database {name}: {e}")
        if args.keep_logs:
            log(f"server logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def report(rows: list[Row], sql: list[tuple[str, SqlCount]], memory: list, args: Any, tool: str) -> None:
    proxy = {(r.workers, r.connections): r.result.rps for r in rows if r.scenario.startswith("limit proxy GET /job")}
    print()
    rounds = f", median of {args.rounds} rounds" if args.rounds > 1 else ""
    print(f"HTTP read benchmark: {tool}, {args.duration:g} s per scenario after a 1 s warm-up{rounds}, gunicorn gthread "
          f"x {args.threads} threads, PostgreSQL, {os.cpu_count()} CPUs; "
          f"ratio = req/s / limit proxy GET /job/<id> req/s at the same workers and connections")
    header = f"{'scenario':34s} {'workers':>7s} {'conns':>5s} {'req/s':>9s} {'p50 ms':>8s} {'p99 ms':>8s} " \
             f"{'errors':>6s} {'ratio':>6s} {'CPU ms/req':>10s}"
    print(header)
    print("-" * len(header))
    for r in rows:
        base = proxy.get((r.workers, r.connections))
        ratio = f"{r.result.rps / base:6.2f}" if base else "     -"
        print(f"{r.scenario:34s} {r.workers:7d} {r.connections:5d} {r.result.rps:9.1f} {r.result.p50_ms:8.2f} "
              f"{r.result.p99_ms:8.2f} {r.result.errors:6d} {ratio} {r.result.cpu_ms:10.2f}")
    print()
    print(f"Service memory (sum over the gunicorn master and workers of the {args.jobs:,}-job instance, from /proc):")
    for workers, peak_rss, rss, peak_pss, pss, proxy_peak, proxy_rss in memory:
        print(f"  {workers} worker(s): RSS {rss:6.1f} MB after the load (peak {peak_rss:6.1f} MB); "
              f"PSS {pss:6.1f} MB (peak {peak_pss:6.1f} MB); limit proxy RSS {proxy_rss:6.1f} MB "
              f"(peak {proxy_peak:6.1f} MB)")
    print()
    print("SQL per request (in-process: create_app on the same database, before_cursor_execute counter, test client):")
    print(f"  {'request':46s} {'statements':>10s} {'checkouts':>9s} {'transactions':>12s} {'status':>6s} "
          f"{'body bytes':>10s}")
    for name, c in sql:
        print(f"  {name:46s} {c.statements:10d} {c.checkouts:9d} {c.transactions:12d} {c.status:6d} "
              f"{c.body_bytes:10d}")
    print("  (checkouts send nothing since issue 12 dropped pool_pre_ping; each transaction sent adds BEGIN and "
          "ROLLBACK round trips (GETs run in autocommit: none); the limit proxy sends 1 statement in autocommit: 1 round trip)")
    print()
    print("Against issue 12 (reads >= 0.8x the proxy at every connection count, <= 1.0 ms CPU; list <= 3 ms CPU):")
    by = {(r.scenario, r.workers, r.connections): r.result for r in rows}
    workers_seen = sorted({r.workers for r in rows})
    conns_seen = sorted({r.connections for r in rows})
    for name in ("GET one job", "GET job status", "GET one feature group"):
        parts = []
        for w in workers_seen:
            for c in conns_seen:
                res, base = by.get((name, w, c)), proxy.get((w, c))
                if res and base:
                    parts.append(f"w{w}/c{c} {res.rps / base:.2f}x")
        cpus = [f"w{w}/c{c} {by[(name, w, c)].cpu_ms:.2f}" for w in workers_seen for c in conns_seen
                if (name, w, c) in by]
        print(f"  {name:24s} >= 0.8x the proxy : {', '.join(parts)}; CPU ms/req <= 1.0: {', '.join(cpus)}")
    parts = []
    for w in workers_seen:
        for c in conns_seen:
            a = by.get((list_name(args.jobs), w, c))
            b = by.get((list_name(args.small_jobs), w, c))
            if a and b and b.p50_ms:
                parts.append(f"w{w}/c{c} {a.p50_ms / b.p50_ms:.2f}x")
    print(f"  job list p50 {args.jobs:,} / p50 {args.small_jobs:,} <= 2x : {', '.join(parts)}")
    cpus = [f"w{w}/c{c} {by[(list_name(args.jobs), w, c)].cpu_ms:.2f}" for w in workers_seen for c in conns_seen
            if (list_name(args.jobs), w, c) in by]
    print(f"  job list (default page) CPU ms/req <= 3 : {', '.join(cpus)}")
    cpus = [f"w{w}/c{c} {by[(random_pages_name(args.jobs), w, c)].cpu_ms:.2f}" for w in workers_seen
            for c in conns_seen if (random_pages_name(args.jobs), w, c) in by]
    print(f"  job list (random pages, mostly rendered anew) CPU ms/req: {', '.join(cpus)}")
    lists = [c.statements for n, c in sql if n.startswith("GET job list")]
    print(f"  job list SQL statements <= 3     : {', '.join(str(x) for x in lists)} "
          f"(default page at {args.jobs:,}, limit=1000, default page at {args.small_jobs:,})")
    peaks = ", ".join(f"w{m[0]} {m[1]:.0f} MB" for m in memory)
    print(f"  service RSS < 200 MB under load  : peak {peaks}")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt as e:
        log(f"interrupted ({e}); processes stopped and databases dropped")
        sys.exit(130)
