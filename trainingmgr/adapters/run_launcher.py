"""A warm start for pipeline runs and extractions: `python -m trainingmgr.adapters.run_launcher SOCKET` imports kfp,
pandas and pyarrow once, then forks one process per run or extraction on request, so a run starts in milliseconds
instead of an interpreter's start and kfp's import (about 0.6 s alone, seconds when several start at once on a
loaded machine), and the step runner that asks never carries pandas (about 100 MB) itself.

Each run is still a process of its own, in a session of its own (terminable as a group, outliving the service),
whose cwd is its run folder and whose stdout and stderr go to the folder's output.log: the same as a run started
with `python -m trainingmgr.adapters.kfp_local_runner RUN_DIR`, which the engine falls back to when no launcher
answers.

The protocol, over a Unix stream socket in a folder only this user may enter: the engine sends one line,
`{"run_dir": ...}\\n`, with the write end of its "result written" pipe attached (SCM_RIGHTS); the launcher takes
the run's start (STARTER), forks, and answers `{"pid": N}\\n` once the child works in its folder and has written
its pid file, or `{"error": ...}\\n`. For an extraction the engine sends `{"extract": JOB}\\n` (see
extraction.run_extraction_job); the forked child does it and answers itself, `{"extracted": ...}\\n` or
`{"failed": ...}\\n`, on the same connection; `{"error": ...}\\n` comes from the launcher when it could not fork.

The launcher holds no thread (fork copies only the calling thread), reaps its children, ends with its parent (the
process whose engine started it) and after IDLE_SECONDS without a run.
"""
from __future__ import annotations

import array
import gc
import json
import os
import select
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from ..lifetime import die_with_parent

IDLE_SECONDS = 15 * 60  # a launcher no one asked for this long ends, and gives its memory back
SETTLE_SECONDS = 10.0  # how long a forked run may take to settle in its folder (a loaded machine)
MAX_REQUEST_BYTES = 64 * 1024


def _reap(*_: object) -> None:
    """SIGCHLD: collect every ended child (runs end in any order)."""
    while True:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def receive(connection: socket.socket) -> tuple[dict, int | None]:
    """One request line and the file descriptor sent with it (None when none came)."""
    fds = array.array("i")
    data = b""
    while not data.endswith(b"\n"):
        message, ancillary, _flags, _address = connection.recvmsg(4096, socket.CMSG_SPACE(fds.itemsize))
        if not message:
            break
        data += message
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
        if len(data) > MAX_REQUEST_BYTES:
            break
    for extra in fds[1:]:
        os.close(extra)
    done_fd = fds[0] if fds else None
    try:
        request = json.loads(data or b"{}")
        if not isinstance(request, dict) or not (isinstance(request.get("run_dir"), str)
                                                 or isinstance(request.get("extract"), dict)):
            raise ValueError("a request is {\"run_dir\": ...} or {\"extract\": {...}}")
    except ValueError:
        if done_fd is not None:
            os.close(done_fd)
        raise
    return request, done_fd


# ------------------------------------------------------------------------------------------- who starts a run
# The engine and its launcher may both try to start one run (the engine gives up waiting for an answer and starts
# the run cold): whoever creates this file first starts it, the other does not.
STARTER = ".starter"


