"""The embedded pipeline engine with real kfp.local runs (no mocks): each run is a process of its own.

The pipelines are compiled here from tiny components that need nothing but the Python running the tests.
(No `from __future__ import annotations` here: kfp reads the components' annotations as real types.)
"""

import contextlib
import json
import os
import signal
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import pytest

from trainingmgr.adapters.base import AdapterError, RunStatus
from trainingmgr.adapters.pipeline_engine import LOST, TERMINATED, LocalPipelineEngine
from trainingmgr.adapters.pipeline_files import declared_parameters

RUN_TIMEOUT = 60.0  # seconds a tiny run may take (usually well under 2)


# ---------------------------------------------------------------------------------------------------- pipelines
def _compile(folder: Path) -> dict[str, Path]:
    from kfp import compiler, dsl
    from kfp.dsl import Metrics, Model, Output

    options = {"install_kfp_package": False, "packages_to_install": [], "base_image": "python:3.11"}

    @dsl.component(**options)
    def train(featurepath: str, epochs: str, model: Output[Model], metrics: Output[Metrics]):
        import os

        os.makedirs(model.path, exist_ok=True)
        with open(os.path.join(model.path, "weights.txt"), "w") as f:
            f.write(f"{featurepath} trained for {epochs} epochs")
        metrics.log_metric("accuracy", 0.9)
        metrics.log_metric("epochs", int(epochs))

    @dsl.pipeline(name="succeeding")
    def succeeding(featurepath: str, epochs: str = "1"):
        train(featurepath=featurepath, epochs=epochs)

    @dsl.component(**options)
    def boom(message: str):
        raise ValueError("boom: " + message)

    @dsl.pipeline(name="failing")
    def failing(message: str = "no message"):
        boom(message=message)

    @dsl.component(**options)
    def sleep(seconds: int, model: Output[Model]):
        import os
        import time

        print("zzz-task-started", flush=True)
        time.sleep(seconds)
        os.makedirs(model.path, exist_ok=True)

    @dsl.pipeline(name="sleeping")
    def sleeping(seconds: int = 30):
        sleep(seconds=seconds)

    files = {}
    for name, pipeline in (("succeeding", succeeding), ("failing", failing), ("sleeping", sleeping)):
        files[name] = folder / f"{name}.yaml"
        compiler.Compiler().compile(pipeline, str(files[name]))
    return files


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return _compile(tmp_path_factory.mktemp("pipelines"))


@pytest.fixture
def make_engine(tmp_path: Path):
    """Engines on a fresh runs folder; every run still going at the end is terminated."""
    engines: list[LocalPipelineEngine] = []

    def make(max_concurrent: int = 4, *, warm: bool = False, **options) -> LocalPipelineEngine:
        engine = LocalPipelineEngine(tmp_path / "runs", max_concurrent, **options)
        engines.append(engine)
        if warm:  # runs are forked by the warm runner, once it is ready (as after a service's first run)
            engine.start_warm_runner()
            engine.launcher.start()
            wait_for_warm_runner(engine)
        return engine

    yield make
    for engine in engines:
        engine.stop_warm_runner()
        if engine.runs_dir.is_dir():
            for run_dir in engine.runs_dir.iterdir():
                if (run_dir / "pid").is_file():
                    engine.terminate(run_dir.name)
        # Runners that wrote their result may still be exiting: collect them (no zombie, no ResourceWarning).
        for process in list(engine._children.values()):
            process.wait(timeout=10)


