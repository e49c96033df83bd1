"""A PostgreSQL cluster of a test's own (initdb in a temporary folder, a free port on 127.0.0.1), which the test may
stop and start again: a real database outage. Every wait has a deadline; the server is stopped and its folder
removed on leaving, also when the test fails.

The machine's PostgreSQL binaries are used (/usr/lib/postgresql/<version>/bin, or TM_TEST_PG_BIN). PostgreSQL
refuses to run as root: under root, the cluster belongs to the `postgres` user.
"""
from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from tests.processes import free_port, listening


def pg_bin() -> Path | None:
    configured = os.environ.get("TM_TEST_PG_BIN")
    candidates = [configured] if configured else sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    for folder in candidates:
        if folder and (Path(folder) / "initdb").exists() and (Path(folder) / "postgres").exists():
            return Path(folder)
    return None


class PrivateCluster:
    """`start()`, `stop()` (fast shutdown: sessions are cut, new connections refused) and `url`."""

    def __init__(self, root: Path, bin_dir: Path, port: int, run_as: pwd.struct_passwd | None):
        self.root, self.bin, self.port, self.run_as = root, bin_dir, port, run_as
        self.data = root / "data"
        self.log_path = root / "postgres.log"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/postgres"

    def _user_args(self) -> dict[str, Any]:
        if self.run_as is None:
            return {}
        return {"user": self.run_as.pw_uid, "group": self.run_as.pw_gid, "extra_groups": []}

    def initdb(self) -> None:
        done = subprocess.run(
            [str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
             "--no-sync"],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120, **self._user_args())
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed: {done.stdout[-1000:]}{done.stderr[-1000:]}")

    def start(self, seconds: float = 60) -> None:
        assert self.process is None or self.process.poll() is not None, "already running"
        log = open(self.log_path, "ab")
        try:
            self.process = subprocess.Popen(
                [str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port), "-h", "127.0.0.1",
                 "-k", "", "-c", "fsync=off", "-c", "max_connections=60"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, **self._user_args())
        finally:
            log.close()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"postgres exited: {self.log_path.read_text(errors='replace')[-2000:]}")
            if self._accepts():
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"postgres did not accept connections in {seconds} s")

    def _accepts(self) -> bool:
        if not listening(self.port):
            return False
        import psycopg2

        try:
            psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres",
                             connect_timeout=2).close()
            return True
        except psycopg2.Error:
            return False  # still starting up

    def stop(self, seconds: float = 30) -> None:
        """Fast shutdown (SIGINT): open sessions are ended, then nothing listens on the port."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGINT)
        try:
            process.wait(seconds)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        deadline = time.monotonic() + 10
        while listening(self.port) and time.monotonic() < deadline:
            time.sleep(0.05)


@contextlib.contextmanager
def private_cluster() -> Iterator[PrivateCluster]:
    """A running cluster of its own; RuntimeError when this machine cannot make one (no binaries)."""
    bin_dir = pg_bin()
    if bin_dir is None:
        raise RuntimeError("no PostgreSQL server binaries (initdb, postgres) on this machine; set TM_TEST_PG_BIN")
    run_as = pwd.getpwnam("postgres") if os.geteuid() == 0 else None
    root = Path(tempfile.mkdtemp(prefix="tm-pg-"))
    try:
        if run_as is not None:
            os.chown(root, run_as.pw_uid, run_as.pw_gid)
        cluster = PrivateCluster(root, bin_dir, free_port(), run_as)
        cluster.initdb()
        cluster.start()
        try:
            yield cluster
        finally:
            cluster.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)
