"""How a process that queues work wakes the step runners of other processes, and how anyone tells whether a step
runner is alive.

PostgreSQL: the enqueue's transaction sends NOTIFY on WORK_CHANNEL; each step runner LISTENs on a connection of its
own, named STEP_RUNNER_NAME, so the runners alive are the sessions of that name in `pg_stat_activity` (of this
database, on any host).

SQLite (one machine by nature): each step runner holds a named pipe open for reading in the folder beside the
database file (`<file>.wake/`, this user's, mode 0700: a folder that is anything else is neither written to nor
believed); the enqueue writes a byte to each. A pipe whose reader is gone refuses a
writer (ENXIO): that is how a dead runner's pipe is told from a live one, and removed. The ring goes out once the
enqueue's write is made, before it commits; the woken runner's claim is a write transaction, which waits for the
enqueue's (SQLite has one writer at a time) and so sees the new work.
"""
from __future__ import annotations

import errno
import os
import secrets
import stat
from pathlib import Path
from typing import Any

from sqlalchemy import text

WORK_CHANNEL = "trainingmgr_work"  # PostgreSQL's LISTEN/NOTIFY channel: new or hurried work
STEP_RUNNER_NAME = "trainingmgr-step-runner"  # application_name of a step runner's listening connection
_WAKE_SUFFIX = ".wake"
PIPE_SUFFIX = ".pipe"
# What a ring says (one byte): work for the notification threads, or for the step threads. A runner rings only
# the pool it concerns; any other byte rings both.
RING_NOTIFY, RING_STEPS = b"n", b"s"


def wake_folder(bind: Any) -> Path | None:
    """The wake folder of an SQLite database file (None for an in-memory one or another database)."""
    url = bind.url
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:") or \
            str(url.database).startswith("file:"):
        return None
    return Path(url.database).resolve().parent / (Path(url.database).name + _WAKE_SUFFIX)


def _own_folder(folder: Path) -> bool:
    """Whether `folder` is a real folder (not a link) of this user that only this user may enter: a wake folder
    anybody else could write in (a link to elsewhere, a file of theirs) is not written to, nor believed."""
    try:
        st = os.lstat(folder)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) & 0o077 == 0


def _pipes(folder: Path) -> list[Path]:
    """The runners' pipes in `folder` (their names end in PIPE_SUFFIX; a pipe being made has another name)."""
    if not _own_folder(folder):
        return []
    try:
        return [folder / name for name in os.listdir(folder) if name.endswith(PIPE_SUFFIX)]
    except OSError:
        return []


def ring(folder: Path, what: bytes = RING_STEPS) -> None:
    """Wake every step runner listening in `folder` (`what`: RING_NOTIFY or RING_STEPS); remove the pipes of
    runners that are gone. Never fails: a runner that misses a ring finds the work at its next look."""
    for path in _pipes(folder):
        _poke(path, remove_if_dead=True, what=what)


def live_pipes(folder: Path) -> int:
    """How many step runners listen in `folder` right now."""
    return sum(_poke(path, remove_if_dead=False) for path in _pipes(folder))


def _poke(path: Path, *, remove_if_dead: bool, what: bytes = RING_STEPS) -> bool:
    """Write a byte to the named pipe at `path` if it has a reader; True when it has one. Anything else there (a
    link, a file) is neither written nor counted."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError as e:
        if e.errno == errno.ENXIO and remove_if_dead:  # a pipe without a reader: its runner is gone
            try:
                path.unlink()
            except OSError:
                pass
        return False
    try:
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return False
        if remove_if_dead:
            os.write(fd, what)
    except BlockingIOError:  # its buffer is full of rings it has not read yet: it is awake already
        pass
    except OSError:
        pass
    finally:
        os.close(fd)
    return True


class WakePipe:
    """A step runner's end: a named pipe in the wake folder, open for reading (and writing, so it never reads an
    end of file) until close(). It is made under a name rings ignore and renamed once open, so no ring finds it
    without a reader and removes it; alive() says whether it is still there (an operator may remove the folder)."""

    def __init__(self, folder: Path):
        try:
            folder.mkdir(mode=0o700)
        except FileExistsError:
            pass
        if not _own_folder(folder):
            raise PermissionError(f"{folder} is not a folder of this user closed to others (mode 0700)")
        name = f"{os.getpid()}-{secrets.token_hex(4)}"
        making = folder / f".{name}"
        os.mkfifo(making, 0o600)
        try:
            self.fd = os.open(making, os.O_RDWR | os.O_NONBLOCK | os.O_NOFOLLOW)
        except OSError:
            making.unlink(missing_ok=True)
            raise
        self.path = folder / (name + PIPE_SUFFIX)
        os.rename(making, self.path)
        self._inode = os.fstat(self.fd).st_ino

    def fileno(self) -> int:
        return self.fd

    def alive(self) -> bool:
        """Still in the folder (a ring could find it)."""
        try:
            return os.lstat(self.path).st_ino == self._inode
        except OSError:
            return False

    def drain(self) -> bytes:
        """The distinct bytes rung since the last drain."""
        rung = set()
        try:
            while chunk := os.read(self.fd, 4096):
                rung.update(chunk)
        except BlockingIOError:
            pass
        return bytes(sorted(rung))

    def close(self) -> None:
        if self.alive():
            try:
                self.path.unlink()
            except OSError:
                pass
        os.close(self.fd)


def announce(session: Any, what: bytes = RING_STEPS) -> None:
    """Tell the step runners of every process that there is work (called in the enqueue's transaction); `what`:
    RING_NOTIFY or RING_STEPS."""
    bind = session.get_bind()
    if bind.dialect.name == "postgresql":
        session.execute(text(f"NOTIFY {WORK_CHANNEL}"))  # delivered when the transaction commits
        return
    folder = wake_folder(bind)
    if folder is not None:
        # The write first: from then on this transaction holds SQLite's write lock, which the woken runner's claim
        # waits for. A ring before it could be answered by a claim that finds nothing, and no ring would follow.
        session.flush()
        ring(folder, what)


def live_step_runners(session: Any) -> int:
    """How many step runners are alive for this database (listening for work), in any process."""
    bind = session.get_bind()
    if bind.dialect.name == "postgresql":
        return int(session.scalar(text(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = :name AND datname = current_database()"
        ), {"name": STEP_RUNNER_NAME}))
    folder = wake_folder(bind)
    return 0 if folder is None else live_pipes(folder)