# ---------------------------------------------------------------------------------------------------- helpers
def wait_for_warm_runner(engine: LocalPipelineEngine, timeout: float = RUN_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not Path(engine.launcher.socket_path).exists():
        assert engine.launcher.process.poll() is None, "the warm runner exited"
        assert time.monotonic() < deadline, "the warm runner was not ready (it imports kfp)"
        time.sleep(0.05)


def parent_of(pid: int) -> int:
    raw = Path(f"/proc/{pid}/stat").read_text()
    return int(raw[raw.rfind(")") + 2 :].split()[1])


def wait_for(engine: LocalPipelineEngine, run_id: str, timeout: float = RUN_TIMEOUT) -> RunStatus:
    deadline = time.monotonic() + timeout
    while True:
        status = engine.run_status(run_id)
        if status.state != "RUNNING":
            return status
        assert time.monotonic() < deadline, f"run {run_id} still RUNNING after {timeout} s"
        time.sleep(0.1)


def wait_until_task_runs(engine: LocalPipelineEngine, run_id: str, timeout: float = RUN_TIMEOUT) -> None:
    """Until the sleeping task printed: the run's process group then holds the runner and the task."""
    log = engine.runs_dir / run_id / "output.log"
    deadline = time.monotonic() + timeout
    while not (log.exists() and "zzz-task-started" in log.read_text(errors="replace")):
        assert engine.run_status(run_id).state == "RUNNING"
        assert time.monotonic() < deadline, "the sleeping task did not start"
        time.sleep(0.1)


def pid_of(engine: LocalPipelineEngine, run_id: str) -> int:
    return int((engine.runs_dir / run_id / "pid").read_text())


def live_group_members(pgid: int) -> list[int]:
    """Processes of the group that are alive (zombies waiting for a parent's wait() do not count)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rfind(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(entry.name))
    return members


# ---------------------------------------------------------------------------------------------------- outcomes
def test_the_end_of_a_run_this_process_started_is_announced(make_engine, pipelines):
    engine = make_engine()
    ended: list[str] = []
    announced = threading.Event()
    engine.listen_for_run_ends(lambda run_id: (ended.append(run_id), announced.set()))
    run_id = engine.start_run("run-told_1", pipelines["succeeding"], None, {"featurepath": "f", "epochs": "1"})
    assert announced.wait(120), "no announcement"
    assert ended == [run_id]
    # Announced once the result is there: the first look after it already sees the outcome.
    assert engine.run_status(run_id).state == "SUCCEEDED"


def test_a_failing_listener_changes_nothing_for_the_run(make_engine, pipelines):
    engine = make_engine()

    def broken(_run_id: str) -> None:
        raise RuntimeError("listener bug")

    engine.listen_for_run_ends(broken)
    run_id = engine.start_run("run-told_2", pipelines["succeeding"], None, {"featurepath": "f", "epochs": "1"})
    assert wait_for(engine, run_id).state == "SUCCEEDED"


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
def test_a_run_succeeds_with_its_model_folder_and_metrics(make_engine, pipelines, warm):
    engine = make_engine(warm=warm)
    assert engine.register_version("succeeding", 1, pipelines["succeeding"], "") is None
    started = datetime.now(timezone.utc)
    run_id = engine.start_run("run-ok_1", pipelines["succeeding"], None, {"featurepath": "cells_7", "epochs": "3"})
    assert run_id == "run-ok_1"
    status = wait_for(engine, run_id)
    assert status.state == "SUCCEEDED", status
    # When the runner wrote its result, not when we looked: it stays the same however late the next look is.
    assert started < status.ended_at <= datetime.now(timezone.utc)
    time.sleep(0.05)
    assert engine.run_status(run_id).ended_at == status.ended_at
    assert status.error is None
    assert status.metrics == {"accuracy": 0.9, "epochs": 3}
    model = Path(status.model_path)
    assert model.is_dir() and model.is_relative_to(engine.runs_dir / run_id)
    assert (model / "weights.txt").read_text() == "cells_7 trained for 3 epochs"
    assert (engine.runs_dir / run_id / "output.log").stat().st_size > 0
    # A finished run keeps its answer.
    assert engine.run_status(run_id) == status


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
def test_a_failing_task_fails_the_run_with_its_error_without_colours(make_engine, pipelines, warm):
    engine = make_engine(warm=warm)
    run_id = engine.start_run("run-fail", pipelines["failing"], None, {"message": "disk full"})
    status = wait_for(engine, run_id)
    assert status.state == "FAILED"
    assert "boom" in status.error  # the task that failed
    assert "ValueError: boom: disk full" in status.error  # and why
    assert "\x1b" not in status.error
    assert status.model_path is None and status.metrics == {}


def test_a_missing_required_parameter_fails_the_run_and_says_which(make_engine, pipelines):
    engine = make_engine()
    run_id = engine.start_run("run-missing", pipelines["succeeding"], None, {"epochs": "1"})
    status = wait_for(engine, run_id)
    assert status.state == "FAILED"
    assert "featurepath" in status.error and "\x1b" not in status.error


def test_parameters_the_pipeline_does_not_declare_are_left_out(make_engine, pipelines):
    assert declared_parameters(pipelines["succeeding"]) == {"featurepath", "epochs"}
    assert declared_parameters(pipelines["sleeping"]) == {"seconds"}
    engine = make_engine()
    parameters = {"featurepath": "fg_1", "epochs": "2", "modelname": "qoe", "modelversion": "1", "trainingjob_id": "9"}
    run_id = engine.start_run("run-params", pipelines["succeeding"], None, parameters)
    request = json.loads((engine.runs_dir / run_id / "request.json").read_text())
    assert request == {
        "pipeline_file": str(pipelines["succeeding"].resolve()),
        "parameters": {"featurepath": "fg_1", "epochs": "2"},
    }
    # kfp.local would have refused the unknown ones; the run succeeds.
    assert wait_for(engine, run_id).state == "SUCCEEDED"


def test_string_parameters_are_converted_to_the_declared_types(make_engine, pipelines):
    engine = make_engine()
    engine.start_run("run-int", pipelines["sleeping"], None, {"seconds": " 0 "})
    request = json.loads((engine.runs_dir / "run-int" / "request.json").read_text())
    assert request["parameters"] == {"seconds": 0}
    assert wait_for(engine, "run-int").state == "SUCCEEDED"
    # A value that is no integer goes as it is: kfp refuses it and the run says which input was wrong.
    engine.start_run("run-notint", pipelines["sleeping"], None, {"seconds": "soon"})
    status = wait_for(engine, "run-notint")
    assert status.state == "FAILED" and "seconds" in status.error


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
def test_runs_go_in_parallel(make_engine, pipelines, warm):
    engine = make_engine(max_concurrent=3, warm=warm)
    ids = [f"par-{i}" for i in range(3)]
    for i, run_id in enumerate(ids):
        engine.start_run(run_id, pipelines["succeeding"], None, {"featurepath": f"fg_{i}", "epochs": str(i + 1)})
    statuses = {run_id: wait_for(engine, run_id) for run_id in ids}
    assert all(s.state == "SUCCEEDED" for s in statuses.values()), statuses
    for i, run_id in enumerate(ids):
        assert Path(statuses[run_id].model_path, "weights.txt").read_text() == f"fg_{i} trained for {i + 1} epochs"
        assert statuses[run_id].metrics["epochs"] == i + 1
    assert len({s.model_path for s in statuses.values()}) == 3
    assert engine.capacity_left() == 3


# ---------------------------------------------------------------------------------------------------- terminate, lost runs
@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
def test_terminate_kills_the_whole_process_group_and_the_run_reads_terminated(make_engine, pipelines, warm):
    engine = make_engine(max_concurrent=2, terminate_grace=3.0, warm=warm)
    run_id = engine.start_run("run-term", pipelines["sleeping"], None, {"seconds": "30"})
    wait_until_task_runs(engine, run_id)
    pgid = pid_of(engine, run_id)
    assert len(live_group_members(pgid)) >= 2  # the runner and its task
    assert engine.capacity_left() == 1
    started = time.monotonic()
    engine.terminate(run_id)
    assert time.monotonic() - started < 10
    assert live_group_members(pgid) == []
    assert engine.run_status(run_id) == RunStatus("FAILED", error=TERMINATED)
    assert engine.capacity_left() == 2
    # Terminating again, or terminating a run that ended on its own, changes nothing and raises nothing.
    engine.terminate(run_id)
    assert engine.run_status(run_id) == RunStatus("FAILED", error=TERMINATED)


def test_terminate_leaves_a_finished_run_as_it_was(make_engine, pipelines):
    engine = make_engine()
    run_id = engine.start_run("run-done", pipelines["succeeding"], None, {"featurepath": "f"})
    status = wait_for(engine, run_id)
    engine.terminate(run_id)
    assert engine.run_status(run_id) == status and status.state == "SUCCEEDED"


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
def test_a_run_whose_process_was_killed_reads_as_lost(make_engine, pipelines, warm):
    engine = make_engine(warm=warm)
    run_id = engine.start_run("run-lost", pipelines["sleeping"], None, {"seconds": "30"})
    wait_until_task_runs(engine, run_id)
    pgid = pid_of(engine, run_id)
    os.killpg(pgid, signal.SIGKILL)  # as a machine restart would: no result.json is written
    status = wait_for(engine, run_id, timeout=10)
    assert status == RunStatus("FAILED", error=LOST)
    assert not (engine.runs_dir / run_id / "result.json").exists()
    assert engine.capacity_left() == 4


def test_a_pid_reused_by_another_process_does_not_pass_for_the_run(make_engine, pipelines):
    engine = make_engine()
    run_id = engine.start_run("run-reused", pipelines["succeeding"], None, {"featurepath": "f"})
    wait_for(engine, run_id)
    run_dir = engine.runs_dir / run_id
    (run_dir / "result.json").unlink()
    (run_dir / "pid").write_text(str(os.getpid()))  # alive, but it is not this run
    assert engine.run_status(run_id) == RunStatus("FAILED", error=LOST)
    assert engine.capacity_left() == 4


def test_a_run_started_by_an_earlier_service_process_is_followed(make_engine, pipelines):
    """Another engine object (a restarted service, another worker process) reads the same runs."""
    first = make_engine()
    run_id = first.start_run("run-shared", pipelines["sleeping"], None, {"seconds": "30"})
    wait_until_task_runs(first, run_id)
    second = make_engine()
    assert second.run_status(run_id).state == "RUNNING"
    assert second.capacity_left() == 3
    second.terminate(run_id)
    assert first.run_status(run_id) == RunStatus("FAILED", error=TERMINATED)
    assert live_group_members(pid_of(first, run_id)) == []


# ---------------------------------------------------------------------------------------------------- capacity
def test_capacity_counts_running_runs_and_a_full_engine_refuses_to_start(make_engine, pipelines):
    engine = make_engine(max_concurrent=2)
    assert engine.capacity_left() == 2
    engine.start_run("cap-1", pipelines["sleeping"], None, {"seconds": "30"})
    assert engine.capacity_left() == 1
    engine.start_run("cap-2", pipelines["sleeping"], None, {"seconds": "30"})
    assert engine.capacity_left() == 0
    with pytest.raises(AdapterError) as refused:
        engine.start_run("cap-3", pipelines["sleeping"], None, {"seconds": "30"})
    assert refused.value.retryable
    assert not (engine.runs_dir / "cap-3").exists()
    engine.terminate("cap-1")
    assert engine.capacity_left() == 1
    engine.start_run("cap-3", pipelines["sleeping"], None, {"seconds": "30"})
    assert engine.capacity_left() == 0


def test_concurrent_starts_never_exceed_the_limit(make_engine, pipelines):
    engine = make_engine(max_concurrent=2)
    outcomes: dict[str, str] = {}
    barrier = threading.Barrier(5)

    def start(run_id: str) -> None:
        barrier.wait()
        try:
            engine.start_run(run_id, pipelines["sleeping"], None, {"seconds": "30"})
            outcomes[run_id] = "started"
        except AdapterError as e:
            outcomes[run_id] = "retry" if e.retryable else str(e)

    threads = [threading.Thread(target=start, args=(f"race-{i}",)) for i in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes.values()) == ["retry", "retry", "retry", "started", "started"]
    assert engine.capacity_left() == 0


def test_starting_a_started_run_again_starts_nothing(make_engine, pipelines):
    engine = make_engine()
    engine.start_run("run-twice", pipelines["sleeping"], None, {"seconds": "30"})
    pid = pid_of(engine, "run-twice")
    assert engine.start_run("run-twice", pipelines["sleeping"], None, {"seconds": "30"}) == "run-twice"
    assert pid_of(engine, "run-twice") == pid
    assert engine.capacity_left() == 3


# ---------------------------------------------------------------------------------------------------- cleanup, bad ids
def test_cleanup_removes_the_run_folder_terminating_a_live_run(make_engine, pipelines):
    engine = make_engine()
    done = engine.start_run("clean-done", pipelines["succeeding"], None, {"featurepath": "f"})
    wait_for(engine, done)
    engine.cleanup(done)
    assert not (engine.runs_dir / done).exists()
    with pytest.raises(AdapterError):
        engine.run_status(done)

    live = engine.start_run("clean-live", pipelines["sleeping"], None, {"seconds": "30"})
    wait_until_task_runs(engine, live)
    pgid = pid_of(engine, live)
    engine.cleanup(live)
    assert not (engine.runs_dir / live).exists()
    assert live_group_members(pgid) == []
    # A second cleanup (a retried deletion) has nothing left to do.
    engine.cleanup(live)


def test_unknown_and_invalid_run_ids_are_adapter_errors(make_engine, pipelines):
    engine = make_engine()
    for call in (engine.run_status, engine.terminate):
        with pytest.raises(AdapterError, match="unknown run"):
            call("never-started")
    for bad in ("../escape", "a/b", "", "x" * 129, "space d"):
        with pytest.raises(AdapterError, match="invalid run id"):
            engine.start_run(bad, pipelines["succeeding"], None, {})
        with pytest.raises(AdapterError, match="invalid run id"):
            engine.run_status(bad)
    assert not (engine.runs_dir.parent / "escape").exists()


def test_a_pipeline_file_that_is_missing_or_not_a_pipeline_is_refused(make_engine, tmp_path):
    engine = make_engine()
    with pytest.raises(AdapterError) as missing:
        engine.start_run("bad-file", tmp_path / "nowhere.yaml", None, {})
    assert not missing.value.retryable
    not_yaml = tmp_path / "broken.yaml"
    not_yaml.write_text("key: [unclosed")
    with pytest.raises(AdapterError):
        engine.start_run("bad-file", not_yaml, None, {})
    assert not (engine.runs_dir / "bad-file").exists()


def test_a_warm_run_is_forked_by_the_warm_runner_and_one_started_without_it_is_cold(make_engine, pipelines, tmp_path):
    engine = make_engine(warm=True)
    launcher = engine.launcher.process.pid
    run_id = engine.start_run("run-warm", pipelines["sleeping"], None, {"seconds": "30"})
    wait_until_task_runs(engine, run_id)
    pid = pid_of(engine, run_id)
    assert parent_of(pid) == launcher, "forked by the warm runner, not started as a new interpreter"
    assert os.getpgid(pid) == pid, "in a session of its own: terminable as a group, outliving the service"
    assert os.readlink(f"/proc/{pid}/cwd") == str(engine.runs_dir / run_id)
    # The warm runner goes away (killed, or idle for long): the next run starts cold, and it comes back.
    engine.launcher.process.kill()
    engine.launcher.process.wait(10)
    cold_id = engine.start_run("run-cold", pipelines["succeeding"], None, {"featurepath": "f"})
    assert parent_of(pid_of(engine, cold_id)) == os.getpid(), "started as a process of this one"
    assert wait_for(engine, cold_id).state == "SUCCEEDED"
    assert engine.run_status(run_id).state == "RUNNING", "a warm runner's death leaves its runs running"
    wait_for_warm_runner(engine)
    again = engine.start_run("run-warm-again", pipelines["succeeding"], None, {"featurepath": "f"})
    assert parent_of(pid_of(engine, again)) == engine.launcher.process.pid
    assert wait_for(engine, again).state == "SUCCEEDED"


def test_the_warm_runner_starts_with_the_first_run_so_an_idle_service_does_not_keep_it(tmp_path, pipelines):
    engine = LocalPipelineEngine(tmp_path / "runs", 2)
    try:
        engine.start_warm_runner()
        assert engine.launcher.process is None, "enabled, not started: nothing runs yet"
        first = engine.start_run("run-first", pipelines["succeeding"], None, {"featurepath": "f"})
        assert parent_of(pid_of(engine, first)) == os.getpid(), "the first run starts cold"
        assert engine.launcher.process is not None and engine.launcher.process.poll() is None
        assert wait_for(engine, first).state == "SUCCEEDED"
        wait_for_warm_runner(engine)
        second = engine.start_run("run-second", pipelines["succeeding"], None, {"featurepath": "f"})
        assert parent_of(pid_of(engine, second)) == engine.launcher.process.pid, "later runs start warm"
        assert wait_for(engine, second).state == "SUCCEEDED"
    finally:
        engine.stop_warm_runner()
        for process in list(engine._children.values()):
            process.wait(timeout=10)


def test_a_launcher_that_answers_too_late_does_not_start_the_run_a_second_time(make_engine, pipelines):
    """The engine gives up waiting and starts the run cold; the launcher, when it gets to the request, finds the
    run's start taken and forks nothing (before: both started it, in one folder)."""
    engine = make_engine(warm=True)
    engine.launcher.answer_timeout = 1.0
    launcher = engine.launcher.process.pid
    os.kill(launcher, signal.SIGSTOP)  # as a launcher stalled on a loaded machine
    try:
        run_id = engine.start_run("run-late", pipelines["succeeding"], None, {"featurepath": "f"})
    finally:
        os.kill(launcher, signal.SIGCONT)
    pid = pid_of(engine, run_id)
    assert parent_of(pid) == os.getpid(), "started cold, once the launcher did not answer"
    assert wait_for(engine, run_id).state == "SUCCEEDED"
    time.sleep(1.0)  # the launcher handles the stale request now
    assert pid_of(engine, run_id) == pid
    log = (engine.runs_dir / run_id / "output.log").read_text()
    assert log.count("Running pipeline") == 1, log
    assert "run's start was taken" not in log
    children = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _ppid_or_none(int(p.name)) == launcher]
    assert children == [], "the launcher forked nothing for it"


