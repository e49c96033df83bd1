"""Workers: threads that claim work items and execute them.

By default they run inside each server process (TM_EMBEDDED_WORKER); `trainingmgr worker` runs them as a process of
their own. State lives in the database, so any number of workers may run against one database.

Two pools: step threads (TM_WORKER_THREADS) claim every kind but notifications; notification threads
(TM_NOTIFY_THREADS) claim only those, so rApp receivers that hang hold notification threads, never a job's steps.

While the database is unreachable every thread backs off on its own (0.5 s doubling to 30 s) and the outage is
logged once per process: a WARNING when it starts, at most one a minute while it lasts, an INFO when it is over.
"""
from __future__ import annotations

import logging
import os
import select as io_select  # sqlalchemy's select is the other one here
import socket
import threading
import time
from typing import Any

from flask import Flask
from sqlalchemy import exists, select

from ..errors import database_unavailable, describe_database_error
from ..extensions import db, read_only_transactions
from ..models import TrainingJob, WorkItem
from ..models import lifecycle as lc
from ..models.lifecycle import JobStateMachine
from ..models.base import utcnow
from ..models.work_queue import NOTIFY, STEP_KINDS, WATCH_RUN, LeaseLost, WorkQueue
from ..models.work_wake import RING_NOTIFY, RING_STEPS, STEP_RUNNER_NAME, WORK_CHANNEL, WakePipe, wake_folder
from .steps import StepExecutor, job_id_of_run

log = logging.getLogger(__name__)

NOTIFY_KINDS = (NOTIFY,)
OUTAGE_FIRST_DELAY = 0.5  # seconds a thread waits after its first failure to reach the database
OUTAGE_MAX_DELAY = 30.0  # ... doubling up to this
OUTAGE_LOG_INTERVAL = 60.0  # at most one "still unreachable" line per this many seconds
ERROR_PAUSE_SECONDS = 0.2  # after an error that is not the database's: a bug must not spin a thread
RUNG = "rung"  # what _idle returns when the thread claims to answer a ring


def next_outage_delay(delay: float) -> float:
    return min(OUTAGE_MAX_DELAY, delay * 2) if delay else OUTAGE_FIRST_DELAY


