"""Workers: threads that claim work items and execute them.

By default they run inside each server process (TM_EMBEDDED_WORKER); `trainingmgr worker` runs them as a process of
their own. State lives in the database, so any number of workers may run against one database.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any

from flask import Flask
from sqlalchemy import exists, select

from ..extensions import db
from ..models import TrainingJob, WorkItem
from ..services import lifecycle as lc
from ..services.transitions import JobTransitions
from .queue import NOTIFY, WATCH_RUN, LeaseLost, WorkQueue
from .steps import StepExecutor, job_id_of_run

log = logging.getLogger(__name__)


class Worker:
    def __init__(self, app: Flask, *, threads: int | None = None, name: str | None = None):
        self.app = app
        self.container: Any = app.extensions["trainingmgr"]
        settings = self.container.settings
        self.threads = threads or settings.worker_threads
        self.poll = settings.worker_poll_seconds
        self.lease = settings.lease_seconds
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._held: dict[str, int] = {}  # owner -> work item id held right now
        self._held_lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------------------------ life
    def start(self) -> "Worker":
        # Build the adapters now (imports of pandas, kfp ...) so the first job does not pay for them.
        for adapter in ("engine", "extractor", "object_store", "notifier"):
            getattr(self.container, adapter)
        self.container.engine.listen_for_run_ends(self.run_ended)
        self.recover()
        for i in range(self.threads):
            t = threading.Thread(target=self._loop, args=(f"{self.name}:{i}",), name=f"tm-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        hb = threading.Thread(target=self._heartbeat, name="tm-worker-heartbeat", daemon=True)
        hb.start()
        self._threads.append(hb)
        log.info("worker started", extra={"worker": self.name, "threads": self.threads})
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.container.engine.listen_for_run_ends(None)
        self._stop.set()
        self._wake.set()
        for t in self._threads:
            t.join(timeout)
        self._threads.clear()

    def wake(self) -> None:
        self._wake.set()

    def run_ended(self, run_id: str) -> None:
        """The engine saw a run end: its watch step is due now, not at its next look (called from the engine)."""
        with self.app.app_context():
            try:
                job_id = job_id_of_run(run_id)
                if job_id is not None:
                    WorkQueue(db.session).make_due(job_id, WATCH_RUN)
                    db.session.commit()
            except Exception:  # the regular look still finds it
                db.session.rollback()
                log.exception("could not hurry the watch of an ended run", extra={"run_id": run_id})
            finally:
                db.session.remove()
        self.wake()

    def recover(self) -> int:
        """Fail jobs left unfinished with no work to move them on (only possible after lost data), once at start."""
        with self.app.app_context():
            try:
                pending = exists().where(WorkItem.job_id == TrainingJob.id, WorkItem.kind != NOTIFY)
                stuck = list(db.session.scalars(
                    select(TrainingJob).where(TrainingJob.status.in_((lc.NOT_STARTED, lc.IN_PROGRESS)), ~pending)
                ))
                transitions = JobTransitions(db.session)
                for job in stuck:
                    transitions.fail(job, "the job's pending work was lost (service restart); start a new training")
                db.session.commit()
                return len(stuck)
            finally:
                db.session.remove()

    # ------------------------------------------------------------------------------------ loops
    def _loop(self, owner: str) -> None:
        while not self._stop.is_set():
            worked = False
            with self.app.app_context():
                try:
                    worked = self._one(owner)
                except Exception:  # one bad item must not kill the thread; it comes back when its lease ends
                    log.exception("work item failed", extra={"worker": owner})
                    db.session.rollback()
                finally:
                    db.session.remove()
            if not worked:
                self._wake.wait(self.poll)
                self._wake.clear()

    def _one(self, owner: str) -> bool:
        claim = WorkQueue(db.session).claim(owner, self.lease)
        if claim is None:
            return False
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
        finally:
            with self._held_lock:
                self._held.pop(owner, None)
        return True

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
                except Exception:
                    log.exception("lease heartbeat failed")
                finally:
                    db.session.remove()