def _ppid_or_none(pid: int) -> int | None:
    try:
        return parent_of(pid)
    except OSError:
        return None


def test_the_launchers_socket_is_private_and_only_the_launcher_is_believed(make_engine, pipelines, tmp_path):
    import socket
    import stat

    engine = make_engine(warm=True)
    folder = Path(engine.launcher.folder)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700 and folder.stat().st_uid == os.getuid()
    assert stat.S_IMODE(Path(engine.launcher.socket_path).stat().st_mode) == 0o600
    # Another process answering at the launcher's address is not believed: the run starts cold.
    Path(engine.launcher.socket_path).unlink()
    impostor = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    impostor.bind(engine.launcher.socket_path)
    impostor.listen(1)
    try:
        run_id = engine.start_run("run-impostor", pipelines["succeeding"], None, {"featurepath": "f"})
        assert parent_of(pid_of(engine, run_id)) == os.getpid()
        assert wait_for(engine, run_id).state == "SUCCEEDED"
    finally:
        impostor.close()


@pytest.mark.parametrize("request_line", [b"not json\n", b'["run_dir"]\n', b'{"run_dir": 7}\n', b'{"extract": 7}\n',
                                          b"\x00" * 10 + b"\n"])
def test_a_bad_request_to_the_launcher_is_refused_and_keeps_no_pipe_open(make_engine, request_line):
    """The launcher's socket is an input too (this user's only): a request that is not {"run_dir": ...} gets an
    error, forks nothing, and the pipe end sent with it is closed (else its reader would wait for ever)."""
    import array
    import json as json_module
    import socket

    engine = make_engine(warm=True)
    done_read, done_write = os.pipe()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
            connection.settimeout(RUN_TIMEOUT)
            connection.connect(engine.launcher.socket_path)
            connection.sendmsg([request_line], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [done_write]))])
            answer = b""
            while not answer.endswith(b"\n"):
                chunk = connection.recv(4096)
                assert chunk, "the launcher closed without answering"
                answer += chunk
        assert "error" in json_module.loads(answer)
        os.close(done_write)
        done_write = -1
        os.set_blocking(done_read, False)
        deadline = time.monotonic() + 10
        while True:  # EOF once no process holds the write end any more
            try:
                if os.read(done_read, 1) == b"":
                    break
            except BlockingIOError:
                pass
            assert time.monotonic() < deadline, "the launcher kept the pipe end it was sent"
            time.sleep(0.05)
        assert engine.launcher.process.poll() is None, "the launcher goes on serving"
    finally:
        os.close(done_read)
        if done_write >= 0:
            os.close(done_write)


