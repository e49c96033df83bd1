"""Slow peers cannot starve jobs (issue 9 item 6): rApp notifications are delivered by threads of their own
(TM_NOTIFY_THREADS), so receivers that never answer hold those, never the threads that execute job steps; a job's
notifications still go out in order, and a notification pending when its worker dies is delivered after a restart.

The receivers are a stand-in for rApps that hang: a local TCP server that accepts each connection, reads the
request and never answers (until told to answer, or stopped).
"""
from __future__ import annotations

import dataclasses
import os
import signal
import socket
import sys
import threading
import time
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select

from tests.processes import started
from tests.test_training_lifecycle import (FEATURES, JOBS, RETRAINING_YAML, TRAINING_YAML, job_request,
                                          wait_for)
from tests.factories import create_file_feature_group, upload_pipeline
from trainingmgr.config import Settings
from trainingmgr.extensions import db
from trainingmgr.models import WorkItem
from trainingmgr.models.base import utcnow
from trainingmgr.models.work_queue import EXTRACT, NOTIFY, WorkQueue

# Receivers on this machine must be allowed by the outbound address policy.
LOCAL_RECEIVERS = ({"outbound_allow": "127.0.0.1/32,localhost"}
                   if "outbound_allow" in {f.name for f in dataclasses.fields(Settings)} else {})


class HangingReceiver:
    """Accepts connections, reads each request's head and body, and does not answer while `hang` is set (answers
    200 once it is cleared, to connections that arrive from then on). Records each request (path, headers) and
    knows which connections the client still holds open. stop() closes everything."""

    def __init__(self) -> None:
        self.hang = True
        self.requests: list[dict[str, Any]] = []
        self.open: dict[int, str] = {}  # connection number -> path, while the client keeps it open
        self.most_open_per_path: dict[str, int] = {}
        self.lock = threading.Lock()
        self._stopping = threading.Event()
        self._sockets: list[socket.socket] = []
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.1)
        self._thread = threading.Thread(target=self._accept, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.getsockname()[1]}"

    def start(self) -> "HangingReceiver":
        self._thread.start()
        return self

    def _accept(self) -> None:
        number = 0
        while not self._stopping.is_set():
            try:
                conn, _ = self._server.accept()
            except (socket.timeout, OSError):
                continue
            number += 1
            with self.lock:
                self._sockets.append(conn)
            threading.Thread(target=self._serve, args=(conn, number), daemon=True).start()

    def _serve(self, conn: socket.socket, number: int) -> None:
        conn.settimeout(0.1)
        data = b""
        try:
            while b"\r\n\r\n" not in data and not self._stopping.is_set():
                try:
                    chunk = conn.recv(65536)
                except socket.timeout:
                    continue
                if not chunk:
                    return
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            path = lines[0].split(" ")[1] if len(lines[0].split(" ")) > 1 else ""
            headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
            with self.lock:
                self.requests.append({"path": path, "headers": headers, "hung": self.hang})
                self.open[number] = path
                count = sum(1 for p in self.open.values() if p == path)
                self.most_open_per_path[path] = max(self.most_open_per_path.get(path, 0), count)
                hang = self.hang
            if not hang:
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                return
            while not self._stopping.is_set():  # hold it until the client gives up
                try:
                    if not conn.recv(65536):
                        return
                except socket.timeout:
                    continue
        except OSError:
            return
        finally:
            with self.lock:
                self.open.pop(number, None)
            conn.close()

    def open_paths(self) -> list[str]:
        with self.lock:
            return sorted(self.open.values())

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(5)
        self._server.close()
        with self.lock:
            for conn in self._sockets:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


@pytest.fixture
def receiver():
    r = HangingReceiver().start()
    yield r
    r.stop()


def _prepare(client) -> None:
    create_file_feature_group(client, "cell_kpis", measurement="cell_kpis.csv", feature_list=FEATURES)
    upload_pipeline(client, "qoe_training", TRAINING_YAML)
    upload_pipeline(client, "qoe_retraining", RETRAINING_YAML)


def _job_waiting_for_notifications(app, client, model: str, url: str, count: int, due_ago: float = 10.0) -> int:
    """A job whose only due work is `count` notifications to `url` (its extraction is put off for an hour, so no
    pipeline runs for it): the state of a job that notified steps while its receiver hangs."""
    response = client.post(JOBS, json=job_request(model, notification_url=url))
    assert response.status_code == 201, response.get_json()
    job_id = response.get_json()["id"]
    with app.app_context():
        extract = db.session.scalars(select(WorkItem).where(WorkItem.job_id == job_id, WorkItem.kind == EXTRACT)).one()
        extract.due_at = utcnow() + timedelta(hours=1)
        queue = WorkQueue(db.session)
        for n in range(count):
            item = queue.enqueue(job_id, NOTIFY, {"url": url, "body": f'{{"n": {n}}}', "delivery_id": f"{model}-{n}"})
            # Due before anything else: a pool that took every kind in due order would take these first.
            item.due_at = utcnow() - timedelta(seconds=due_ago)
        db.session.commit()
    return job_id


