"""`serve` runs the job steps in one step runner process it supervises: the web workers and the runner stay light
(no pandas, pyarrow or kfp: the runner's warm launcher forks extractions and runs), the master builds no app, the runner is started again when it dies (and /readyz says so while
none is alive), and it stops with the server, also when the master is killed."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import requests

from tests.processes import children, free_port, gone, maps_file, served, stop, until, assert_ready

READY_SECONDS = 180


def _ready(base: str) -> int:
    return requests.get(base + "/readyz", timeout=10).status_code


def _step_runners(master: int) -> list[int]:
    return [pid for pid, command in children(master).items() if "worker --supervised" in command]


def test_serve_runs_steps_in_a_supervised_process_and_keeps_web_workers_light(tmp_path):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {"TM_DATA_DIR": str(tmp_path / "data"), "TM_DATABASE_URL": "", "TM_WORKERS": "2"}
    with served(tmp_path, port, env) as server:
        assert_ready(base, server, READY_SECONDS, tmp_path / "server.log")
        runners = _step_runners(server.pid)
        assert len(runners) == 1, children(server.pid)
        runner = runners[0]
        web = [pid for pid in children(server.pid) if pid != runner]
        assert len(web) == 2

        # The bundled example, trained end to end through the API: its extraction ran in the step runner.
        demo = subprocess.run([sys.executable, "-m", "trainingmgr", "demo", "--url", base, "--timeout", "240"],
                              capture_output=True, text=True, timeout=600, cwd=tmp_path, stdin=subprocess.DEVNULL,
                              env={**os.environ, **env})
        assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
        # The extraction and the runs were forked by the runner's warm launcher, which carries pandas and kfp:
        # neither the runner nor a web worker loaded them.
        launchers = [pid for pid, command in children(runner).items() if "run_launcher" in command]
        assert len(launchers) == 1 and maps_file(launchers[0], "pyarrow"), children(runner)
        for pid in [runner, *web]:
            for heavy in ("pyarrow", "numpy", "pandas"):
                assert not maps_file(pid, heavy), f"process {pid} loaded {heavy}"
        assert not maps_file(server.pid, "sqlalchemy"), "the master imported SQLAlchemy (it builds no app)"

        # Killed, it is started again; meanwhile /readyz says no step runner is alive.
        os.kill(runner, signal.SIGKILL)
        assert until(lambda: _ready(base) == 503 or _step_runners(server.pid) not in ([], [runner]), 30)
        assert until(lambda: _step_runners(server.pid) not in ([], [runner]) and _ready(base) == 200, 120), \
            (tmp_path / "server.log").read_text()[-3000:]
        replacement = _step_runners(server.pid)[0]
        assert stop(server) == 0
    log = (tmp_path / "server.log").read_text()
    assert f"step runner (pid {runner}) was killed by SIGKILL" in log
    assert until(lambda: gone(replacement), 30), "the step runner outlived the server"


def test_the_step_runner_ends_when_the_master_is_killed(tmp_path):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with served(tmp_path, port, {"TM_DATA_DIR": str(tmp_path / "data"), "TM_DATABASE_URL": "",
                                 "TM_WORKERS": "1"}) as server:
        assert_ready(base, server, READY_SECONDS, tmp_path / "server.log")
        processes = list(children(server.pid))
        assert len(processes) == 2
        server.kill()
        server.wait(30)
        assert until(lambda: all(gone(pid) for pid in processes), 60), \
            {pid: gone(pid) for pid in processes}


def test_with_separate_workers_serve_starts_no_step_runner(tmp_path):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {"TM_DATA_DIR": str(tmp_path / "data"), "TM_DATABASE_URL": "", "TM_WORKERS": "1",
           "TM_EMBEDDED_WORKER": "false"}
    with served(tmp_path, port, env) as server:
        assert_ready(base, server, READY_SECONDS, tmp_path / "server.log")
        time.sleep(1.0)  # a step runner, if one were started, would be there by now
        assert _step_runners(server.pid) == [] and len(children(server.pid)) == 1
        ready = requests.get(base + "/readyz", timeout=10)
        assert ready.status_code == 200 and ready.json()["checks"]["step_runner"] == "none alive"


def test_a_step_runner_that_cannot_be_started_is_tried_again_and_the_server_goes_on(tmp_path):
    """Starting a process can fail (no memory, no file descriptor left: just when a runner died of it); the
    master logs it and tries again after the backoff, it does not fall over."""
    import logging

    from trainingmgr.supervisor import FIRST_RESTART_DELAY, StepRunnerProcess

    records: list[str] = []

    class Log(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logger = logging.getLogger("test.supervisor")
    logger.addHandler(Log())
    runner = StepRunnerProcess(logger, argv=[str(tmp_path / "no-such-program")])
    runner.manage()
    assert runner.process is None and runner.delay == FIRST_RESTART_DELAY
    assert records and "could not be started" in records[-1]
    first_retry = runner.next_start
    runner.manage()  # before its time: nothing
    assert runner.next_start == first_retry
    runner.next_start = 0.0
    runner.manage()
    assert runner.delay == 2 * FIRST_RESTART_DELAY, "the delay doubles while it keeps failing"


def test_serve_refuses_an_in_memory_database(tmp_path):
    done = subprocess.run([sys.executable, "-m", "trainingmgr", "serve"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL,
                          env={**os.environ, "TM_DATA_DIR": str(tmp_path), "TM_DATABASE_URL": "sqlite://"})
    assert done.returncode != 0 and "in-memory SQLite database" in done.stderr, done.stderr[-2000:]