# ---------------------------------------------------------------------------------------------- extractions
def _forking_extractor(engine: LocalPipelineEngine, tmp_path: Path, monkeypatch, **options):
    """An EmbeddedExtractor that hands its extractions to the engine's launcher, as in a step runner without
    pandas; doing one in this process fails the test."""
    from tests.peers import LOCAL_OUTBOUND
    from trainingmgr.adapters import extraction

    source = tmp_path / "sources"
    source.mkdir(exist_ok=True)
    (source / "kpis.csv").write_text("cell,dl,ul\nc1,1,10\nc2,2,20\nc3,3,30\n")
    monkeypatch.setattr(extraction, "_loaded_here", lambda: False)
    extractor = extraction.EmbeddedExtractor([source], tmp_path / "datasets", outbound=LOCAL_OUTBOUND,
                                             fork_server=engine.launcher, **options)

    def not_here(*_args, **_kwargs):
        raise AssertionError("the extraction ran in the asking process")

    monkeypatch.setattr(extractor, "_extract", not_here)
    return extractor


def _extraction(measurement: str, *, source: str = "CsvSource", query_filter: str = "",
                host: str = "", port: str = ""):
    from trainingmgr.adapters.base import ExtractionRequest

    return ExtractionRequest(trainingjob_id=7, featurepath="kpis_7", datalake_source=source,
                             feature_list=["cell", "dl"], query_filter=query_filter,
                             source={"measurement": measurement, "host": host, "port": port, "bucket": "b",
                                     "db_org": "o", "token": "secret-token", "source_name": ""})


