"""The wake folder beside an SQLite file is an input too: only this user's named pipes in a folder closed to others
are written to or counted as step runners; anything else there (a link, a file, a folder of another user or
open to others) is left alone. A runner's pipe is never found without its reader, and comes back if removed."""
from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest

from tests.factories import step_runner_listening
from tests.processes import until
from trainingmgr.models.work_wake import PIPE_SUFFIX, RING_STEPS, WakePipe, live_pipes, ring


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    made = tmp_path / "trainingmgr.db.wake"
    made.mkdir(mode=0o700)
    return made


def test_only_live_pipes_are_rung_and_counted(folder: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("HELLO")
    (folder / f"link{PIPE_SUFFIX}").symlink_to(victim)
    (folder / f"file{PIPE_SUFFIX}").write_text("REGULAR")
    dead = folder / f"dead{PIPE_SUFFIX}"
    os.mkfifo(dead, 0o600)  # a runner that died: no reader
    pipe = WakePipe(folder)
    try:
        assert live_pipes(folder) == 1
        ring(folder)
        assert victim.read_text() == "HELLO" and (folder / f"file{PIPE_SUFFIX}").read_text() == "REGULAR"
        assert not dead.exists(), "a pipe without a reader is removed by a ring"
        assert os.read(pipe.fd, 16) == RING_STEPS
    finally:
        pipe.close()
    assert live_pipes(folder) == 0 and not pipe.path.exists()


@pytest.mark.parametrize("how", ["open to others", "another user's", "a link to a folder"])
def test_a_wake_folder_that_is_not_ours_alone_is_neither_used_nor_believed(tmp_path: Path, how: str) -> None:
    real = tmp_path / "elsewhere"
    real.mkdir(mode=0o700)
    folder = tmp_path / "trainingmgr.db.wake"
    if how == "a link to a folder":
        folder.symlink_to(real)
    else:
        folder.mkdir(mode=0o700)
    target = folder if how != "a link to a folder" else real
    victim = target / f"victim{PIPE_SUFFIX}"
    victim.write_text("DATA")
    listening = target / f"listening{PIPE_SUFFIX}"
    os.mkfifo(listening, 0o600)
    reader = os.open(listening, os.O_RDWR | os.O_NONBLOCK)  # someone listening there
    try:
        if how == "open to others":
            folder.chmod(0o777)
        elif how == "another user's":
            if os.geteuid() != 0:
                pytest.skip("needs root to give the folder to another user")
            os.chown(folder, 65534, 65534)
        ring(folder)
        assert victim.read_text() == "DATA"
        with pytest.raises(BlockingIOError):
            os.read(reader, 16)  # not rung
        assert live_pipes(folder) == 0, "a folder anybody else could write in does not say a runner is alive"
        with pytest.raises(PermissionError):
            WakePipe(folder)
    finally:
        os.close(reader)


def test_a_pipe_is_renamed_into_place_only_once_it_has_its_reader(folder: Path) -> None:
    pipe = WakePipe(folder)
    try:
        assert stat.S_ISFIFO(os.lstat(pipe.path).st_mode) and pipe.alive()
        assert [p.name for p in folder.iterdir()] == [pipe.path.name], "nothing left under its making name"
        pipe.path.unlink()
        assert not pipe.alive()
    finally:
        pipe.close()


def test_a_workers_pipe_comes_back_when_its_folder_is_removed(build_app, sqlite_only) -> None:
    app = build_app()
    client = app.test_client()
    app.extensions["trainingmgr"].stop_worker()
    worker = app.extensions["trainingmgr"].start_worker(app)
    # Asked as another process would (the in-process worker is not counted): its pipe says it is alive.
    alive = lambda: step_runner_listening(app)  # noqa: E731
    assert until(alive, 30)
    for entry in worker.wake_folder.iterdir():
        entry.unlink()
    worker.wake_folder.rmdir()
    started = time.monotonic()
    assert until(alive, 30), "the worker listens again"
    print(f"\nlistening again {time.monotonic() - started:.2f} s after its wake folder was removed")
    assert client.get("/readyz").status_code == 200
