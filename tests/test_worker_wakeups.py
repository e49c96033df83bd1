"""The idle worker threads hear of work however it comes, and always have a watcher.

A pool's idle threads: one watches (peeks, claims when rung or when an item is due), the others wait to take the
watch; threads backing off while the database is away wait apart. These tests check the cases a review found the
first version of this scheme to miss (each waited out the 30 s idle poll, or a 20 s outage backoff).
"""
from __future__ import annotations

import threading
import time

from sqlalchemy import create_engine, exc, select
from sqlalchemy.orm import Session

from tests.factories import step_runner_listening
from tests.processes import until
from trainingmgr.models import WorkItem
from trainingmgr.models.work_queue import WATCH_RUN, WorkQueue
from trainingmgr.workers import runner


def test_a_thread_backing_off_from_an_outage_hears_of_new_work(build_app, monkeypatch, backend):
    """Work queued and committed (the database answers again) ends a thread's outage backoff at once."""
    app = build_app(worker_threads=1, notify_threads=1)
    claims: list[float] = []
    database_back = threading.Event()
    real_claim = WorkQueue.claim

    def claim(self, *args, **kwargs):
        if threading.current_thread().name == "tm-worker-0":
            claims.append(time.monotonic())
            if not database_back.is_set():
                raise exc.TimeoutError("QueuePool limit reached (as in an outage)")
        return real_claim(self, *args, **kwargs)

    monkeypatch.setattr(WorkQueue, "claim", claim)
    monkeypatch.setattr(runner, "next_outage_delay", lambda delay: 20.0)
    worker = app.extensions["trainingmgr"].start_worker(app)
    assert until(lambda: claims, 30, 0.05)
    time.sleep(1.0)  # the start's own wake-ups are over: the thread backs off for 20 s now
    failures = len(claims)
    database_back.set()
    woken_at = time.monotonic()
    worker.wake()
    assert until(lambda: len(claims) > failures, 10, 0.05), "the thread backing off waited out its 20 s"
    assert claims[failures] - woken_at < 10


def test_the_watch_passes_on_past_a_thread_backing_off(app):
    worker = runner.Worker(app, threads=3, notify_threads=1)  # not started: the test plays the threads
    worker.poll = 2.0  # how long a watcher waits at most for the claim of the watcher before it
    pool = worker.pools[0]
    peeks: list[str] = []

    def due_in(_pool):
        peeks.append(threading.current_thread().name)
        return 1.0 if threading.current_thread().name == "first-watcher" else None

    worker._due_in = due_in
    returned: dict[str, object] = {}

    def back_off():  # as _loop waits after a failed claim
        with pool.lock:
            seen = pool.signals
            pool.backoff.wait_for(lambda: pool.signals != seen or worker._stop.is_set(), 15)

    threads = [threading.Thread(target=back_off, name="backing-off")]
    threads[0].start()
    time.sleep(0.2)
    threads.append(_play_watcher(worker, pool, "first-watcher", returned))
    time.sleep(0.2)
    threads.append(_play_watcher(worker, pool, "next", returned))
    try:
        # The first watcher's item comes due after 1 s: it leaves to claim it, and the watch passes on. Its claim
        # (played here) ends: until then the new watcher does not look (a look would send it after the same item).
        assert until(lambda: returned.get("first-watcher") is True, 10, 0.05)
        assert pool.claiming == 1
        time.sleep(0.3)
        assert "next" not in peeks
        runner.ClaimInFlight(pool).end()  # the first watcher's claim (counted when it left) has its answer
        assert pool.claiming == 0
        assert until(lambda: pool.watching and "next" in peeks, 10, 0.05), "nobody took the watch"
        before = peeks.count("next")
        pool.nudge()
        assert until(lambda: peeks.count("next") > before, 10, 0.05), "the new watcher did not look when nudged"
    finally:
        _stop_playing(worker, pool, threads)