def test_extractions_run_in_processes_forked_by_the_warm_launcher(make_engine, tmp_path, monkeypatch, caplog):
    import logging

    engine = make_engine()
    engine.start_warm_runner()  # enabled, not started: the first extraction starts it and waits for it
    extractor = _forking_extractor(engine, tmp_path, monkeypatch)
    with caplog.at_level(logging.INFO, logger="trainingmgr.adapters.extraction"):
        status = extractor.start(_extraction("kpis.csv", query_filter="dl >= 2"))
    # Its log line is written here, with its fields, as if the extraction had run in this process.
    written = [r for r in caplog.records if r.getMessage() == "dataset written"]
    assert len(written) == 1 and written[0].trainingjob_id == 7 and written[0].rows == 2
    assert status.state == "COMPLETED" and status.rows == 2
    assert Path(status.dataset_uri).read_text() == "cell,dl\nc2,2\nc3,3\n"
    assert engine.launcher.process is not None and engine.launcher.process.poll() is None
    # Bad input is said as in process: not retryable, with the reason.
    with pytest.raises(AdapterError) as missing:
        extractor.start(_extraction("nowhere.csv"))
    assert missing.value.retryable is False and "not found" in str(missing.value)
    with pytest.raises(AdapterError) as unknown:
        extractor.start(_extraction("kpis.csv", query_filter="nope > 1"))
    assert unknown.value.retryable is False and "query_filter" in str(unknown.value)