def test_hanging_receivers_do_not_hold_the_threads_of_other_jobs_steps(build_app, receiver):
    notify_timeout = 20.0  # each attempt holds its notification thread this long: longer than the check below
    app = build_app(worker_threads=2, notify_threads=2, notify_timeout=notify_timeout, notify_attempts=5,
                    **LOCAL_RECEIVERS)
    client = app.test_client()
    _prepare(client)
    # Four jobs, each with three notifications pending to receivers that never answer.
    for i in range(4):
        _job_waiting_for_notifications(app, client, f"hung_{i}", f"{receiver.url}/rapp{i}", 3)
    unrelated = client.post(JOBS, json=job_request("unrelated")).get_json()["id"]  # no notification_url

    started_at = time.monotonic()
    app.extensions["trainingmgr"].start_worker(app)
    deadline = time.monotonic() + 15
    while len(receiver.open_paths()) < 2:  # both notification threads hang in a POST
        assert time.monotonic() < deadline, receiver.requests
        time.sleep(0.02)
    # Meanwhile the unrelated job's steps are claimed and done by the step threads: its extraction finishes and
    # its pipeline run starts while both notification threads are still held (each for notify_timeout).
    deadline = started_at + notify_timeout - 2
    while client.get(f"{JOBS}/{unrelated}/status").get_json()["TRAINING"] == "NOT_STARTED":
        assert time.monotonic() < deadline, "the unrelated job's steps waited for the hanging receivers"
        time.sleep(0.05)
    steps_claimed_after = time.monotonic() - started_at
    busy = receiver.open_paths()
    assert len(busy) == 2, busy  # all notification threads were busy while the steps ran
    # In order per job: the two threads hang on two different jobs' first notifications, never on a job's second.
    assert len(set(busy)) == 2 and all(count == 1 for count in receiver.most_open_per_path.values()), \
        receiver.most_open_per_path
    assert {r["headers"].get("X-TM-Delivery-Id") for r in receiver.requests} <= {f"hung_{i}-0" for i in range(4)}
    done = wait_for(client, unrelated, timeout=120)
    print(f"\nunrelated job: steps claimed {steps_claimed_after:.1f} s after the worker started, FINISHED "
          f"{time.monotonic() - started_at:.1f} s after, with {len(receiver.open_paths())} notification threads "
          f"hanging on receivers")
    assert done["status"] == "FINISHED", done
    receiver.stop()  # the hanging POSTs fail at once, so the worker stops quickly


def test_a_pending_notification_is_delivered_after_a_restart(build_app, settings, receiver, tmp_path):
    """A `trainingmgr worker` process dies (SIGKILL) in the middle of delivering a notification; a new worker on
    the same database delivers it once the dead one's lease ends, with the same delivery id."""
    app = build_app(lease_seconds=2, **LOCAL_RECEIVERS)
    client = app.test_client()
    _prepare(client)
    job_id = _job_waiting_for_notifications(app, client, "restarted", f"{receiver.url}/rapp", 1, due_ago=0)
    env = {**os.environ, "TM_DATABASE_URL": settings.database_url, "TM_DATA_DIR": settings.data_dir,
           "TM_SECRET_KEY": settings.secret_key, "TM_WORKER_POLL_SECONDS": "0.05", "TM_LEASE_SECONDS": "2",
           "TM_NOTIFY_TIMEOUT": "30", "TM_LOG_LEVEL": "INFO",
           **({"TM_OUTBOUND_ALLOW": LOCAL_RECEIVERS["outbound_allow"]} if LOCAL_RECEIVERS else {})}
    with started([sys.executable, "-m", "trainingmgr", "worker", "--threads", "1", "--notify-threads", "1"],
                 log_path=tmp_path / "worker.log", env=env, cwd=tmp_path) as first:
        deadline = time.monotonic() + 120
        while not receiver.open_paths():  # the first worker is delivering it (the receiver hangs)
            assert first.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (tmp_path / "worker.log").read_text()[-3000:]
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)  # dies holding the notification's lease
        first.wait(10)
    with app.app_context():
        item = db.session.scalars(select(WorkItem).where(WorkItem.job_id == job_id, WorkItem.kind == NOTIFY)).one()
        assert item.lease_owner is not None and item.attempts == 1  # still pending, held by the dead worker
        db.session.remove()
    receiver.hang = False  # the rApp answers from now on
    app.extensions["trainingmgr"].start_worker(app)  # the restart: a new worker on the same database
    deadline = time.monotonic() + 30
    while True:
        with app.app_context():
            left = db.session.scalars(select(WorkItem.id).where(WorkItem.job_id == job_id,
                                                                 WorkItem.kind == NOTIFY)).all()
            db.session.remove()
        delivered = [r for r in receiver.requests if not r["hung"]]
        if delivered and not left:
            break
        assert time.monotonic() < deadline, (receiver.requests, left)
        time.sleep(0.05)
    assert [r["headers"].get("X-TM-Delivery-Id") for r in receiver.requests] == ["restarted-0", "restarted-0"]
    assert [r["path"] for r in delivered] == ["/rapp"]
