"""The embedded pipeline engine: each run is `python -m trainingmgr.adapters.kfp_local_runner RUN_DIR`.

A run is a folder <runs_dir>/<run_id>/ holding everything about it, so that any process of the service (and a
restarted one) can answer for it:
  request.json  {"pipeline_file", "parameters"} for the runner
  pid           the runner's pid; it leads a process group (session) of its own, the run's tasks included
  output.log    the runner's stdout and stderr (kfp.local's log and every task's output)
  result.json   written once at the end, atomically: {"state": "SUCCEEDED"|"FAILED", "error", "model_path", "metrics"}
  root/         kfp.local's pipeline_root: the tasks' outputs

kfp.local has no registry: the service keeps pipelines itself, so register_version has nothing to do.
"""
from __future__ import annotations

import array
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

from .base import AdapterError, PipelineEngine, RunLog, RunStatus
from .pipeline_files import load_spec, run_parameters
from .run_launcher import SETTLE_SECONDS, STARTER, claim_start, start_claimer, write_pid

log = logging.getLogger(__name__)

RUN_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
RUNNER_MODULE = "trainingmgr.adapters.kfp_local_runner"
LAUNCHER_MODULE = "trainingmgr.adapters.run_launcher"
LOST = "the run's process ended without a result"
TERMINATED = "terminated"
ANSI = re.compile(r"\x1b\[[0-9;]*m")
# How much of the end of output.log is searched for the failed task's exception.
LOG_TAIL_BYTES = 64 * 1024
_PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent.parent)


