"""Idle workers leave the database alone: on PostgreSQL they wait on LISTEN/NOTIFY (any process's enqueue wakes
them) and look only every TM_WORKER_IDLE_POLL_SECONDS; on SQLite they peek with a read, never taking the write
lock while there is nothing to do. Work that comes due later is taken when it does, without a wake-up."""
from __future__ import annotations

import threading
import time

from sqlalchemy import create_engine, event
from sqlalchemy.orm import Session

from tests.peers import RAppReceiver
from tests.test_training_lifecycle import JOBS, job_request, setup, wait_for  # noqa: F401
from trainingmgr.extensions import db
from trainingmgr.models.work_queue import NOTIFY, WorkQueue

WRITES = ("INSERT", "UPDATE", "DELETE")


class StatementCounter:
    """Every statement the app's engine sends, from the moment it is attached."""

    def __init__(self, engine):
        self.engine = engine
        self.statements: list[str] = []
        self.lock = threading.Lock()
        event.listen(engine, "before_cursor_execute", self.seen)

    def seen(self, conn, cursor, statement, parameters, context, executemany) -> None:
        with self.lock:
            self.statements.append(statement.lstrip().split(None, 1)[0].upper())

    def detach(self) -> list[str]:
        event.remove(self.engine, "before_cursor_execute", self.seen)
        with self.lock:
            return list(self.statements)


def test_idle_workers_send_no_writes_and_on_postgresql_nothing(app, worker, backend):
    time.sleep(1.0)  # the threads' first claims and peeks
    with app.app_context():
        counter = StatementCounter(db.engine)
    time.sleep(3.0)
    statements = counter.detach()
    assert not [s for s in statements if s in WRITES], "no write (on SQLite: no write lock) while idle"
    if backend == "postgresql":
        assert statements == [], "idle on PostgreSQL: the workers wait for NOTIFY (their look is 30 s away)"
    else:
        # Two pools, each with one thread keeping watch and peeking every TM_WORKER_POLL_SECONDS (0.05 s here).
        peeks = statements.count("SELECT")
        assert 0 < peeks <= 2 * 3.0 / 0.05 + 10, peeks
        assert set(statements) == {"BEGIN", "SELECT"}, statements  # BEGIN: SQLAlchemy's (deferred: no lock)


def test_work_queued_by_another_process_wakes_idle_postgresql_workers(setup, worker, pg_only, settings):
    """The item is written through a connection of its own, as another process would (no in-process wake-up);
    the idle workers look only every 30 s, so only the NOTIFY of its transaction can explain a quick delivery."""
    client = setup
    job = wait_for(client, client.post(JOBS, json=job_request()).get_json()["id"])
    assert job["status"] == "FINISHED"
    receiver = RAppReceiver().start()
    other_process = create_engine(settings.sqlalchemy_url)
    try:
        time.sleep(1.0)  # the workers are idle again
        with Session(other_process) as session:
            WorkQueue(session).enqueue(job["id"], NOTIFY, {"url": receiver.url, "body": '{"a": 1}',
                                                           "delivery_id": "from-elsewhere"})
            session.commit()
        queued = time.monotonic()
        deadline = queued + 10
        while not receiver.recorded("POST"):
            assert time.monotonic() < deadline, "the idle workers did not hear of the new work"
            time.sleep(0.02)
        print(f"\ndelivered {time.monotonic() - queued:.3f} s after another process queued it")
        assert time.monotonic() - queued < 5
    finally:
        other_process.dispose()
        receiver.stop()


def test_work_due_later_is_taken_when_it_comes_due_without_a_wake_up(setup, worker, backend, app):
    client = setup
    job = wait_for(client, client.post(JOBS, json=job_request()).get_json()["id"])
    receiver = RAppReceiver().start()
    try:
        time.sleep(1.0)
        with app.app_context():
            WorkQueue(db.session).enqueue(job["id"], NOTIFY, {"url": receiver.url, "body": '{"b": 2}',
                                                              "delivery_id": "later"}, delay=2.0)
            db.session.commit()
            db.session.remove()
        queued = time.monotonic()
        deadline = queued + 15
        while not receiver.recorded("POST"):
            assert time.monotonic() < deadline, "the item due in 2 s was not taken"
            time.sleep(0.02)
        took = time.monotonic() - queued
        print(f"\nan item due in 2.0 s was delivered after {took:.3f} s ({backend})")
        assert 1.9 <= took < 6, took
    finally:
        receiver.stop()
