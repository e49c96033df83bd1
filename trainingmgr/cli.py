"""Command line: `trainingmgr serve | db ... | routes` (also `python -m trainingmgr ...`)."""
from __future__ import annotations

import importlib
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import click
from flask import current_app
from flask.cli import ScriptInfo, with_appcontext

from . import create_app
from .config import Settings, SettingsError

READY_SECONDS = 300  # a cold start on a loaded machine (imports, migration) is slow, but not this slow


def _create_app() -> Any:
    from .schema import enable_migrations

    app = create_app()
    enable_migrations(app)  # the `db` commands
    return app


def _version() -> str:
    try:
        return version("trainingmgr")
    except PackageNotFoundError:  # run from a checkout that was not installed
        return "unknown"


class _Commands(click.Group):
    """Our commands, plus Flask-Migrate's `db` and Flask's `routes`, imported only when asked for (Alembic costs the
    serving processes memory they never use)."""

    LAZY = {"db": ("flask_migrate.cli", "db"), "routes": ("flask.cli", "routes_command")}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.LAZY})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.LAZY:
            module, attribute = self.LAZY[name]
            return getattr(importlib.import_module(module), attribute)
        return super().get_command(ctx, name)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(_version(), "--version", "-V", prog_name="trainingmgr", message="%(prog)s %(version)s")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Training Manager of the O-RAN AI/ML framework."""
    # The commands that need the app (db, routes, worker) get it through Flask's ScriptInfo, built on first use.
    ctx.obj = ScriptInfo(create_app=_create_app, set_debug_flag=False, load_dotenv_defaults=False)


def upgrade_database_in_child() -> None:
    """`trainingmgr db upgrade` in a process of its own: the gunicorn master stays small (no app, no Alembic), so
    the workers it forks do not each carry a copy of what only the migration needed."""
    import subprocess

    done = subprocess.run([sys.executable, "-m", "trainingmgr", "db", "upgrade"], stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise click.ClickException("the database schema could not be brought up to date (its error is above)")


@cli.command("serve")
@click.option("--host", default=None, help="Address to listen on (TM_HOST).")
@click.option("--port", type=int, default=None, help="Port to listen on (TM_PORT).")
@click.option("--workers", type=int, default=None, help="gunicorn worker processes (TM_WORKERS).")
@click.option("--demo", is_flag=True, help="Serve in a child process and train the bundled example through the API; "
                                           "exit 1 if the demo fails, else keep serving.")
def serve(host: str | None, port: int | None, workers: int | None, demo: bool) -> None:
    """Bring the database schema up to date, then serve with gunicorn."""
    settings = _settings(host=host, port=port, workers=workers)
    if demo:
        sys.exit(_serve_with_demo(settings))
    # Once, before any worker starts: workers never race on the schema. The master builds no app and starts no
    # thread: see trainingmgr.serving.
    upgrade_database_in_child()
    from .serving import gunicorn_application

    click.echo(f"trainingmgr serving on http://{settings.host}:{settings.port} (Swagger UI at /apidocs)")
    gunicorn_application(settings).run()


def _settings(**overrides: Any) -> Settings:
    try:
        settings = Settings.from_env()
        settings = settings.replace(**{k: v for k, v in overrides.items() if v is not None})
        settings.validate()
    except SettingsError as e:
        raise click.ClickException(str(e)) from None
    return settings


def _serve_with_demo(settings: Settings) -> int:
    """`serve --demo`: this process runs the demo, an HTTP client of the server it starts as its child."""
    from .demo import Demo
    from .serving import ServerProcess

    server = ServerProcess(settings, quiet=True).start()
    click.echo("trainingmgr: starting the service, then the demo (the service's INFO log lines are left out while "
               "the demo runs)")
    passed = False
    try:
        if not server.wait_ready(READY_SECONDS):
            click.echo(f"demo FAILED: the service did not become ready within {READY_SECONDS} s "
                       "(its log is above); stopping it", err=True)
            return 1
        if not Demo(server.url, settings.data_path / "demo", echo=click.echo).run():
            click.echo("demo FAILED (see above); stopping the service", err=True)
            return 1
        passed = True
    finally:
        if not passed:  # a failed demo, or a stop signal or error while it ran
            server.stop()
    server.quiet = False
    click.echo(f"the service keeps serving on http://{settings.host}:{settings.port}; stop it with Ctrl-C")
    return server.wait()


@cli.command("demo")
@click.option("--url", default=None, help="A running service; without it, one is started for the demo.")
@click.option("--timeout", type=float, default=300, help="Seconds each training may take.")
def demo(url: str | None, timeout: float) -> None:
    """Train the bundled example end to end: feature group, pipelines, training, Model.zip, retraining."""
    import socket

    from .demo import Demo
    from .serving import ServerProcess

    settings = _settings()
    server = None
    if url is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = ServerProcess(settings.replace(host="127.0.0.1", port=port, workers=1), quiet=True).start()
        url = server.url
    try:
        if server is not None and not server.wait_ready(READY_SECONDS):
            raise click.ClickException("the service started for the demo did not become ready")
        ok = Demo(url, settings.data_path / "demo", echo=click.echo, job_timeout=timeout).run()
    finally:
        if server is not None:
            server.stop()
    sys.exit(0 if ok else 1)


@cli.command("worker")
@click.option("--threads", type=int, default=None, help="Threads that execute job steps (TM_WORKER_THREADS).")
@click.option("--notify-threads", type=int, default=None,
              help="Threads that deliver rApp notifications (TM_NOTIFY_THREADS).")
@with_appcontext
def worker(threads: int | None, notify_threads: int | None) -> None:
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
    running = Worker(app, threads=threads, notify_threads=notify_threads).start()
    click.echo(f"trainingmgr worker {running.name} running {running.threads} step threads and "
               f"{running.notify_threads} notification threads; stop with SIGTERM")
    stopping.wait()
    running.stop()


def main() -> None:
    cli(prog_name="trainingmgr")
