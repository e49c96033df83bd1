"""The yardstick of docs/performance.md: the most this stack (Flask + gunicorn + psycopg2 + PostgreSQL) can do.

A bare Flask app -- no ORM, no schema layer, no request logging -- that answers
  GET /job/<id>   one primary-key SELECT of the training_jobs row, the row as JSON (404 when absent)
  GET /hello      no database at all
through psycopg2 on a pool that KEEPS its connections (one per gunicorn thread, autocommit, created in each
worker after the fork; psycopg2's ThreadedConnectionPool(1, N) would close every connection above its minimum on
return). It is served by gunicorn with the service's settings (trainingmgr/cli.py): gthread worker class,
TM_WORKERS processes x TM_THREADS threads, timeout 120, graceful_timeout 30, no access log (and no gunicorn
control socket, which does not touch requests).

Usage:
  LIMIT_PROXY_DSN=postgresql://postgres@127.0.0.1:5432/DB python bench/limit_proxy.py [--host 127.0.0.1]
      [--port 32099] [--workers N] [--threads T]
LIMIT_PROXY_DSN is a libpq DSN or URL (a SQLAlchemy URL's "+psycopg2" is accepted and dropped); --workers and
--threads default to TM_WORKERS / TM_THREADS, else 2 / 4 (http_bench's setting; the service's default is 1 / 8).
"""
from __future__ import annotations

import argparse
import os
import queue
import threading
from contextlib import contextmanager
from typing import Any, Iterator

import psycopg2
from flask import Flask

JOB_SQL = "SELECT * FROM training_jobs WHERE id = %s"


def libpq_dsn(url: str) -> str:
    """A libpq DSN from a SQLAlchemy URL too (postgresql+psycopg2://... -> postgresql://...)."""
    return url.replace("postgresql+psycopg2://", "postgresql://", 1)


class KeepingPool:
    """A fixed set of connections handed out through a queue: never closed on return, thread-safe.

    A connection that broke (the server restarted, ...) is replaced by a fresh one when it is returned.
    """

    def __init__(self, dsn: str, size: int, timeout: float = 10.0):
        self._dsn = dsn
        self._timeout = timeout
        self._idle: "queue.LifoQueue[Any]" = queue.LifoQueue()
        for _ in range(size):
            self._idle.put(self._connect())

    def _connect(self) -> Any:
        conn = psycopg2.connect(self._dsn)
        conn.autocommit = True  # one round trip per SELECT: no BEGIN, no ROLLBACK
        return conn

    @contextmanager
    def connection(self) -> Iterator[Any]:
        conn = self._idle.get(timeout=self._timeout)
        try:
            yield conn
        except (psycopg2.OperationalError, psycopg2.InterfaceError):
            try:
                conn.close()
            finally:
                conn = self._connect()
            raise
        finally:
            self._idle.put(conn)

    def close(self) -> None:
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return


def create_app(dsn: str, pool_size: int) -> Flask:
    app = Flask(__name__)
    app.json.sort_keys = False
    pool = KeepingPool(dsn, pool_size)
    app.extensions["limit_proxy_pool"] = pool

    @app.get("/job/<int:job_id>")
    def get_job(job_id: int):
        with pool.connection() as conn, conn.cursor() as cur:
            cur.execute(JOB_SQL, (job_id,))
            row = cur.fetchone()
            names = [d.name for d in cur.description]
        if row is None:
            return {"detail": f"job {job_id} not found"}, 404
        # json columns arrive parsed (psycopg2's json typecaster); datetimes are serialised by Flask.
        return dict(zip(names, row))

    @app.get("/hello")
    def hello():
        return {"hello": "world"}

    return app


def serve(host: str, port: int, workers: int, threads: int, dsn: str) -> None:
    from gunicorn.app.base import BaseApplication

    class Server(BaseApplication):
        def load_config(self) -> None:
            # The service's gunicorn settings (trainingmgr/cli.py serve).
            self.cfg.set("bind", f"{host}:{port}")
            self.cfg.set("workers", workers)
            self.cfg.set("threads", threads)
            self.cfg.set("worker_class", "gthread")
            self.cfg.set("timeout", 120)
            self.cfg.set("graceful_timeout", 30)
            self.cfg.set("accesslog", None)
            # gunicorn >= 25 opens a control socket at ~/.gunicorn/gunicorn.ctl by default, one path shared by
            # every server of the user: the yardstick keeps out of it (no effect on request handling).
            if "control_socket_disable" in self.cfg.settings:
                self.cfg.set("control_socket_disable", True)

        def load(self) -> Any:
            # In each worker after the fork: its own connections, one per thread.
            return create_app(dsn, threads)

    Server().run()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=32099)
    parser.add_argument("--workers", type=int, default=int(os.environ.get("TM_WORKERS", "2")))
    parser.add_argument("--threads", type=int, default=int(os.environ.get("TM_THREADS", "4")))
    args = parser.parse_args()
    dsn = os.environ.get("LIMIT_PROXY_DSN")
    if not dsn:
        parser.error("set LIMIT_PROXY_DSN, e.g. postgresql://postgres@127.0.0.1:5432/trainingmgr")
    print(f"limit proxy serving on http://{args.host}:{args.port} ({args.workers} workers x {args.threads} threads)",
          flush=True)
    serve(args.host, args.port, args.workers, args.threads, libpq_dsn(dsn))


if __name__ == "__main__":
    main()