# ------------------------------------------------------------------------------------------- the warm launcher
class WarmLauncher:
    """This engine's fork server (trainingmgr.adapters.run_launcher), asked to fork each run and each embedded
    extraction; launch() answers None whenever it cannot, and the run then starts cold (the run's STARTER file
    decides who starts it: never both); extract() answers None when it cannot, and the extraction runs in process.

    Enabled by start_warm_runner, it starts with the first extraction or run (an extraction waits for it, a run
    starts cold) and ends after 15 minutes without a request: an idle service does not keep kfp, pandas and pyarrow
    in memory (about 170 MB a launcher), a busy one starts its runs in milliseconds. Its socket is in a folder of
    its own (mode 0700), and its answers count only from it (the peer's pid, checked with SO_PEERCRED)."""

    answer_timeout = 5.0  # a request the launcher does not answer within this is given up (the run starts cold)
    ready_seconds = 60.0  # how long an extraction waits for a launcher that is starting (imports kfp and pandas)

    def __init__(self, runs_dir: Path):
        self.runs_dir = runs_dir
        self.enabled = False
        self.process: subprocess.Popen[bytes] | None = None
        self.folder = ""  # the socket's private folder
        self._lock = threading.Lock()

    @property
    def socket_path(self) -> str:
        return os.path.join(self.folder, "socket") if self.folder else ""

    def start(self) -> None:
        with self._lock:
            if not self.enabled or (self.process is not None and self.process.poll() is None):
                return
            self._remove_folder()  # a launcher that was killed leaves its socket
            # mkdtemp: 0700, a name nobody can take first; short, as a Unix socket's path is limited to 107 bytes.
            self.folder = tempfile.mkdtemp(prefix="tm-launcher-")
            self.runs_dir.mkdir(parents=True, exist_ok=True)
            with open(self.runs_dir / ".launcher.log", "ab") as output:
                self.process = subprocess.Popen([sys.executable, "-m", LAUNCHER_MODULE, self.socket_path],
                                                stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                                                env=_runner_env(), close_fds=True)

    def launch(self, run_dir: Path, done_write: int) -> int | None:
        """The pid of the run the launcher forked, or None (not enabled, not ready yet, no answer)."""
        try:
            self.start()  # at the first run, or after it ended (idle, killed): for the runs after this one
        except OSError as e:
            log.warning("the warm launcher could not start; runs start cold", extra={"error": str(e)})
            return None
        connection = self._connect()
        if connection is None:
            return None  # not enabled, still importing kfp, or not its own socket: the run starts cold
        try:
            with connection:
                request = json.dumps({"run_dir": str(run_dir)}).encode() + b"\n"
                connection.sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [done_write]))])
                answer = self._read_line(connection)
            pid = json.loads(answer or b"{}").get("pid")
        except (OSError, ValueError) as e:
            log.warning("the warm launcher did not answer; the run starts cold", extra={"error": str(e)})
            return None
        return pid if isinstance(pid, int) and pid > 0 else None

    def extract(self, job: dict, timeout: float) -> dict | None:
        """Have a process forked from the launcher do an extraction (extraction.run_extraction_job); its answer, or
        None when the launcher cannot be asked (not enabled, or not ready within READY_SECONDS): then the caller
        extracts itself. Waits for a launcher that is starting: that is what spares the caller pandas."""
        try:
            self.start()
        except OSError as e:
            log.warning("the warm launcher could not start; the extraction runs in the step runner",
                        extra={"error": str(e)})
            return None
        deadline = time.monotonic() + self.ready_seconds
        while self.process is not None and self.process.poll() is None and not os.path.exists(self.socket_path):
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        connection = self._connect()
        if connection is None:
            return None
        with connection:
            try:
                connection.sendall(json.dumps({"extract": job}).encode() + b"\n")
                connection.settimeout(timeout)
                answer = self._read_line(connection)
            except socket.timeout:
                raise AdapterError(f"the extraction did not end within {timeout:g} s", retryable=True) from None
            except OSError as e:
                log.warning("the warm launcher did not take the extraction; it runs in the step runner",
                            extra={"error": str(e)})
                return None
        try:
            parsed = json.loads(answer) if answer else None
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict) or not ({"extracted", "failed", "error"} & parsed.keys()):
            # The forked process ended without a word: killed (out of memory?) or crashed.
            raise AdapterError("the extraction's process ended without an answer", retryable=True)
        if "error" in parsed:  # the launcher could not fork it
            log.warning("the warm launcher could not start the extraction; it runs in the step runner",
                        extra={"error": str(parsed["error"])[:300]})
            return None
        return parsed

    def _connect(self) -> socket.socket | None:
        """A connection to the launcher, checked to be its own (SO_PEERCRED), or None."""
        process, path = self.process, self.socket_path
        if process is None or not path or not os.path.exists(path):
            return None
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            connection.settimeout(self.answer_timeout)
            connection.connect(path)
            peer, _uid, _gid = struct.unpack("3i", connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                                         struct.calcsize("3i")))
        except OSError as e:
            connection.close()
            log.warning("the warm launcher did not answer", extra={"error": str(e)})
            return None
        if peer != process.pid:
            connection.close()
            log.error("the warm launcher's socket is held by another process", extra={"pid": peer})
            return None
        return connection

    @staticmethod
    def _read_line(connection: socket.socket) -> bytes:
        answer = b""
        while not answer.endswith(b"\n"):
            chunk = connection.recv(4096)
            if not chunk:
                break
            answer += chunk
        return answer

    def stop(self) -> None:
        with self._lock:
            self.enabled = False
            process, self.process = self.process, None
            if process is not None and process.poll() is None:
                process.terminate()
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(5)
            self._remove_folder()

    def _remove_folder(self) -> None:
        if self.folder:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = ""


# ------------------------------------------------------------------------------------------- processes
def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, process group id) of a process from /proc, or None when it does not exist."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        return None
    # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses, so split after the last ')'.
    fields = raw[raw.rfind(")") + 2 :].split()
    try:
        return fields[0], int(fields[2])
    except (IndexError, ValueError):
        return None