def claim_start(run_dir: Path, claimer: int) -> bool:
    """Take the start of the run for process `claimer`; False when another process has taken it."""
    try:
        fd = os.open(run_dir / STARTER, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as file:
        file.write(str(claimer))
    return True


def start_claimer(run_dir: Path) -> int | None:
    """The process that took the run's start, or None (nobody, or unreadable)."""
    try:
        return int((run_dir / STARTER).read_text().strip())
    except (OSError, ValueError):
        return None


def write_pid(run_dir: Path, pid: int) -> None:
    (run_dir / "pid.tmp").write_text(str(pid))
    os.replace(run_dir / "pid.tmp", run_dir / "pid")


def _child(work: Callable[[], None], listener: socket.socket) -> None:
    """In a forked child: do `work` and never return (whatever happens, the child must not go back to the
    launcher's loop); exit 0 when it was done."""
    code = 1
    try:
        listener.close()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # kfp.local waits for its own task processes
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        work()
        code = 0
    except BaseException:  # noqa: BLE001 - said on its output, and in its exit code
        import traceback

        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _run(run_dir: Path, done_fd: int | None, connection: socket.socket, settled: int) -> None:
    """Become the run (its own session, its folder, its log) and run it."""
    connection.close()
    os.setsid()
    log = os.open(run_dir / "output.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.chdir(run_dir)
    # The run is known by its pid file from now on, even if the launcher goes away before it answers.
    write_pid(run_dir, os.getpid())
    os.write(settled, b"1")
    os.close(settled)
    from .kfp_local_runner import run_and_report

    run_and_report(run_dir, done_fd)


def _extract(job: dict, connection: socket.socket, launcher: int) -> None:
    """Do one extraction and answer on the connection; it ends with the launcher (which ends with its step
    runner): an extraction nobody waits for any more does not go on."""
    from .extraction import run_extraction_job

    die_with_parent()
    if os.getppid() != launcher:  # the launcher ended before the line above
        return
    connection.settimeout(None)
    connection.sendall(json.dumps(run_extraction_job(job)).encode() + b"\n")


def _give_up(run_dir: Path, pid: int) -> None:
    """A child that did not settle in time is killed and its claim dropped: the engine may start the run cold."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if (run_dir / "pid").exists() and (run_dir / "pid").read_text().strip() == str(pid):
        (run_dir / "pid").unlink(missing_ok=True)
    (run_dir / STARTER).unlink(missing_ok=True)


def serve(socket_path: str) -> None:
    # Warm: what every run and extraction needs, imported once, before any fork.
    import pandas  # noqa: F401
    import pyarrow.parquet  # noqa: F401
    from kfp import local  # noqa: F401
    from kfp.components import load_component_from_file  # noqa: F401

    from . import extraction, kfp_local_runner  # noqa: F401

    try:
        extraction.warm_up()
    except Exception as e:  # noqa: BLE001 - only a speed-up: each extraction then pays for its first use itself
        print(f"extraction warm-up failed: {e.__class__.__name__}: {e}", flush=True)
    # What the warm-up and the imports made is kept out of the collector's passes: a forked child's collections
    # would otherwise write to (and so copy) every page of it.
    gc.freeze()
    signal.signal(signal.SIGCHLD, _reap)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    Path(socket_path).unlink(missing_ok=True)
    # Only this user may ask for a run (it runs the pipeline a run folder names): the socket is created 0600, with
    # no moment when it is more open. It is bound under another name and renamed once it listens: whoever finds
    # the socket at its path can connect (between bind and listen a connection is refused).
    binding = socket_path + ".binding"
    previous_umask = os.umask(0o177)
    try:
        listener.bind(binding)
    finally:
        os.umask(previous_umask)
    listener.listen(16)
    os.rename(binding, socket_path)
    listener.settimeout(5)
    parent = os.getppid()
    print("ready", flush=True)
    last_request = time.monotonic()
    try:
        while time.monotonic() - last_request < IDLE_SECONDS:
            if os.getppid() != parent:  # its service is gone (the parent-death signal may not have come)
                break
            try:
                connection, _ = listener.accept()
            except socket.timeout:
                continue
            except InterruptedError:
                continue
            last_request = time.monotonic()
            with connection:
                connection.settimeout(10)
                done_fd = None
                try:
                    request, done_fd = receive(connection)
                    # A Python thread would not survive the fork, and may hold a lock. (Native pools started by the
                    # imports, OpenBLAS's and jemalloc's, register their own at-fork handlers.)
                    if threading.active_count() != 1:
                        raise RuntimeError("the launcher has threads: it cannot fork safely")
                    if "extract" in request:
                        parent_of_child = os.getpid()
                        if os.fork() == 0:
                            _child(lambda: _extract(request["extract"], connection, parent_of_child), listener)
                        continue  # the child answers; this copy of the connection is closed on leaving the block
                    run_dir = Path(request["run_dir"])
                    if not claim_start(run_dir, os.getpid()):  # the engine gave up on us and started it cold
                        raise RuntimeError("the run's start was taken by another process")
                    settled_read, settled_write = os.pipe()
                    pid = os.fork()
                    if pid == 0:
                        os.close(settled_read)
                        _child(lambda: _run(run_dir, done_fd, connection, settled_write), listener)
                    os.close(settled_write)
                    # Until the child works in its run folder, nothing shows it is the run (the engine checks
                    # the folder): its pid is given out only once it does.
                    with os.fdopen(settled_read, "rb") as settled:
                        if not select.select([settled], [], [], SETTLE_SECONDS)[0] or settled.read(1) != b"1":
                            _give_up(run_dir, pid)
                            raise RuntimeError("the forked run did not settle in its folder")
                    answer = {"pid": pid}
                except Exception as e:  # noqa: BLE001 - the engine falls back to a cold start
                    answer = {"error": f"{e.__class__.__name__}: {e}"}
                finally:
                    if done_fd is not None:
                        os.close(done_fd)  # the child has its copy: the engine learns of the end from it alone
                try:
                    connection.sendall(json.dumps(answer).encode() + b"\n")
                except OSError:
                    pass
    finally:
        listener.close()
        Path(socket_path).unlink(missing_ok=True)
        Path(binding).unlink(missing_ok=True)
        try:  # its private folder (made by the engine that started it), which nobody else will remove if it died
            os.rmdir(os.path.dirname(socket_path))
        except OSError:
            pass


def main() -> None:
    die_with_parent()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # so its socket file is removed
    serve(sys.argv[1])


if __name__ == "__main__":
    main()
