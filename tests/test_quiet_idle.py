"""Idle workers leave the database alone: any process's enqueue wakes them (LISTEN/NOTIFY on PostgreSQL, a named
pipe beside an SQLite file) and they look only every TM_WORKER_IDLE_POLL_SECONDS; a look is a read, never the
write lock. Work that comes due later is taken when it does, without a wake-up."""
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
    from tests.factories import step_runner_listening
    from tests.processes import until

    # The worker hears of work now (and has made its first claims, on being rung by its listener).
    assert until(lambda: step_runner_listening(app), 60)
    time.sleep(1.0)  # the threads' first claims and peeks
    with app.app_context():
        counter = StatementCounter(db.engine)
    time.sleep(3.0)
    statements = counter.detach()
    assert statements == [], f"idle on {backend}: the workers wait to be woken (their look is 30 s away)"


def test_idle_workers_look_slowly_only_where_a_wake_up_reaches_them(build_app, backend, settings):
    """A file or a PostgreSQL database carries wake-ups between processes: the look is a slow safety net. An
    in-memory SQLite database carries none: its idle workers look every TM_WORKER_POLL_SECONDS."""
    from trainingmgr import create_app
    from trainingmgr.workers.runner import Worker

    assert Worker(build_app()).idle_poll == 30.0
    if backend == "sqlite":
        in_memory = Worker(create_app(settings.replace(database_url="sqlite://")))  # Worker() starts nothing
        assert in_memory.wake_folder is None and in_memory.idle_poll == 0.05


def test_work_queued_by_another_process_wakes_idle_workers(setup, worker, settings, backend):
    """The item is written through a connection of its own, as another process would (no in-process wake-up);
    the idle workers look only every 30 s, so only the wake-up of its enqueue (NOTIFY in its transaction, or a
    byte in the workers' pipe beside the SQLite file) can explain a quick delivery."""
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
            time.sleep(0.5)  # a slow commit: a worker woken on SQLite must wait for it, not look too early
            session.commit()
        queued = time.monotonic()
        deadline = queued + 10
        while not receiver.recorded("POST"):
            assert time.monotonic() < deadline, "the idle workers did not hear of the new work"
            time.sleep(0.02)
        print(f"\ndelivered {time.monotonic() - queued:.3f} s after another process queued it ({backend})")
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
