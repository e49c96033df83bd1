"""Writers and idle workers hold the database's write lock no longer than their writes need.

- On SQLite the write transactions of one process's threads take turns in the process (WriterTurns): a thread
  waits for the writer before it in a queue, not in SQLite's busy loop (which sleeps 1, 2, 5 ... 100 ms between
  tries); the turn ends with the transaction, however it ends.
- Reads that are not requests (a worker's peek, the event hub) begin deferred inside read_only_transactions().
- A worker step ends its session when it ends: nothing it read after its last commit keeps a transaction open
  (on SQLite, the write lock) while the thread waits for more work.
- Work queued in this process is claimed once, not once per idle thread.
"""
from __future__ import annotations

import sqlite3
import threading
import time

import pytest
from sqlalchemy import event, text, update

from tests.processes import until
from tests.test_training_lifecycle import JOBS, job_request, setup, wait_for  # noqa: F401
from trainingmgr.extensions import db, read_only_transactions
from trainingmgr.models import FeatureGroup
from trainingmgr.models.work_queue import EXTRACT, WorkQueue


class Begins:
    """The BEGIN statements the app's engine sends, with the name of the thread that sent each."""

    def __init__(self, engine):
        self.engine = engine
        self.seen: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        event.listen(engine, "before_cursor_execute", self._statement)

    def _statement(self, conn, cursor, statement, parameters, context, executemany) -> None:
        if statement.startswith("BEGIN"):
            with self.lock:
                self.seen.append((threading.current_thread().name, statement))

    def of(self, thread_name: str) -> list[str]:
        with self.lock:
            return [statement for name, statement in self.seen if name == thread_name]

    def detach(self) -> None:
        event.remove(self.engine, "before_cursor_execute", self._statement)


def _turns(app):
    with app.app_context():
        with db.engine.connect() as conn:
            return type(conn.connection.dbapi_connection).writers


def test_sqlite_writers_of_one_process_take_turns(app, sqlite_only):
    turns = _turns(app)
    with app.app_context():
        begins = Begins(db.engine)
    first_holds, second_done, errors = threading.Event(), threading.Event(), []
    release_first = threading.Event()

    def write(name: str, hold: threading.Event | None) -> None:
        try:
            with app.app_context():
                db.session.execute(update(FeatureGroup).values(measurement=name))
                if hold is not None:
                    first_holds.set()
                    assert release_first.wait(30)
                db.session.commit()
                db.session.remove()
        except BaseException as e:  # noqa: BLE001 - reported by the test's thread
            errors.append(e)
        finally:
            if hold is None:
                second_done.set()

    first = threading.Thread(target=write, args=("first", first_holds), name="writer-first")
    second = threading.Thread(target=write, args=("second", None), name="writer-second")
    try:
        first.start()
        assert first_holds.wait(30)
        assert turns.holder == first.ident
        second.start()
        # The second writer waits for its turn in this process: it has not even begun in SQLite.
        time.sleep(0.3)
        assert begins.of("writer-second") == [] and not second_done.is_set()
        release_first.set()
        assert second_done.wait(30)
        assert begins.of("writer-second") == ["BEGIN IMMEDIATE"], "its own write transaction, once the first ended"
        assert turns.holder is None, "each turn ended with its transaction"
        assert errors == []
    finally:
        release_first.set()
        first.join(30)
        second.join(30)
        begins.detach()


@pytest.mark.parametrize("ending", ["commit", "rollback", "close"])
def test_a_turn_ends_with_its_transaction_however_it_ends(app, sqlite_only, ending):
    turns = _turns(app)
    with app.app_context():
        db.session.execute(update(FeatureGroup).values(measurement="x"))
        assert turns.holder == threading.get_ident()
        getattr(db.session, ending)()
        assert turns.holder is None
        db.session.remove()


def test_read_only_transactions_take_no_write_lock(app, settings, sqlite_only):
    """Inside read_only_transactions() a read begins deferred: it neither takes a turn nor waits for a writer of
    another process."""
    other = sqlite3.connect(settings.sqlalchemy_url.removeprefix("sqlite:///"), isolation_level=None, timeout=0)
    turns = _turns(app)
    try:
        other.execute("BEGIN IMMEDIATE")  # another process in the middle of a write
        with app.app_context():
            begins = Begins(db.engine)
            try:
                with read_only_transactions():
                    assert db.session.scalar(text("SELECT count(*) FROM work_items")) == 0
                    assert turns.holder is None
                    db.session.rollback()
            finally:
                begins.detach()
        assert [statement for _, statement in begins.seen] == ["BEGIN"]
    finally:
        other.execute("ROLLBACK")
        other.close()


