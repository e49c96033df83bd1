"""Processes that tests start (servers, workers, moto, CPU burners): every wait has a deadline and treats every error
as "not yet", and every process is stopped when the test ends, also when it fails."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, Sequence

from trainingmgr.serving import wait_until_ready


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def answers(port: int) -> bool:
    """An HTTP server on the port answered a request, whatever its status: it is up and its app loaded (moto
    imports its backends on the first request, which can take seconds on a loaded machine)."""
    import requests

    try:
        requests.get(f"http://127.0.0.1:{port}/", timeout=10)
        return True
    except Exception:  # noqa: BLE001 - not up yet, whatever the error
        return False


def stop(process: subprocess.Popen, timeout: float = 30) -> int:
    """SIGTERM, then SIGKILL when it has not stopped in `timeout` seconds; its exit status."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
    return process.returncode


@contextlib.contextmanager
def started(argv: Sequence[str], *, log_path: Path, env: dict[str, str] | None = None, cwd: Path | None = None,
            stop_timeout: float = 30) -> Iterator[subprocess.Popen]:
    """A process whose output goes to `log_path` (a pipe nobody reads could stall it); stopped on leaving."""
    with open(log_path, "ab") as log:
        process = subprocess.Popen(list(argv), env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        stop(process, stop_timeout)


def served(tmp_path: Path, port: int, env: dict[str, str], *, name: str = "server",
           argv: Sequence[str] = ("serve",)) -> contextlib.AbstractContextManager[subprocess.Popen]:
    """`python -m trainingmgr serve` (or other argv) with its log in tmp_path/<name>.log."""
    full_env = {**os.environ, "TM_HOST": "127.0.0.1", "TM_PORT": str(port), **env}
    return started([sys.executable, "-m", "trainingmgr", *argv], log_path=tmp_path / f"{name}.log", env=full_env,
                   cwd=tmp_path)


@contextlib.contextmanager
def ready_server(tmp_path: Path, env: dict[str, str], *, port: int | None = None, name: str = "server",
                 seconds: float = 120) -> Iterator[str]:
    """`trainingmgr serve` on a free port (or `port`), ready; its URL. Stopped on leaving."""
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    with served(tmp_path, port, env, name=name) as server:
        assert_ready(url, server, seconds, tmp_path / f"{name}.log")
        yield url


def assert_ready(url: str, process: subprocess.Popen, seconds: float, log_path: Path | None = None) -> None:
    if not wait_until_ready(url, time.monotonic() + seconds, alive=lambda: process.poll() is None):
        shown = log_path.read_text(errors="replace")[-3000:] if log_path and log_path.exists() else ""
        state = "exited" if process.poll() is not None else f"not ready in {seconds:.0f} s"
        raise AssertionError(f"{url}: {state}\n{shown}")


@contextlib.contextmanager
def moto_server(log_dir: Path) -> Iterator[str]:
    """An S3 server (moto) in a process of its own; yields its host:port."""
    log = log_dir / "moto.log"
    for _ in range(3):  # the free port may be taken between our probe and the server's bind: try another one
        port = free_port()
        with started([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], log_path=log,
                     stop_timeout=10) as process:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and process.poll() is None and not answers(port):
                time.sleep(0.1)
            if process.poll() is None and answers(port):
                yield f"127.0.0.1:{port}"
                return
    raise AssertionError(f"moto server did not start: {log.read_text(errors='replace')[-2000:]}")


BURN = "import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end:\n    pass\n"


@contextlib.contextmanager
def cpu_kept_busy(processes: int | None = None, seconds: float = 900) -> Iterator[None]:
    """One spinning process per CPU (or `processes`), each ending by itself after `seconds` at the latest, all
    stopped on leaving: the machine as loaded as a busy shared one."""
    count = processes or os.cpu_count() or 2
    burners = [subprocess.Popen([sys.executable, "-c", BURN.format(seconds=seconds)], stdin=subprocess.DEVNULL)
               for _ in range(count)]
    try:
        yield
    finally:
        for burner in burners:
            burner.kill()
            burner.wait(10)


def children(pid: int) -> dict[int, str]:
    """The live child processes of `pid`, with their command lines."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            state, ppid = stat.rsplit(")", 1)[1].split()[:2]
            if int(ppid) == pid and state != "Z":
                found[int(entry)] = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError, IndexError):  # it ended while we looked
            continue
    return found


def maps_file(pid: int, fragment: str) -> bool:
    """Whether process `pid` has a file whose path contains `fragment` mapped (a native library it imported)."""
    return fragment in Path(f"/proc/{pid}/maps").read_text()


def gone(pid: int) -> bool:
    """No such process, or only its zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def until(condition, seconds: float, interval: float = 0.2) -> bool:
    """True once `condition()` holds within `seconds`; an error raised by it counts as "not yet"."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if condition():
                return True
        except Exception:  # noqa: BLE001 - not yet, whatever went wrong
            pass
        time.sleep(interval)
    return False