def test_work_due_soon_from_another_process_is_taken_when_due(build_app, settings, sqlite_only):
    """Another process queues an item due in 1 s (a watch): its ring's claim finds nothing due yet, and a peek
    made before its commit saw nothing; the claim that answered the ring has the watcher look again."""
    app = build_app(worker_threads=3)
    worker = app.extensions["trainingmgr"].start_worker(app)
    assert until(lambda: step_runner_listening(app), 60)
    time.sleep(1.0)  # idle: one watcher, two threads waiting to take the watch
    # A process of its own in all but name: its own engine, no turns, no wake-up within this process (and no
    # foreign keys: a job nobody runs is enough here, the step drops work whose job does not exist).
    other = create_engine(settings.sqlalchemy_url)
    try:
        for gap in (0.2, 0.0):  # the rest of the enqueue's transaction after its ring
            with Session(other) as session:
                item = WorkQueue(session).enqueue(999_999, WATCH_RUN, delay=1.0)
                time.sleep(gap)
                session.commit()
                item_id = item.id

            def claimed() -> bool:
                with Session(other) as session:
                    return session.scalar(select(WorkItem.lease_owner).where(WorkItem.id == item_id)) is not None

            assert until(claimed, 10, 0.1), f"gap {gap}: not claimed within 10 s (the idle poll is 30 s)"
    finally:
        other.dispose()
        worker.stop()


def _play_watcher(worker, pool, name: str, returned: dict) -> threading.Thread:
    def idle() -> None:
        returned[name] = worker._idle(pool, claimed_nothing=False)
        returned[name + " at"] = time.monotonic()

    thread = threading.Thread(target=idle, name=name)
    thread.start()
    return thread


def _stop_playing(worker, pool, threads: list[threading.Thread]) -> None:
    worker._stop.set()
    pool.wake_all()
    for thread in threads:
        thread.join(10)


def test_a_stuck_claim_holds_the_next_look_back_a_poll_at_most(app):
    """A claim on a connection that died without a word may hang for minutes: the watcher after it waits for
    its answer no longer than a poll, not an idle poll, before it looks."""
    worker = runner.Worker(app, threads=3, notify_threads=1)
    worker.poll, worker.idle_poll = 0.5, 30.0
    pool = worker.pools[0]
    peeks: list[float] = []
    worker._due_in = lambda _pool: peeks.append(time.monotonic()) or None
    with pool.lock:
        pool.claiming = 1  # a watcher left to claim, and its claim hangs
    returned: dict = {}
    started = time.monotonic()
    thread = _play_watcher(worker, pool, "watcher", returned)
    try:
        assert until(lambda: peeks, 10, 0.05), "the watcher waited for the stuck claim"
        assert peeks[0] - started < 5
    finally:
        _stop_playing(worker, pool, [thread])


def test_an_item_a_claim_could_not_take_is_tried_again_a_poll_later(app):
    """The peek calls an item due that no claim can take (another transaction holds its row): the watcher after
    an empty claim waits a poll before it claims, instead of each idle thread claiming in turn at once."""
    worker = runner.Worker(app, threads=3, notify_threads=1)
    worker.poll, worker.idle_poll = 1.0, 30.0
    pool = worker.pools[0]
    worker._due_in = lambda _pool: -1.0  # always due
    returned: dict = {}
    first = _play_watcher(worker, pool, "first", returned)
    threads = [first]
    try:
        assert until(lambda: returned.get("first") is True, 10, 0.02)  # due: it leaves to claim
        in_flight = runner.ClaimInFlight(pool)  # as _loop makes it
        threads.append(_play_watcher(worker, pool, "next", returned))
        time.sleep(0.2)  # the next watcher waits for that claim
        assert "next" not in returned
        ended_at = time.monotonic()
        in_flight.end(empty=True)  # it found nothing it could take
        assert until(lambda: "next" in returned, 10, 0.02)
        assert returned["next"] is True and returned["next at"] - ended_at >= 0.9, \
            "claimed again at once after an empty claim"
    finally:
        _stop_playing(worker, pool, threads)


def test_an_error_that_comes_back_at_once_does_not_spin_the_thread(build_app, monkeypatch, backend):
    """A bug that fails every claim (not the database: that backs off) pauses the thread briefly between tries,
    and the thread keeps trying."""
    app = build_app(worker_threads=1, notify_threads=1)
    claims: list[float] = []

    def claim(self, *args, **kwargs):
        if threading.current_thread().name == "tm-worker-0":
            claims.append(time.monotonic())
        raise ValueError("a bug in the claim")

    monkeypatch.setattr(WorkQueue, "claim", claim)
    worker = app.extensions["trainingmgr"].start_worker(app)
    try:
        assert until(lambda: len(claims) >= 3, 30, 0.05), "the thread stopped trying"
        tries = len(claims)
        time.sleep(1.0)
        # Without the pause, a failing claim on SQLite is tried some thousand times a second.
        assert len(claims) - tries <= 1.0 / runner.ERROR_PAUSE_SECONDS + 2
        gaps = [later - earlier for earlier, later in zip(claims, claims[1:])]
        assert min(gaps) >= runner.ERROR_PAUSE_SECONDS * 0.9
    finally:
        worker.stop()
