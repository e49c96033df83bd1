"""Command line: `trainingmgr serve | db ... | routes` (also `python -m trainingmgr ...`)."""
from __future__ import annotations

import importlib
import os
import sys
from typing import Any

import click

from .config import Settings, SettingsError

READY_SECONDS = 300  # a cold start on a loaded machine (imports, migration) is slow, but not this slow


def _create_app() -> Any:
    from .app import create_app
    from .schema import enable_migrations

    app = create_app()
    enable_migrations(app)  # the `db` commands
    return app


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    """--version: looked up only when asked (importlib.metadata is not small, and `serve` is the gunicorn master)."""
    if not value or ctx.resilient_parsing:
        return
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("trainingmgr")
    except PackageNotFoundError:  # run from a checkout that was not installed
        found = "unknown"
    click.echo(f"trainingmgr {found}")
    ctx.exit()


class _Commands(click.Group):
    """Our commands, plus Flask-Migrate's `db`, Flask's `routes` and the API client's groups, imported only when
    asked for: `serve` is the gunicorn master, which forks the web workers, and must stay small (no Flask, no
    Alembic, no requests in it)."""

    LAZY = {"db": ("flask_migrate.cli", "db"), "routes": ("flask.cli", "routes_command"),
            "jobs": ("trainingmgr.cli_client", "jobs"), "featuregroups": ("trainingmgr.cli_client", "featuregroups"),
            "pipelines": ("trainingmgr.cli_client", "pipelines")}
    NEED_APP = ("db", "routes")  # Flask's commands, which find the app through ScriptInfo

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.LAZY})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.LAZY:
            module, attribute = self.LAZY[name]
            return getattr(importlib.import_module(module), attribute)
        return super().get_command(ctx, name)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", "-V", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="Show the version and exit.")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Training Manager of the O-RAN AI/ML framework."""
    if ctx.invoked_subcommand in _Commands.NEED_APP:
        # Flask's commands get the app through ScriptInfo, which builds it on first use.
        from flask.cli import ScriptInfo

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
    url = settings.sqlalchemy_url
    if url.startswith("sqlite:") and (url.rstrip("/") == "sqlite:" or ":memory:" in url or "mode=memory" in url):
        raise click.ClickException("TM_DATABASE_URL names an in-memory SQLite database: each of serve's processes "
                                   "would have one of its own; use a file (the default) or PostgreSQL")
    if demo:
        sys.exit(_serve_with_demo(settings, _demo_token(settings, None)))
    _check_security(settings)
    # Once, before any worker starts: workers never race on the schema. The master builds no app and starts no
    # thread: see trainingmgr.serving.
    upgrade_database_in_child()
    from .serving import gunicorn_application

    click.echo(f"trainingmgr serving on http://{settings.host}:{settings.port} (web console at /, Swagger UI at "
               "/apidocs)")
    gunicorn_application(settings).run()


def _settings(**overrides: Any) -> Settings:
    try:
        settings = Settings.from_env()
        settings = settings.replace(**{k: v for k, v in overrides.items() if v is not None})
        settings.validate()
    except SettingsError as e:
        raise click.ClickException(str(e)) from None
    return settings


def _check_security(settings: Settings) -> None:
    """Before serving: a token file that is not there stops the start; an open API on a network says so."""
    import ipaddress
    import logging

    from .logs import configure_logging

    if settings.auth == "token" and not settings.tokens_path.is_file():
        raise click.ClickException(f"TM_AUTH=token but the token file {settings.tokens_path} does not exist: make "
                                   "a token with `trainingmgr auth add-token NAME ROLE` (or set TM_AUTH_TOKENS_FILE)")
    try:
        loopback = settings.host == "localhost" or ipaddress.ip_address(settings.host).is_loopback
    except ValueError:  # a host name: it may well be reachable from elsewhere
        loopback = False
    if settings.auth == "none" and not loopback:
        configure_logging(settings.log_level)
        logging.getLogger("trainingmgr.security").warning(
            "listening on %s without authentication (TM_AUTH=none): anyone who can reach port %d may create, change "
            "and delete feature groups, training jobs and models; see 'Securing the service' in the README",
            settings.host, settings.port)


def _demo_token(settings: Settings, token: str | None) -> str | None:
    """The token the demo sends (--token, else TM_TOKEN); a service that asks for one cannot be demoed without."""
    token = token or os.environ.get("TM_TOKEN") or None
    if settings.auth != "none" and token is None:
        raise click.ClickException(f"TM_AUTH={settings.auth}: the demo needs a writer's token in TM_TOKEN (or "
                                   "--token); make one with `trainingmgr auth add-token demo writer`")
    return token


