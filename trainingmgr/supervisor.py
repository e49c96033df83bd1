"""The gunicorn master of `serve`, which also keeps one step runner (`trainingmgr worker --supervised`) alive.

The step runner executes the job steps (extraction, the pipeline runs' start and watch, notifications) in a process
of its own: the web workers stay light, and a step that brings a process down (out of memory, a crash in a native
library) takes no request with it. It is started with the web workers, started again when it ends (after 1 s, then
doubling up to 30 s while it keeps failing within a minute of its start), and stopped with them (SIGTERM, then
SIGKILL after the graceful timeout). It receives SIGTERM if the master dies without stopping it.

The master stays as gunicorn makes it: one thread, no app. The step runner is a new interpreter (fork and exec),
not a fork of the master.
"""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from typing import Any

from gunicorn.arbiter import Arbiter

from .lifetime import die_with_parent

FIRST_RESTART_DELAY = 1.0
MAX_RESTART_DELAY = 30.0
STABLE_AFTER = 60.0  # a runner that lived this long failed anew: its next restart is quick again


def describe_exit(status: int) -> str:
    if os.WIFSIGNALED(status):
        try:
            return f"was killed by {signal.Signals(os.WTERMSIG(status)).name}"
        except ValueError:
            return f"was killed by signal {os.WTERMSIG(status)}"
    return f"exited with code {os.WEXITSTATUS(status)}" if os.WIFEXITED(status) else f"ended ({status})"


class StepRunnerProcess:
    """One supervised `trainingmgr worker --supervised`, as the master's loop drives it (no thread)."""

    def __init__(self, log: Any, argv: list[str] | None = None):
        self.log = log
        self.argv = argv or [sys.executable, "-m", "trainingmgr", "worker", "--supervised"]
        self.process: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.next_start = 0.0  # time.monotonic() before which it is not started again
        self.delay = 0.0
        self.stopping = False

    def manage(self) -> None:
        """Start it if it is not running and its restart delay has passed."""
        if self.process is None and not self.stopping and time.monotonic() >= self.next_start:
            try:
                # Inherits the master's output (its log lines go where the server's go) and environment.
                self.process = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)
            except OSError as e:  # no memory, no file descriptor, no process left: try again later, serve on
                self._later(time.monotonic())
                self.log.error("step runner could not be started (%s); trying again in %s s", e, f"{self.delay:g}")
                return
            self.started_at = time.monotonic()
            self.log.info("step runner started (pid %s)", self.process.pid)

    def reap(self) -> None:
        """Collect it if it ended (before gunicorn's waitpid(-1) takes it as an unknown child)."""
        if self.process is None:
            return
        try:
            pid, status = os.waitpid(self.process.pid, os.WNOHANG)
        except ChildProcessError:  # gunicorn's reaping took it first: its status is lost
            pid, status = self.process.pid, -1
        if pid == 0:
            return
        self.process.returncode = status  # Popen does not wait for it again
        how = "ended (its exit status was collected elsewhere)" if status == -1 else describe_exit(status)
        self.process = None
        if self.stopping:
            self.log.info("step runner (pid %s) %s", pid, how)
            return
        lived = time.monotonic() - self.started_at
        self._later(self.started_at)
        self.log.error("step runner (pid %s) %s after %.0f s; starting another in %s s (training jobs wait "
                       "meanwhile)", pid, how, lived, f"{self.delay:g}")

    def _later(self, since: float) -> None:
        """The next start after a failure: quick after a runner that lived STABLE_AFTER since `since`, else the
        delay doubles."""
        stable = time.monotonic() - since >= STABLE_AFTER
        self.delay = FIRST_RESTART_DELAY if stable or not self.delay else min(MAX_RESTART_DELAY, self.delay * 2)
        self.next_start = time.monotonic() + self.delay

    def terminate(self) -> None:
        """Ask it to stop (SIGTERM); no restart from now on."""
        self.stopping = True
        self._signal(signal.SIGTERM)

    def wait(self, deadline: float) -> None:
        """Until it ended, or SIGKILL at `deadline` (time.time())."""
        while self.process is not None and time.time() < deadline:
            self.reap()
            time.sleep(0.1)
        if self.process is not None:
            self.log.warning("step runner (pid %s) did not stop in time: killed", self.process.pid)
            self._signal(signal.SIGKILL)
            try:
                os.waitpid(self.process.pid, 0)
            except ChildProcessError:
                pass
            self.process = None

    def _signal(self, sig: int) -> None:
        if self.process is None:
            return
        try:
            os.kill(self.process.pid, sig)
        except OSError as e:
            if e.errno != errno.ESRCH:
                raise


class SupervisingArbiter(Arbiter):
    """gunicorn's Arbiter, with the step runner started, reaped and stopped alongside the web workers."""

    def __init__(self, app: Any):
        super().__init__(app)
        self.step_runner = StepRunnerProcess(self.log)

    def manage_workers(self) -> None:
        super().manage_workers()
        self.step_runner.manage()

    def reap_workers(self) -> None:
        self.step_runner.reap()
        super().reap_workers()

    def stop(self, graceful: bool = True) -> None:
        deadline = time.time() + self.cfg.graceful_timeout
        self.step_runner.terminate()
        super().stop(graceful)
        self.step_runner.wait(deadline)