@contextlib.contextmanager
def _hanging_extraction(engine: LocalPipelineEngine, extractor) -> Iterator[tuple[int, list[BaseException]]]:
    """An extraction from an InfluxDB that accepts the connection and never answers, asked in a thread: the pid of
    the process the launcher forked for it, and (once the thread ended) what start() raised."""
    import socket

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    outcome: list[BaseException] = []

    def extract() -> None:
        try:
            extractor.start(_extraction("m", source="InfluxSource", host="127.0.0.1",
                                        port=str(silent.getsockname()[1])))
        except BaseException as e:  # noqa: BLE001 - kept for the caller's assertions
            outcome.append(e)

    asking = threading.Thread(target=extract)
    asking.start()
    try:
        launcher = engine.launcher.process.pid
        deadline = time.monotonic() + RUN_TIMEOUT
        forked: list[int] = []
        while not forked:
            assert time.monotonic() < deadline, "the launcher forked no extraction"
            forked = [int(p.name) for p in Path("/proc").iterdir()
                      if p.name.isdigit() and _ppid_or_none(int(p.name)) == launcher]
            time.sleep(0.05)
        yield forked[0], outcome
        asking.join(RUN_TIMEOUT)
        assert not asking.is_alive(), "the step waited on"
    finally:
        silent.close()
        asking.join(RUN_TIMEOUT)