def _serve_with_demo(settings: Settings, token: str | None) -> int:
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
        if not Demo(server.url, settings.data_path / "demo", echo=click.echo, token=token).run():
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
@click.option("--token", default=None, envvar="TM_TOKEN", show_envvar=True,
              help="A writer's API token or JWT, sent as Authorization: Bearer.")
def demo(url: str | None, timeout: float, token: str | None) -> None:
    """Train the bundled example end to end: feature group, pipelines, training, Model.zip, retraining."""
    import socket

    from .demo import Demo
    from .serving import ServerProcess

    settings = _settings()
    server = None
    if url is None:
        token = _demo_token(settings, token)  # the service started here asks for one as TM_AUTH says
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = ServerProcess(settings.replace(host="127.0.0.1", port=port, workers=1), quiet=True).start()
        url = server.url
    try:
        if server is not None and not server.wait_ready(READY_SECONDS):
            raise click.ClickException("the service started for the demo did not become ready")
        ok = Demo(url, settings.data_path / "demo", echo=click.echo, job_timeout=timeout, token=token).run()
    finally:
        if server is not None:
            server.stop()
    sys.exit(0 if ok else 1)


@cli.group("auth")
def auth() -> None:
    """Static API tokens (TM_AUTH=token) in TM_AUTH_TOKENS_FILE; the service rereads the file when it changes."""


@auth.command("add-token")
@click.argument("name")
@click.argument("role")
def add_token(name: str, role: str) -> None:
    """Make a token for NAME with ROLE (reader, writer, admin, or a name TM_AUTH_ROLE_MAP maps): the token is
    printed once, only its SHA-256 is kept."""
    from .adapters.api_tokens import add_token as append_token

    settings = _settings()
    try:
        token = append_token(settings.tokens_path, name, role, settings.role_map)
    except (ValueError, OSError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"token {name} ({role}) added to {settings.tokens_path}; it is shown only now:", err=True)
    click.echo(token)


@auth.command("list-tokens")
def list_tokens() -> None:
    """The names and roles of the tokens (never a token: the file does not hold them)."""
    from .adapters.api_tokens import read_token_file

    settings = _settings()
    try:
        entries = read_token_file(settings.tokens_path)
    except (OSError, UnicodeDecodeError) as e:
        raise click.ClickException(f"{settings.tokens_path}: {e}") from None
    for entry in entries:
        refused = "" if entry.role in settings.role_map.names else "\t(refused: not a role TM_AUTH_ROLE_MAP maps)"
        click.echo(f"{entry.name}\t{entry.role}{refused}")


@auth.command("remove-token")
@click.argument("name")
def remove_token(name: str) -> None:
    """Revoke the token of NAME (the service stops accepting it as soon as it sees the file changed)."""
    from .adapters.api_tokens import remove_token as drop_token

    settings = _settings()
    try:
        removed = drop_token(settings.tokens_path, name)
    except (OSError, ValueError) as e:
        raise click.ClickException(f"{settings.tokens_path}: {e}") from None
    if not removed:
        raise click.ClickException(f"no token named {name!r} in {settings.tokens_path}")
    click.echo(f"token {name} removed from {settings.tokens_path}")


@cli.command("worker")
@click.option("--threads", type=int, default=None, help="Threads that execute job steps (TM_WORKER_THREADS).")
@click.option("--notify-threads", type=int, default=None,
              help="Threads that deliver rApp notifications (TM_NOTIFY_THREADS).")
@click.option("--supervised", is_flag=True, hidden=True,
              help="Started by `serve`, which brought the schema up to date and stops this process with it.")
def worker(threads: int | None, notify_threads: int | None, supervised: bool) -> None:
    """Execute training-job steps in this process (`serve` starts one itself unless TM_EMBEDDED_WORKER=false)."""
    import signal
    import threading

    from .app import create_app
    from .workers.runner import Worker

    app = create_app()  # without Flask-Migrate: Alembic stays out of a long-lived process that does not need it
    if not supervised:
        from .schema import upgrade

        upgrade(app)  # a worker may start before any server: the schema must be there
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    running = Worker(app, threads=threads, notify_threads=notify_threads).start()
    if not supervised:
        click.echo(f"trainingmgr worker {running.name} running {running.threads} step threads and "
                   f"{running.notify_threads} notification threads; stop with SIGTERM")
    stopping.wait()
    running.stop()


def main() -> None:
    cli(prog_name="trainingmgr")
