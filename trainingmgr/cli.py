"""Command line: `trainingmgr serve | db ... | routes` (also `python -m trainingmgr ...`)."""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import click
from flask import current_app
from flask.cli import FlaskGroup, with_appcontext

from . import create_app
from .config import Settings, SettingsError


def _create_app() -> Any:
    from .schema import enable_migrations

    app = create_app()
    enable_migrations(app)  # the `db` commands
    return app


@click.group(cls=FlaskGroup, create_app=_create_app, add_version_option=False, load_dotenv=False)
def cli() -> None:
    """Training Manager of the O-RAN AI/ML framework."""


def upgrade_database_in_child() -> None:
    """`trainingmgr db upgrade` in a process of its own: the gunicorn master stays small (no app, no Alembic), so
    the workers it forks do not each carry a copy of what only the migration needed."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "trainingmgr", "db", "upgrade"], stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise click.ClickException("the database schema could not be brought up to date (its error is above)")


@cli.command("serve", with_appcontext=False)  # the master builds no app: see upgrade_database_in_child
@click.option("--host", default=None, help="Address to listen on (TM_HOST).")
@click.option("--port", type=int, default=None, help="Port to listen on (TM_PORT).")
@click.option("--workers", type=int, default=None, help="gunicorn worker processes (TM_WORKERS).")
@click.option("--demo", is_flag=True, help="Once serving, train the bundled example end to end through the API.")
def serve(host: str | None, port: int | None, workers: int | None, demo: bool) -> None:
    """Bring the database schema up to date, then serve with gunicorn."""
    from gunicorn.app.base import BaseApplication

    try:
        settings = Settings.from_env()
        overrides = {k: v for k, v in {"host": host, "port": port, "workers": workers}.items() if v is not None}
        settings = settings.replace(**overrides)
        settings.validate()
    except SettingsError as e:
        raise click.ClickException(str(e)) from None
    # Once, before any worker starts: workers never race on the schema.
    upgrade_database_in_child()

    class Server(BaseApplication):
        def load_config(self) -> None:
            self.cfg.set("bind", f"{settings.host}:{settings.port}")
            self.cfg.set("workers", settings.workers)
            self.cfg.set("threads", settings.threads)
            self.cfg.set("worker_class", "gthread")
            self.cfg.set("timeout", 120)
            self.cfg.set("graceful_timeout", 30)
            self.cfg.set("accesslog", None)  # the app logs each request as JSON
            # gunicorn's control socket defaults to one path per user: instances on one machine would share it.
            self.cfg.set("control_socket_disable", True)

        def load(self) -> Any:
            # Runs in each worker process after the fork: its own engine, pool and worker threads.
            app = create_app(settings)
            if settings.embedded_worker:
                app.extensions["trainingmgr"].start_worker(app)
            return app

    click.echo(f"trainingmgr serving on http://{settings.host}:{settings.port} (Swagger UI at /apidocs)")
    if demo:
        # A thread of the gunicorn master: it is not copied into the forked workers.
        threading.Thread(target=_demo_when_ready, args=(f"http://127.0.0.1:{settings.port}",), daemon=True).start()
    Server().run()


def _wait_ready(url: str, seconds: float) -> bool:
    import requests

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/readyz", timeout=2).status_code == 200:
                return True
        except requests.RequestException:
            pass
        time.sleep(0.3)
    return False


def _demo_when_ready(url: str) -> None:
    from .demo import Demo

    if _wait_ready(url, 60):
        Demo(url, Path.cwd()).run()
    else:
        click.echo("demo: the service did not become ready", err=True)


@cli.command("demo", with_appcontext=False)
@click.option("--url", default=None, help="A running service; without it, one is started for the demo.")
@click.option("--timeout", type=float, default=300, help="Seconds each training may take.")
def demo(url: str | None, timeout: float) -> None:
    """Train the bundled example end to end: feature group, pipelines, training, Model.zip, retraining."""
    import os
    import socket
    import subprocess
    import sys

    from .demo import Demo

    server = None
    if url is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "TM_HOST": "127.0.0.1", "TM_PORT": str(port), "TM_WORKERS": "1"}
        server = subprocess.Popen([sys.executable, "-m", "trainingmgr", "serve"], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        if not _wait_ready(url, 60):
            server.terminate()
            raise click.ClickException("the service started for the demo did not become ready")
    try:
        ok = Demo(url, Path.cwd(), echo=click.echo, job_timeout=timeout).run()
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)
    sys.exit(0 if ok else 1)


@cli.command("worker")
@click.option("--threads", type=int, default=None, help="Worker threads (TM_WORKER_THREADS).")
@with_appcontext
def worker(threads: int | None) -> None:
    """Execute training-job steps in this process (alongside servers started with TM_EMBEDDED_WORKER=false)."""
    import signal
    import threading

    from .schema import upgrade
    from .workers.runner import Worker

    app = current_app._get_current_object()
    upgrade(app)  # a worker may start before any server: the schema must be there
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    running = Worker(app, threads=threads).start()
    click.echo(f"trainingmgr worker {running.name} running {running.threads} threads; stop with SIGTERM")
    stopping.wait()
    running.stop()


def main() -> None:
    cli(prog_name="trainingmgr")