def test_an_extraction_whose_process_is_killed_is_retryable(make_engine, tmp_path, monkeypatch):
    """Killed (as by the OOM killer), the forked extraction answers nothing: the step is tried again later, and
    the launcher goes on."""
    engine = make_engine(warm=True)
    with _hanging_extraction(engine, _forking_extractor(engine, tmp_path, monkeypatch)) as (forked, outcome):
        os.kill(forked, signal.SIGKILL)
    assert len(outcome) == 1 and isinstance(outcome[0], AdapterError), outcome
    assert outcome[0].retryable and "ended without an answer" in str(outcome[0])
    assert engine.launcher.process.poll() is None, "the launcher goes on serving"


def test_an_extraction_ends_with_its_launcher_and_the_launcher_removes_its_folder(make_engine, tmp_path,
                                                                                    monkeypatch):
    """The step runner stops (its launcher with it): the extraction the launcher forked ends too, and the waiting
    step is told at once (retryable), instead of waiting for a source that does not answer."""
    engine = make_engine(warm=True)
    with _hanging_extraction(engine, _forking_extractor(engine, tmp_path, monkeypatch)) as (forked, outcome):
        engine.launcher.process.send_signal(signal.SIGKILL)  # as when its step runner is killed
        engine.launcher.process.wait(10)
    deadline = time.monotonic() + RUN_TIMEOUT
    while _ppid_or_none(forked) is not None and "Z" not in Path(f"/proc/{forked}/stat").read_text():
        assert time.monotonic() < deadline, "the extraction outlived its launcher"
        time.sleep(0.05)
    assert len(outcome) == 1 and isinstance(outcome[0], AdapterError) and outcome[0].retryable, outcome
    # A launcher told to end (SIGTERM: what it gets when its step runner dies) removes its private folder itself.
    engine.launcher.start()
    wait_for_warm_runner(engine)
    folder = Path(engine.launcher.folder)
    engine.launcher.process.terminate()
    engine.launcher.process.wait(RUN_TIMEOUT)
    assert not folder.exists()