def _process_runs(pid: int, run_dir: Path) -> bool:
    """True when `pid` is a live (not zombie) process whose command line names `run_dir`, or whose working folder
    it is (guards against pid reuse)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user: the command line decides
    if not Path("/proc").is_dir():
        return True  # no /proc to look closer (not Linux): trust the signal check
    stat = _proc_stat(pid)
    if stat is None or stat[0] in ("Z", "X"):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if os.fsencode(str(run_dir)) in cmdline:
            return True
        # A run the warm launcher forked carries the launcher's command line; it works in its run folder.
        return os.readlink(f"/proc/{pid}/cwd") == str(run_dir)
    except OSError:
        return False


def _pid_alive(pid: int) -> bool:
    stat = _proc_stat(pid) if Path("/proc").is_dir() else None
    if stat is not None:
        return stat[0] not in ("Z", "X")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _group_alive(pgid: int) -> bool:
    """True while a live (not zombie) process remains in the process group."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    proc = Path("/proc")
    if not proc.is_dir():
        return True
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        stat = _proc_stat(int(entry.name))
        if stat is not None and stat[1] == pgid and stat[0] not in ("Z", "X"):
            return True
    return False


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _runner_env() -> dict[str, str]:
    """The environment of a run's process and of the launcher: this package importable, output unbuffered."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_PARENT, env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _last_exception(log_path: Path) -> str | None:
    """The exception line of the last Python traceback near the end of the run's log ("ValueError: ...")."""
    try:
        with open(log_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - LOG_TAIL_BYTES))
            lines = ANSI.sub("", f.read().decode("utf-8", "replace")).splitlines()
    except OSError:
        return None
    starts = [i for i, line in enumerate(lines) if line.strip() == "Traceback (most recent call last):"]
    if not starts:
        return None
    indent = len(lines[starts[-1]]) - len(lines[starts[-1]].lstrip())
    for line in lines[starts[-1] + 1 :]:
        # The frames are indented deeper than "Traceback"; the exception line is level with it.
        if line.strip() and len(line) - len(line.lstrip()) == indent:
            return line.strip()[:500]
    return None


