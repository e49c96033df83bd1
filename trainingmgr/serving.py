"""Running the service: the gunicorn application `serve` runs, and a served instance as a child process (what
`serve --demo` and `demo` without `--url` use), with a readiness wait that cannot hang.

The gunicorn master must hold no thread, pool or connection when it forks its workers: a child inherits a lock
held by a thread that does not exist in it (an import lock, a logging lock) and blocks on it for good. So the
master builds no app, migrates in a child process, and anything that wants to talk to the service (the demo) is a
process of its own that starts the server as its child, never a thread of the master.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import IO, Any, Callable

from .config import Settings
from .lifetime import die_with_parent

GRACEFUL_TIMEOUT = 10  # seconds a worker may finish its requests after SIGTERM; steps are durable, runs outlive us
READY_PATH = "/readyz"
_QUIET_LEVELS = {"DEBUG", "INFO"}


def wait_until_ready(url: str, deadline: float, *, alive: Callable[[], bool] = lambda: True,
                     interval: float = 0.3) -> bool:
    """True once GET <url>/readyz answers 200 before `deadline` (time.monotonic()); False at the deadline or when
    `alive()` says the server is gone. Every request error counts as "not yet": a loaded machine answers late
    (read timeouts), resets connections, or refuses them while the server starts."""
    import requests

    while time.monotonic() < deadline:
        if not alive():
            return False
        try:
            if requests.get(url.rstrip("/") + READY_PATH, timeout=min(5.0, max(0.5, deadline - time.monotonic()))
                            ).status_code == 200:
                return True
        except Exception:  # noqa: BLE001 - any failure of the probe means "not ready yet"
            pass
        time.sleep(interval)
    return False


def gunicorn_application(settings: Settings) -> Any:
    """The gunicorn application `serve` runs: gthread workers (requests buffered by the event loop), each building its
    own app after the fork; with TM_EMBEDDED_WORKER, the master also supervises one step runner."""
    from gunicorn.app.base import BaseApplication

    class Server(BaseApplication):
        # Read by the worker class (trainingmgr.http_worker): its read timeout and body limits.
        settings_for_workers = settings

        def load_config(self) -> None:
            self.cfg.set("bind", f"{settings.host}:{settings.port}")
            self.cfg.set("workers", settings.workers)
            self.cfg.set("threads", settings.threads)
            # gthread, with requests read by the event loop before a thread takes them (slow clients, see there).
            self.cfg.set("worker_class", "trainingmgr.http_worker.RequestBufferingWorker")
            self.cfg.set("timeout", 120)
            self.cfg.set("graceful_timeout", GRACEFUL_TIMEOUT)
            self.cfg.set("accesslog", None)  # the app logs each request as JSON
            # gunicorn's control socket defaults to one path per user: instances on one machine would share it.
            self.cfg.set("control_socket_disable", True)
            self.cfg.set("pre_fork", _report_threads_before_fork)

        def load(self) -> Any:
            # Runs in each worker process after the fork: its own engine and pool. Web workers run no step: those
            # run in the step runner, so no web worker carries pandas, pyarrow or kfp.
            from .app import create_app

            return create_app(settings)

        def run(self) -> None:
            if not settings.embedded_worker:
                super().run()
                return
            from .supervisor import SupervisingArbiter

            try:
                SupervisingArbiter(self).run()
            except RuntimeError as e:  # as gunicorn's own run() reports a configuration error
                print(f"\nError: {e}\n", file=sys.stderr, flush=True)
                sys.exit(1)

    return Server()


def _report_threads_before_fork(arbiter: Any, _worker: Any) -> None:
    """gunicorn's pre_fork hook: a thread in the master at fork time can leave the new worker blocked for good on a
    lock that thread held. This never happens by design; if a change brings one in, say so loudly."""
    others = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    if others:
        arbiter.log.error("threads in the gunicorn master before a fork (a worker may hang): %s", ", ".join(others))


def _level_of(line: str) -> str | None:
    """The level of one output line of the server: its JSON `level`, or gunicorn's `[LEVEL]`, or Alembic's prefix."""
    if line.startswith("{"):
        try:
            return str(json.loads(line).get("level", "")).upper() or None
        except ValueError:
            return None
    for level in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        if f"[{level}]" in line or line.startswith(level + " "):
            return level
    return None


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


class Stopped(SystemExit):
    """This process was asked to stop (SIGTERM, SIGHUP): the server it started must stop with it."""


class ServerProcess:
    """`trainingmgr serve` as a child process whose output is relayed to ours, quietly (warnings and errors only)
    while `quiet` is set, in full afterwards. From start() on, SIGTERM/SIGHUP to this process raise Stopped, so
    the caller's cleanup stops the server; in wait() they are passed on to it instead."""

    def __init__(self, settings: Settings, *, quiet: bool = True, out: IO[str] | None = None):
        self.settings = settings
        self.quiet = quiet
        self.out = out or sys.stderr
        self.process: subprocess.Popen[str] | None = None
        self._relay: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = self.settings.host
        if host in ("0.0.0.0", "", "::"):
            host = "127.0.0.1"
        elif ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.settings.port}"

    def start(self) -> "ServerProcess":
        env = {**os.environ, "TM_HOST": self.settings.host, "TM_PORT": str(self.settings.port),
               "TM_WORKERS": str(self.settings.workers)}
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self._stop_requested)
        # preexec_fn runs between fork and exec: safe here, the relay thread does not exist yet.
        self.process = subprocess.Popen(
            [sys.executable, "-m", "trainingmgr", "serve"], env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, errors="replace",
            preexec_fn=die_with_parent,
        )
        # A thread of this process, which is not the gunicorn master (that is the child) and forks nothing more.
        self._relay = threading.Thread(target=self._copy_output, name="tm-server-output", daemon=True)
        self._relay.start()
        return self

    def _copy_output(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            if self.quiet and _level_of(line) in _QUIET_LEVELS:
                continue
            try:
                self.out.write(line)
                self.out.flush()
            except (OSError, ValueError):  # our own output is gone (closed terminal): keep draining the pipe
                pass

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_ready(self, seconds: float) -> bool:
        return wait_until_ready(self.url, time.monotonic() + seconds, alive=self.alive)

    def wait(self) -> int:
        """Until the server exits; SIGTERM/SIGHUP/SIGINT to this process stop it gracefully (SIGTERM)."""
        assert self.process is not None
        previous = {sig: signal.signal(sig, self._pass_on) for sig in STOP_SIGNALS}
        try:
            code = self.process.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if self._relay is not None:
            self._relay.join(5)
        return code

    def _pass_on(self, _signum: int, _frame: Any) -> None:
        # Always SIGTERM (graceful): a terminal's Ctrl-C reaches the server's process group by itself already, and
        # gunicorn reads SIGHUP as "reload", not "stop".
        if self.alive():
            assert self.process is not None
            self.process.terminate()

    def _stop_requested(self, signum: int, _frame: Any) -> None:
        raise Stopped(128 + signum)

    def stop(self, timeout: float = GRACEFUL_TIMEOUT + 10) -> int | None:
        """SIGTERM, then SIGKILL if it has not stopped within `timeout` seconds."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._relay is not None:
            self._relay.join(5)
        return self.process.returncode
