"""How a process that queues work wakes the step runners of other processes, and how anyone tells whether a step
runner is alive.

PostgreSQL: the enqueue's transaction sends NOTIFY on WORK_CHANNEL; each step runner LISTENs on a connection of its
own, named STEP_RUNNER_NAME, so the runners alive are the sessions of that name in `pg_stat_activity` (of this
database, on any host).

SQLite (one machine by nature): each step runner holds a named pipe open for reading in the folder beside the
database file (`<file>.wake/`, 0700); the enqueue writes a byte to each. A pipe whose reader is gone refuses a
writer (ENXIO): that is how a dead runner's pipe is told from a live one, and removed. The ring goes out once the
enqueue's write is made, before it commits; the woken runner's claim is a write transaction, which waits for the
enqueue's (SQLite has one writer at a time) and so sees the new work.
"""
from __future__ import annotations

import errno
import os
import secrets
from pathlib import Path
from typing import Any

from sqlalchemy import text

WORK_CHANNEL = "trainingmgr_work"  # PostgreSQL's LISTEN/NOTIFY channel: new or hurried work
STEP_RUNNER_NAME = "trainingmgr-step-runner"  # application_name of a step runner's listening connection
_WAKE_SUFFIX = ".wake"


def wake_folder(bind: Any) -> Path | None:
    """The wake folder of an SQLite database file (None for an in-memory one or another database)."""
    url = bind.url
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:") or \
            str(url.database).startswith("file:"):
        return None
    return Path(url.database).resolve().parent / (Path(url.database).name + _WAKE_SUFFIX)


def ring(folder: Path) -> None:
    """Wake every step runner listening in `folder`; remove the pipes of runners that are gone. Never fails: a
    runner that misses a ring finds the work at its next look."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        _poke(folder / name, remove_if_dead=True)


def live_pipes(folder: Path) -> int:
    """How many step runners listen in `folder` right now."""
    try:
        names = os.listdir(folder)
    except OSError:
        return 0
    return sum(_poke(folder / name, remove_if_dead=False) for name in names)


def _poke(path: Path, *, remove_if_dead: bool) -> bool:
    """Write a byte to the pipe at `path` if it has a reader; True when it has one."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as e:
        if e.errno == errno.ENXIO and remove_if_dead:  # no reader: its runner is gone
            try:
                path.unlink()
            except OSError:
                pass
        return False
    try:
        if remove_if_dead:
            os.write(fd, b"!")
    except BlockingIOError:  # its buffer is full of rings it has not read yet: it is awake already
        pass
    except OSError:
        pass
    finally:
        os.close(fd)
    return True


class WakePipe:
    """A step runner's end: a named pipe in the wake folder, open for reading (and writing, so it never reads an
    end of file) until close()."""

    def __init__(self, folder: Path):
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = folder / f"{os.getpid()}-{secrets.token_hex(4)}"
        os.mkfifo(self.path, 0o600)
        self.fd = os.open(self.path, os.O_RDWR | os.O_NONBLOCK)

    def fileno(self) -> int:
        return self.fd

    def drain(self) -> None:
        try:
            while os.read(self.fd, 4096):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        try:
            self.path.unlink()
        except OSError:
            pass
        os.close(self.fd)


def announce(session: Any) -> None:
    """Tell the step runners of every process that there is work (called in the enqueue's transaction)."""
    bind = session.get_bind()
    if bind.dialect.name == "postgresql":
        session.execute(text(f"NOTIFY {WORK_CHANNEL}"))  # delivered when the transaction commits
        return
    folder = wake_folder(bind)
    if folder is not None:
        # The write first: from then on this transaction holds SQLite's write lock, which the woken runner's claim
        # waits for. A ring before it could be answered by a claim that finds nothing, and no ring would follow.
        session.flush()
        ring(folder)


def live_step_runners(session: Any) -> int:
    """How many step runners are alive for this database (listening for work), in any process."""
    bind = session.get_bind()
    if bind.dialect.name == "postgresql":
        return int(session.scalar(text(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = :name AND datname = current_database()"
        ), {"name": STEP_RUNNER_NAME}))
    folder = wake_folder(bind)
    return 0 if folder is None else live_pipes(folder)