class DatabaseOutage:
    """What this process's worker threads know of the database: reachable, or away since when. They report each
    failure and each success; the log hears of an outage once per OUTAGE_LOG_INTERVAL, not once per poll."""

    def __init__(self, clock: Any = time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self.since: float | None = None  # clock() when the outage began; None while the database answers
        self._logged_at = 0.0
        self._failures = 0

    def failed(self, error: BaseException, retry_in: float) -> None:
        with self._lock:
            now = self._clock()
            self._failures += 1
            if self.since is None:
                self.since, self._logged_at, self._failures = now, now, 1
                log.warning("database unreachable, retrying in %s s", f"{retry_in:g}",
                            extra={"error": describe_database_error(error)})
            elif now - self._logged_at >= OUTAGE_LOG_INTERVAL:
                self._logged_at = now
                log.warning("database still unreachable after %.0f s, retrying in %s s", now - self.since,
                            f"{retry_in:g}", extra={"error": describe_database_error(error),
                                                    "failed_attempts": self._failures})

    def succeeded(self) -> None:
        if self.since is None:  # the usual case: no lock
            return
        with self._lock:
            if self.since is not None:
                log.info("database reachable again after %.1f s", self._clock() - self.since,
                         extra={"failed_attempts": self._failures})
                self.since = None


class Pool:
    """Threads that claim the same kinds of work, and how they wait for it when there is none.

    One idle thread keeps watch: it peeks (a read) when the next item is due and sleeps until then, or until it is
    told to look (a nudge: a step of this process ended, or work was queued and committed here or, on PostgreSQL,
    anywhere) or to claim (a ring: on SQLite another process queues work and may not have committed it yet, so a
    claim, which waits for its write, answers it where a read would not see it), or at most the idle poll. The other
    idle threads wait to take the watch. One thread claims at a time when woken; one that claims an item nudges,
    so that the next watcher looks for more, and so does one that answered a ring and found nothing (its claim
    waited for the enqueue's commit, which a peek just before may have missed). Threads backing off while the
    database is away wait apart, and any ring or nudge ends their wait. Idle, a pool sends one read per idle poll
    to the database, and no write; a step's end costs one read and one claim, not one claim per idle thread (on
    SQLite they queue for the one write lock)."""

    def __init__(self, kinds: tuple[str, ...]):
        self.kinds = kinds
        self.lock = threading.Lock()
        self.idle = threading.Condition(self.lock)  # idle threads but the watcher wait here (to take the watch)
        self.watch = threading.Condition(self.lock)  # the watcher sleeps here
        self.backoff = threading.Condition(self.lock)  # threads backing off while the database is away
        self.rings = 0
        self.answered = 0  # the rings a claim has answered (one rung while no thread watched is answered later)
        self.nudges = 0
        self.watching = False
        self.claiming = 0  # watchers that left to claim and have not had their answer yet
        self.empty_claims = 0  # of those, the ones that found nothing they were not rung for

    @property
    def signals(self) -> tuple[int, int]:
        return self.rings, self.nudges

    def ring(self) -> None:
        with self.lock:
            self.rings += 1
            self.watch.notify()
            self.backoff.notify_all()  # work queued: the database answered someone, look again at once

    def nudge(self) -> None:
        with self.lock:
            self.nudges += 1
            self.watch.notify()
            self.backoff.notify_all()

    def wake_all(self) -> None:
        """The worker stops: every waiting thread returns."""
        with self.lock:
            self.nudges += 1
            self.idle.notify_all()
            self.watch.notify_all()
            self.backoff.notify_all()


class ClaimInFlight:
    """A watcher that left _idle to claim, until its claim has an answer: the pool's next watcher does not look
    meanwhile (a look before that claim commits would call its item due and send this thread after it too). Ended
    once, by _one after the claim or by _loop when something failed before it."""

    def __init__(self, pool: Pool):
        self.pool = pool
        self.open = True

    def end(self, *, empty: bool = False) -> None:
        if not self.open:
            return
        self.open = False
        with self.pool.lock:
            self.pool.claiming -= 1
            if empty:
                self.pool.empty_claims += 1
            self.pool.watch.notify()


class Worker:
    def __init__(self, app: Flask, *, threads: int | None = None, notify_threads: int | None = None,
                 name: str | None = None):
        self.app = app
        self.container: Any = app.extensions["trainingmgr"]
        settings = self.container.settings
        self.threads = threads or settings.worker_threads
        self.notify_threads = notify_threads or settings.notify_threads
        self.poll = settings.worker_poll_seconds
        # Work queued by any process rings the pools (work_wake: NOTIFY, or a pipe beside an SQLite file): a look
        # is only a safety net. An in-memory SQLite database has no such channel: idle threads peek every poll.
        with app.app_context():
            self.wake_folder = None if not settings.is_sqlite else wake_folder(db.engine)
        self.idle_poll = self.poll if settings.is_sqlite and self.wake_folder is None else \
            settings.worker_idle_poll_seconds
        self.pools = (Pool(STEP_KINDS), Pool(NOTIFY_KINDS))
        self.lease = settings.lease_seconds
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self._stop = threading.Event()
        self._held: dict[str, int] = {}  # owner -> work item id held right now
        self._held_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.outage = DatabaseOutage()

    # ------------------------------------------------------------------------------------ life
    def start(self) -> "Worker":
        # Build the adapters now, so a broken configuration shows at start (pandas and kfp load with the first job
        # that needs them: an idle step runner stays light).
        for adapter in ("engine", "extractor", "object_store"):  # the notifier (requests) with the first notification
            getattr(self.container, adapter)
        self.container.engine.listen_for_run_ends(self.run_ended)
        self.container.engine.start_warm_runner()
        self.recover()
        steps, notify = self.pools
        loops = [(f"{self.name}:{i}", f"tm-worker-{i}", steps) for i in range(self.threads)]
        loops += [(f"{self.name}:n{i}", f"tm-notify-{i}", notify) for i in range(self.notify_threads)]
        for owner, thread_name, pool in loops:
            t = threading.Thread(target=self._loop, args=(owner, pool), name=thread_name, daemon=True)
            t.start()
            self._threads.append(t)
        helpers = [(self._heartbeat, "tm-worker-heartbeat")]
        if not self.container.settings.is_sqlite:
            helpers.append((self._listen, "tm-worker-listen"))
        elif self.wake_folder is not None:
            helpers.append((self._listen_pipe, "tm-worker-listen"))
        for target, thread_name in helpers:
            t = threading.Thread(target=target, name=thread_name, daemon=True)
            t.start()
            self._threads.append(t)
        log.info("worker started", extra={"worker": self.name, "threads": self.threads,
                                          "notify_threads": self.notify_threads})
        return self

    def stop(self, timeout: float = 8.0) -> None:
        """Within `timeout` seconds in all (serve's master kills its step runner after 10): the warm launcher
        ends first, and with it the extractions it forked, so no step thread waits for one."""
        deadline = time.monotonic() + timeout
        self.container.engine.listen_for_run_ends(None)
        self.container.engine.stop_warm_runner()
        self._stop.set()
        for pool in self.pools:
            pool.wake_all()
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self._threads.clear()

    def wake(self) -> None:
        """Work was queued or hurried and committed: the pools look now (a read), and claim what is due."""
        for pool in self.pools:
            pool.nudge()

    def _rung(self, what: bytes) -> None:
        """A process queued work it may not have committed yet (SQLite's pipes): the pool it is for claims now
        (`what`: the bytes rung, see work_wake)."""
        steps, notify = self.pools
        if set(what) - {RING_NOTIFY[0]}:  # a step's work, or a byte that does not say
            steps.ring()
        if set(what) - {RING_STEPS[0]}:
            notify.ring()

    def run_ended(self, run_id: str) -> None:
        """The engine saw a run end: its watch step is due now, not at its next look (called from the engine)."""
        with self.app.app_context():
            try:
                job_id = job_id_of_run(run_id)
                if job_id is not None:
                    WorkQueue(db.session).make_due(job_id, WATCH_RUN)
                    db.session.commit()
            except Exception as e:  # the regular look still finds it
                _rollback_quietly()
                if database_unavailable(e):
                    log.warning("could not hurry the watch of an ended run: database unavailable",
                                extra={"run_id": run_id, "error": describe_database_error(e)})
                else:
                    log.exception("could not hurry the watch of an ended run", extra={"run_id": run_id})
            finally:
                db.session.remove()
        self.wake()

    def recover(self) -> int:
        """Fail jobs left unfinished with no work to move them on (only possible after lost data), once at start.
        A database that is away at start skips it (a warning): the threads then wait for the database."""
        with self.app.app_context():
            try:
                pending = exists().where(WorkItem.job_id == TrainingJob.id, WorkItem.kind != NOTIFY)
                stuck = list(db.session.scalars(
                    select(TrainingJob).where(TrainingJob.status.in_((lc.NOT_STARTED, lc.IN_PROGRESS)), ~pending)
                ))
                state_machine = JobStateMachine(db.session)
                for job in stuck:
                    state_machine.fail(job, "the job's pending work was lost (service restart); start a new training")
                db.session.commit()
                return len(stuck)
            except Exception as e:
                if not database_unavailable(e):
                    raise
                _rollback_quietly()
                log.warning("database unreachable at start: the check for jobs whose work was lost is skipped",
                            extra={"error": describe_database_error(e)})
                return 0
            finally:
                db.session.remove()

    # ------------------------------------------------------------------------------------ loops
    def _loop(self, owner: str, pool: Pool) -> None:
        outage_delay = 0.0  # this thread's backoff while the database is away (0: it answers)
        claim_now: bool | str = True  # at start, when rung and when an item is due: claim; else wait in _idle
        in_flight: ClaimInFlight | None = None  # when claim_now came from _idle
        cut_forgiven = False  # one cut connection is tried again at once, unlogged (pools do not pre-ping)
        while not self._stop.is_set():
            failed = False  # an error that is not the database's (a bug): a short pause before the next look
            with self.app.app_context():
                try:
                    # After a step the thread goes idle too: the watcher looks (the step nudged it) and claims.
                    worked = bool(claim_now) and self._one(owner, pool, answering_ring=claim_now == RUNG,
                                                           in_flight=in_flight)
                    in_flight = None
                    claim_now = self._idle(pool, claimed_nothing=bool(claim_now) and not worked)
                    in_flight = ClaimInFlight(pool) if claim_now else None
                    outage_delay, cut_forgiven = 0.0, False
                    self.outage.succeeded()
                except Exception as e:  # one bad item must not kill the thread; it comes back when its lease ends
                    _rollback_quietly()
                    if in_flight is not None:
                        in_flight.end()
                        in_flight = None
                    claim_now = True
                    if not cut_forgiven and not outage_delay and getattr(e, "connection_invalidated", False):
                        cut_forgiven = True  # the pool dropped its old connections: the next try gets a new one
                    elif database_unavailable(e):
                        outage_delay = next_outage_delay(outage_delay)
                        self.outage.failed(e, outage_delay)
                    else:
                        outage_delay, failed = 0.0, True
                        log.exception("work item failed", extra={"worker": owner})
                finally:
                    _remove_quietly()
            if failed:
                # The failed item waits for its lease to end; an error that comes back at once (before any claim)
                # would otherwise spin this thread, and the log, at full speed.
                self._stop.wait(ERROR_PAUSE_SECONDS)
            if outage_delay:
                # New work queued by this process (a ring) means the database answered it: look again at once.
                with pool.lock:
                    seen = pool.signals
                    pool.backoff.wait_for(lambda: pool.signals != seen or self._stop.is_set(), outage_delay)

    def _idle(self, pool: Pool, *, claimed_nothing: bool) -> bool | str:
        """Wait while the pool has no work; true when this thread should claim (RUNG: to answer a ring). One
        thread keeps watch (peeks when the next item is due or it is nudged, sleeps until then, claims when rung);
        the others wait to take the watch."""
        with pool.lock:
            waited = pool.watching
            pool.idle.wait_for(lambda: not pool.watching or self._stop.is_set())
            if self._stop.is_set():
                return False
            pool.watching = True
        claim: bool | str = False
        try:
            # Right after an empty claim, an item the peek calls due is one that cannot be taken yet (held in a
            # transaction elsewhere, or a notification behind an earlier one): wait a poll before claiming again.
            # Not after waiting to take the watch: that claim is long past (a claim the watcher before went for
            # and found empty is seen below).
            blocked = claimed_nothing and not waited
            while not self._stop.is_set():
                with pool.lock:
                    # A watcher that left to claim has its answer first: a peek before it commits would call its
                    # item due and send this thread after it too (one claim per idle thread, in a row). Not for
                    # longer than a poll: a claim stuck on a dead connection must not slow every look.
                    empties = pool.empty_claims
                    pool.watch.wait_for(lambda: not pool.claiming or pool.rings != pool.answered
                                        or self._stop.is_set(), self.poll)
                    if pool.empty_claims != empties:
                        blocked = True  # the item it went for could not be taken: as after an empty claim here
                    if pool.rings != pool.answered:  # rung (perhaps before this thread watched): claim, not peek
                        pool.answered = pool.rings
                        claim = RUNG
                        return claim
                    seen = pool.signals  # taken before the peek: a nudge during it is not lost
                due_in = self._due_in(pool)
                if due_in is not None and due_in <= 0 and not blocked:
                    claim = True
                    return claim
                wait = self.idle_poll if due_in is None else min(self.idle_poll, max(due_in, self.poll))
                with pool.lock:
                    woken = pool.watch.wait_for(lambda: pool.signals != seen or self._stop.is_set(), wait)
                if not woken and due_in is not None and due_in <= wait:
                    claim = True  # its time came
                    return claim
                blocked = False  # nudged, rung or the idle poll passed: look again
            return False
        finally:
            with pool.lock:
                pool.watching = False
                if claim:
                    pool.claiming += 1  # until its ClaimInFlight ends
                pool.idle.notify()  # another idle thread takes the watch

    def _due_in(self, pool: Pool) -> float | None:
        """Seconds until the pool's next item may be claimed (0 or less: now); None when there is none."""
        with read_only_transactions():  # a peek takes no write lock, nor waits for one
            moment = WorkQueue(db.session).next_due(pool.kinds)
            db.session.rollback()  # end the read's transaction: nothing held while waiting
        return None if moment is None else (moment - utcnow()).total_seconds()

    def _one(self, owner: str, pool: Pool, *, answering_ring: bool = False,
             in_flight: ClaimInFlight | None = None) -> bool:
        claim = None
        try:
            claim = WorkQueue(db.session).claim(owner, self.lease, pool.kinds)
        finally:
            if in_flight is not None:
                in_flight.end(empty=claim is None and not answering_ring)
        if claim is None:
            if answering_ring:
                # The claim waited for the enqueue that rang to commit; the watcher may have peeked before it
                # did (and found nothing, or not its due time): it looks again now.
                pool.nudge()
            return False
        pool.nudge()  # there may be more: the next watcher looks
        with self._held_lock:
            self._held[owner] = claim.id
        started = time.perf_counter()
        try:
            StepExecutor(self.container, db.session).execute(claim)
            log.debug("step executed", extra={"worker": owner, "work_item": claim.id, "kind": claim.kind,
                                              "trainingjob_id": claim.job_id,
                                              "duration_ms": round((time.perf_counter() - started) * 1000, 1)})
        except LeaseLost:
            db.session.rollback()
            log.warning("lease lost; outcome dropped", extra={"worker": owner, "work_item": claim.id})
        except lc.InvalidTransition as e:  # the job moved on meanwhile (cancelled, deleted): nothing to do
            db.session.rollback()
            log.info("step outcome dropped: %s", e, extra={"worker": owner, "work_item": claim.id,
                                                            "trainingjob_id": claim.job_id})
        finally:
            with self._held_lock:
                self._held.pop(owner, None)
            # Whatever the step read after its last commit ends here, not after this thread's idle wait: on SQLite
            # a transaction a worker begins holds the write lock.
            _remove_quietly()
            # The step queued the job's next work (a notification too), perhaps due later: the watchers look again.
            self.wake()
        return True

    def _listen(self) -> None:
        """PostgreSQL: ring the pools when any process queues or hurries work (NOTIFY in its transaction). While
        the database is away the listener reconnects with backoff; the pools' looks cover what it missed."""
        delay = 0.0
        while not self._stop.is_set():
            dbapi = None
            try:
                dbapi = self._listen_connection()
                dbapi.autocommit = True
                with dbapi.cursor() as cursor:
                    cursor.execute(f"LISTEN {WORK_CHANNEL}")
                delay = 0.0
                self.wake()  # work queued while nobody listened
                while not self._stop.is_set():
                    if io_select.select([dbapi], [], [], 1.0)[0]:
                        dbapi.poll()
                        if dbapi.notifies:
                            dbapi.notifies.clear()
                            self.wake()
            except Exception as e:  # noqa: BLE001 - the database went away: listen again once it is back
                delay = next_outage_delay(delay)
                if database_unavailable(e):
                    # Idle workers do not ask the database: the listener's connection is the first to know.
                    self.outage.failed(e, delay)
                else:
                    log.warning("work listener failed, listening again in %s s: %s", f"{delay:g}",
                                describe_database_error(e))
                self._stop.wait(delay)
            finally:
                if dbapi is not None:
                    try:
                        dbapi.close()
                    except Exception:  # noqa: BLE001 - closing a broken connection says nothing new
                        pass

    def _listen_pipe(self) -> None:
        """SQLite: ring the pools when any process queues work (a byte in this process's pipe, see work_wake). The
        pipe also tells others that this step runner is alive."""
        assert self.wake_folder is not None
        pipe, delay = None, 0.0
        while not self._stop.is_set():
            if pipe is None or not pipe.alive():  # first, or its pipe was removed (the folder deleted ...)
                if pipe is not None:
                    pipe.close()
                    pipe = None
                try:
                    pipe = WakePipe(self.wake_folder)
                    delay = 0.0
                    self.wake()  # work queued while nobody listened
                except OSError as e:  # tried again; meanwhile the pools look every TM_WORKER_IDLE_POLL_SECONDS
                    delay = next_outage_delay(delay)
                    log.warning("cannot listen for work in %s: %s; trying again in %s s", self.wake_folder, e,
                                f"{delay:g}")
                    self._stop.wait(delay)
                    continue
            if io_select.select([pipe], [], [], 1.0)[0]:
                self._rung(pipe.drain())  # the enqueue that rang may not have committed yet
        if pipe is not None:
            pipe.close()

    def _listen_connection(self) -> Any:
        """A connection of its own (LISTEN lasts as long as it does), outside the pool, with TCP keepalives: a
        connection that dies without a word (a host or a network gone) is noticed within about a minute."""
        with self.app.app_context():
            engine = db.engine
        cargs, cparams = engine.dialect.create_connect_args(engine.url)
        cparams.setdefault("connect_timeout", 10)
        # Named, so that a step runner alive is a session of this name in pg_stat_activity (work_wake).
        return engine.dialect.loaded_dbapi.connect(*cargs, **{**cparams, "application_name": STEP_RUNNER_NAME},
                                                   keepalives=1, keepalives_idle=30, keepalives_interval=10,
                                                   keepalives_count=3)

    def _heartbeat(self) -> None:
        # Keep the leases of long steps (a big extraction) alive while this process is.
        while not self._stop.wait(self.lease / 3):
            with self._held_lock:
                held = dict(self._held)
            if not held:
                continue
            with self.app.app_context():
                try:
                    queue = WorkQueue(db.session)
                    for owner, item_id in held.items():
                        queue.extend([item_id], owner, self.lease)
                    self.outage.succeeded()
                except Exception as e:
                    _rollback_quietly()
                    if database_unavailable(e):
                        self.outage.failed(e, self.lease / 3)
                    else:
                        log.exception("lease heartbeat failed")
                finally:
                    _remove_quietly()


def _rollback_quietly() -> None:
    """Roll the session back; on a connection that is gone that may fail too, and that says nothing new."""
    try:
        db.session.rollback()
    except Exception:  # noqa: BLE001 - the error that brought us here is the one handled
        pass


def _remove_quietly() -> None:
    try:
        db.session.remove()
    except Exception:  # noqa: BLE001 - as above
        pass