# ------------------------------------------------------------------------------------------- the engine
class LocalPipelineEngine(PipelineEngine):
    """kfp.local runs in processes of their own, at most `max_concurrent` at once.

    Everything is kept in the run folders, so several threads, several processes of the service and a restarted
    service all see the same runs. Starting is serialised (a thread lock and a lock file) so the limit holds.
    """

    # A run this process started is announced as soon as its result is written (listen_for_run_ends); this
    # interval only paces the looks at runs that another process started, or that were started before a restart.
    watch_interval = 1.0

    def __init__(self, runs_dir: Path, max_concurrent: int, *, terminate_grace: float = 5.0, warm: bool = True):
        self.runs_dir = Path(runs_dir).resolve()
        self.max_concurrent = max_concurrent
        self.terminate_grace = terminate_grace
        self.launcher = WarmLauncher(self.runs_dir) if warm else None
        self._lock = threading.RLock()
        # Runners this process started and has not reaped yet (reaping makes a finished runner's pid vanish).
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self._run_end_listener: Callable[[str], None] | None = None

    # ------------------------------------------------------------------ PipelineEngine
    def register_version(self, pipeline_name: str, version: int, file_path: Path, description: str) -> str | None:
        return None

    def start_run(self, run_id: str, file_path: Path, engine_ref: str | None, parameters: dict[str, str]) -> str:
        """Start the run. Starting a run_id that already started does nothing (a retried step may do that).

        Parameters the pipeline does not declare are left out; string values are converted to the declared type
        (int, float, bool, list or object) where they convert. Raises AdapterError: retryable when every slot is
        taken, not retryable for a bad run id or an unreadable pipeline file.
        """
        run_dir = self._run_dir(run_id)
        file_path = Path(file_path).resolve()
        request = {"pipeline_file": str(file_path),
                   "parameters": run_parameters(load_spec(file_path), parameters, run_id)}
        with self._start_lock():
            if (run_dir / "pid").exists():
                return run_id
            if self._capacity_left() <= 0:
                raise AdapterError(f"all {self.max_concurrent} run slots are taken", retryable=True)
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "result.json").unlink(missing_ok=True)
            _write_atomic(run_dir / "request.json", json.dumps(request))
            # The runner closes its end of this pipe once result.json is written (or dies): the service learns of
            # the end then, not after the runner's interpreter has torn down kfp, pandas and the rest.
            done_read, done_write = os.pipe()
            try:
                # A run the launcher forked wrote its own pid file; a cold one is written here.
                pid = self.launcher.launch(run_dir, done_write) if self.launcher is not None else None
                if pid is None:
                    pid = self._started_by_the_launcher(run_dir)
                warm = pid is not None
                if pid is None:  # nobody started it: a process of its own, started cold
                    with open(run_dir / "output.log", "ab") as output:
                        process = subprocess.Popen(
                            [sys.executable, "-m", RUNNER_MODULE, str(run_dir), str(done_write)],
                            stdin=subprocess.DEVNULL,
                            stdout=output,
                            stderr=subprocess.STDOUT,
                            cwd=run_dir,
                            env=_runner_env(),
                            close_fds=True,
                            pass_fds=(done_write,),
                            start_new_session=True,  # survives a restart of the service; terminate kills the group
                        )
                    self._children[run_id] = process
                    pid = process.pid
                    write_pid(run_dir, pid)
            except OSError as e:
                os.close(done_read)
                (run_dir / STARTER).unlink(missing_ok=True)  # a later try may start it
                raise AdapterError(f"the run could not start: {e}", retryable=True) from None
            except AdapterError:
                os.close(done_read)
                raise
            finally:
                os.close(done_write)
        threading.Thread(target=self._announce_end, args=(run_id, done_read), name=f"tm-run-{run_id}",
                         daemon=True).start()
        log.info("pipeline run started", extra={"run_id": run_id, "pid": pid, "warm": warm})
        return run_id

    def _started_by_the_launcher(self, run_dir: Path) -> int | None:
        """When the launcher took the run's start without answering (slow, stopped, killed): its run's pid once the
        run has settled; None once this process has taken the start instead (the run then starts cold here)."""
        deadline = time.monotonic() + SETTLE_SECONDS + 5
        while True:
            if claim_start(run_dir, os.getpid()):
                return None
            if (run_dir / "pid").exists():
                return self._pid(run_dir)
            claimer = start_claimer(run_dir)
            if claimer is None or claimer == os.getpid() or not _pid_alive(claimer):
                # Taken by a process gone without starting the run (or by an earlier try of ours): take it over.
                (run_dir / STARTER).unlink(missing_ok=True)
                continue
            if time.monotonic() > deadline:
                raise AdapterError("the warm launcher took the run's start and has not started it", retryable=True)
            time.sleep(0.05)

    def start_warm_runner(self) -> None:
        """Runs are forked by a warm launcher from now on (it starts with the first run: see WarmLauncher). Called
        from a thread that lives as long as the engine is used: the launcher ends with the thread that started it."""
        if self.launcher is not None:
            self.launcher.enabled = True

    def stop_warm_runner(self) -> None:
        if self.launcher is not None:
            self.launcher.stop()

    def listen_for_run_ends(self, listener: Callable[[str], None] | None) -> None:
        self._run_end_listener = listener

    def _announce_end(self, run_id: str, done_read: int) -> None:
        # One thread per run this process started (at most max_concurrent). The read returns b"" when the runner
        # has closed its end: result.json is written, or the runner died (then the look finds it gone).
        try:
            os.read(done_read, 1)
        finally:
            os.close(done_read)
        listener = self._run_end_listener
        if listener is None:
            return
        try:
            listener(run_id)
        except Exception:  # the run is still found at the next regular look
            log.exception("run end listener failed", extra={"run_id": run_id})

    def run_status(self, run_id: str) -> RunStatus:
        run_dir = self._existing(run_id)
        self._reap()
        result = self._result(run_dir)
        if result is not None:
            return result
        if self._alive(run_dir):
            return RunStatus("RUNNING")
        # It may have written its result between the two looks.
        return self._result(run_dir) or RunStatus("FAILED", error=LOST)

    def terminate(self, run_id: str) -> None:
        """Stop the run (SIGTERM to its process group, SIGKILL after the grace period). Ended already: no change."""
        run_dir = self._existing(run_id)
        self._reap()
        if (run_dir / "result.json").exists():
            return
        pid = self._pid(run_dir)
        if self._alive(run_dir):
            _signal_group(pid, signal.SIGTERM)
            if not self._wait_group(run_id, pid, self.terminate_grace):
                _signal_group(pid, signal.SIGKILL)
                self._wait_group(run_id, pid, 5.0)
            log.info("pipeline run terminated", extra={"run_id": run_id, "pid": pid})
        if not (run_dir / "result.json").exists():
            try:
                _write_atomic(run_dir / "result.json", json.dumps({"state": "FAILED", "error": TERMINATED}))
            except FileNotFoundError:
                pass  # its job failed meanwhile, and its folder went with it: the run is over either way

    def cleanup(self, run_id: str) -> None:
        """Remove the run's folder (terminating the run first if it still runs). A run already gone: nothing to do."""
        run_dir = self._run_dir(run_id)
        if not run_dir.is_dir():
            return
        if (run_dir / "pid").exists() and self._alive(run_dir):
            self.terminate(run_id)
        self._reap()  # a runner that wrote its result may still be exiting: _reap collects it later
        shutil.rmtree(run_dir, ignore_errors=True)
        log.info("pipeline run cleaned up", extra={"run_id": run_id})

    def capacity_left(self) -> int:
        self._reap()
        return self._capacity_left()

    def run_log(self, run_id: str, offset: int, limit: int) -> RunLog:
        """output.log: kfp.local's own lines and every task's stdout and stderr, as the runner wrote them."""
        run_dir = self._existing(run_id)
        try:
            with open(run_dir / "output.log", "rb") as output:
                size = os.fstat(output.fileno()).st_size
                output.seek(max(0, offset))
                return RunLog(output.read(max(0, limit)), size)
        except FileNotFoundError:  # cleaned up between the look and the read
            raise AdapterError(f"unknown run {run_id!r}") from None

    # ------------------------------------------------------------------ helpers
    def _run_dir(self, run_id: str) -> Path:
        if not isinstance(run_id, str) or not RUN_ID.fullmatch(run_id):
            raise AdapterError(f"invalid run id {run_id!r}: 1 to 128 letters, digits, '-' or '_'")
        return self.runs_dir / run_id

    def _existing(self, run_id: str) -> Path:
        """The folder of a run that was started; AdapterError for any other run id."""
        run_dir = self._run_dir(run_id)
        if not (run_dir / "pid").is_file():
            raise AdapterError(f"unknown run {run_id!r}")
        return run_dir

    @contextmanager
    def _start_lock(self) -> Iterator[None]:
        """Serialises starts among the threads of this process and the processes sharing runs_dir."""
        with self._lock:
            self.runs_dir.mkdir(parents=True, exist_ok=True)
            with open(self.runs_dir / ".start.lock", "a") as lock_file:
                fcntl.flock(lock_file, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(lock_file, fcntl.LOCK_UN)

    def _reap(self) -> None:
        """Collect the exit status of runners this process started, so ended ones do not linger as zombies."""
        with self._lock:
            for run_id, process in list(self._children.items()):
                if process.poll() is not None:
                    del self._children[run_id]

    def _pid(self, run_dir: Path) -> int:
        try:
            return int((run_dir / "pid").read_text().strip())
        except (OSError, ValueError):
            return 0

    def _alive(self, run_dir: Path) -> bool:
        # A child of this process is judged by its handle: right after the fork, before the exec, its command
        # line is still ours and would not name the run.
        pid = self._pid(run_dir)
        child = self._children.get(run_dir.name)
        if child is not None and child.pid == pid and child.poll() is None:
            return True
        return pid > 0 and _process_runs(pid, run_dir)

    def _capacity_left(self) -> int:
        running = 0
        if self.runs_dir.is_dir():
            for run_dir in self.runs_dir.iterdir():
                if run_dir.is_dir() and not (run_dir / "result.json").exists() and self._alive(run_dir):
                    running += 1
        return max(0, self.max_concurrent - running)

    def _wait_group(self, run_id: str, pgid: int, seconds: float) -> bool:
        """Wait until no live process is left in the group; False when the time ran out first."""
        deadline = time.monotonic() + seconds
        while True:
            with self._lock:
                process = self._children.get(run_id)
            if process is not None:
                process.poll()  # reap the runner, else it stays in the group as a zombie
            if not _group_alive(pgid):
                self._reap()
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    def _result(self, run_dir: Path) -> RunStatus | None:
        result_file = run_dir / "result.json"
        try:
            data = json.loads(result_file.read_text())
            ended_at = datetime.fromtimestamp(result_file.stat().st_mtime, timezone.utc)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return RunStatus("FAILED", error="the run's result cannot be read")
        if not isinstance(data, dict):
            return RunStatus("FAILED", error="the run's result cannot be read")
        if data.get("state") == "SUCCEEDED":
            metrics = data.get("metrics")
            return RunStatus(
                "SUCCEEDED",
                model_path=data.get("model_path"),
                metrics=metrics if isinstance(metrics, dict) else {},
                ended_at=ended_at,
            )
        error = ANSI.sub("", str(data.get("error") or "the run failed"))
        if error != TERMINATED:
            # kfp.local only says which task failed; the task's own exception is in the log.
            cause = _last_exception(run_dir / "output.log")
            if cause and cause not in error:
                error = f"{error} {cause}"
        return RunStatus("FAILED", error=error, ended_at=ended_at)