def _open_transactions(app, settings) -> list[str]:
    """Transactions of the service open right now: on PostgreSQL its sessions idle in a transaction; on SQLite,
    whether another process could take the write lock at once."""
    if settings.is_sqlite:
        other = sqlite3.connect(settings.sqlalchemy_url.removeprefix("sqlite:///"), isolation_level=None, timeout=0)
        try:
            other.execute("BEGIN IMMEDIATE")
            other.execute("ROLLBACK")
            return []
        except sqlite3.OperationalError as e:
            return [str(e)]
        finally:
            other.close()
    with app.app_context():
        with db.engine.connect() as conn:
            return list(conn.execute(text(
                "SELECT query FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid() "
                "AND state = 'idle in transaction'")).scalars())


def test_idle_workers_hold_no_transaction_after_a_job(setup, worker, app, settings):
    """Before: a step that read an attribute after its last commit (a log line) began a transaction that stayed
    open while its thread waited for work: on SQLite the write lock, held for up to the idle poll."""
    client = setup
    job = wait_for(client, client.post(JOBS, json=job_request()).get_json()["id"])
    assert job["status"] == "FINISHED"
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:  # the workers are idle now: look a few times while they wait
        assert _open_transactions(app, settings) == []
        time.sleep(0.2)


def test_work_queued_here_is_claimed_once_not_by_every_idle_thread(app, worker, setup, settings):
    """Six idle threads (4 step, 2 notification): one enqueue of a step's work is answered by at most two claims
    (on SQLite the enqueue's ring and the wake-up after its commit), none by the notification threads."""
    from tests.factories import step_runner_listening

    client = setup
    assert until(lambda: step_runner_listening(app), 60)
    job = wait_for(client, client.post(JOBS, json=job_request()).get_json()["id"])
    time.sleep(1.0)  # idle again
    claims: list[str] = []
    lock = threading.Lock()

    def statement(conn, cursor, sql, parameters, context, executemany) -> None:
        sql = " ".join(sql.upper().split())
        if sql.startswith("UPDATE WORK_ITEMS SET") and "LEASE_OWNER" in sql and "RETURNING" in sql:  # a claim
            with lock:
                claims.append(threading.current_thread().name)

    with app.app_context():
        event.listen(db.engine, "before_cursor_execute", statement)
        try:
            # Work for a finished job: the step drops it at once (its extraction has ended).
            WorkQueue(db.session).enqueue(job["id"], EXTRACT)
            db.session.commit()
            app.extensions["trainingmgr"].wake_workers()
            assert until(lambda: _queue_empty(app), 30)
            time.sleep(1.0)  # any late claims
        finally:
            event.remove(db.engine, "before_cursor_execute", statement)
    step_claims = [name for name in claims if name.startswith("tm-worker")]
    assert 1 <= len(step_claims) <= 2, claims
    assert not [name for name in claims if name.startswith("tm-notify")], claims


def _queue_empty(app) -> bool:
    with app.app_context():
        count = db.session.scalar(text("SELECT count(*) FROM work_items"))
        db.session.remove()
        return count == 0


def test_a_writer_that_waited_out_its_turn_fails_at_once(app, sqlite_only, monkeypatch):
    """Another thread of this process holds the write lock longer than the busy timeout: the waiting writer gets
    "database is locked" then, not after waiting as long again in SQLite."""
    from sqlalchemy.exc import OperationalError

    import trainingmgr.app as app_module

    monkeypatch.setattr(app_module, "SQLITE_BUSY_TIMEOUT", 0.5)
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with app.app_context():
            db.session.execute(update(FeatureGroup).values(measurement="held"))
            holding.set()
            release.wait(30)
            db.session.rollback()
            db.session.remove()

    holder = threading.Thread(target=hold, name="holder")
    holder.start()
    try:
        assert holding.wait(30)
        with app.app_context():
            started = time.monotonic()
            with pytest.raises(OperationalError, match="locked"):
                db.session.execute(update(FeatureGroup).values(measurement="waiting"))
            waited = time.monotonic() - started
            db.session.rollback()
            db.session.remove()
        assert 0.4 <= waited < 10, waited  # the turn's 0.5 s, not SQLite's 30 s more
    finally:
        release.set()
        holder.join(30)
    assert _turns(app).holder is None