def test_an_extraction_runs_here_when_the_launcher_cannot_be_asked(make_engine, tmp_path):
    from tests.peers import LOCAL_OUTBOUND
    from trainingmgr.adapters.extraction import EmbeddedExtractor

    engine = make_engine()  # not enabled: no launcher will start
    source = tmp_path / "sources"
    source.mkdir()
    (source / "kpis.csv").write_text("cell,dl\nc1,1\n")
    extractor = EmbeddedExtractor([source], tmp_path / "datasets", outbound=LOCAL_OUTBOUND,
                                  fork_server=engine.launcher)
    assert engine.launcher.extract({"any": "job"}, 5.0) is None
    assert extractor.start(_extraction("kpis.csv")).rows == 1
    assert engine.launcher.process is None


def test_a_run_reads_its_pipeline_with_libyaml_and_gets_the_same_spec():
    """kfp parses a compiled pipeline with PyYAML's pure Python loader (20-30 ms of each run's start); a run's
    process has it use libyaml (kfp_local_runner.parse_pipelines_with_libyaml). The pipeline kfp builds is the
    same. In a process of its own: the switch is for the whole process, as in a run's."""
    import subprocess
    import sys

    examples = Path(__file__).resolve().parent.parent / "examples" / "pipelines"
    check = (
        "import sys, yaml\n"
        "from kfp.components import load_component_from_file\n"
        "from kfp.dsl import structures\n"
        "from trainingmgr.adapters.kfp_local_runner import parse_pipelines_with_libyaml\n"
        "before = [load_component_from_file(f) for f in sys.argv[1:]]\n"
        "parse_pipelines_with_libyaml()\n"
        "assert structures.yaml is not yaml and structures.yaml.safe_load_all is not yaml.safe_load_all\n"
        "after = [load_component_from_file(f) for f in sys.argv[1:]]\n"
        "assert [c.pipeline_spec for c in before] == [c.pipeline_spec for c in after]\n"
        "assert [c.component_spec for c in before] == [c.component_spec for c in after]\n"
        "print('same', len(after))\n"
    )
    files = [str(examples / "qoe_training.yaml"), str(examples / "qoe_retraining.yaml")]
    done = subprocess.run([sys.executable, "-c", check, *files], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "same 2"
