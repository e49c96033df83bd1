"""Live job events as Server-Sent Events: `GET /ai-ml-model-training/v1/events`.

Events come from the database (job_events, written by the state machine), so a client sees what every process
and replica did, and resumes after a restart with `Last-Event-ID` (the event's id). One hub per process (a
thread, started with the first stream) asks the database for new events, once per poll for all its streams, and
writes them out; with no stream open it asks nothing.

Under `serve`, a stream holds no request thread: once its head is written, the worker hands the connection to the
hub (trainingmgr.http_worker), which writes to every stream without blocking, so hundreds of open streams leave
the API's threads free. Elsewhere (the Flask test client, `flask run`) the request thread reads the hub's frames
from a queue.

Event ids come from one sequence but commit in any order: an id is only passed on once every smaller id has been
seen, or after GAP_SECONDS (a transaction that rolled back leaves its id unused for good).
"""
from __future__ import annotations

import json
import logging
import os
import queue
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, TypeVar

from flask import Blueprint, Flask, Response, current_app, request
from sqlalchemy import func, select

from ..errors import AtCapacity, BadRequest, NotFound
from ..extensions import db, read_only_transactions
from ..http_worker import StreamDetached
from ..models import JobEvent, Model, TrainingJob
from ..schemas.training_job import dump_event
from .common import services

log = logging.getLogger(__name__)

bp = Blueprint("event_stream", __name__)

POLL_SECONDS = 0.5  # how often the hub asks the database for new events while streams are open
HEARTBEAT_SECONDS = 15.0  # a comment line on an idle stream, so proxies and clients know it lives
GAP_SECONDS = 2.0  # how long an id missing between seen ones is waited for before it counts as rolled back
BATCH = 500  # events fetched per query (a client resuming far behind catches up batch by batch)
MAX_PENDING_BYTES = 1024 * 1024  # a client that reads slower than this is behind is dropped (it can resume)
RETRY_MILLISECONDS = 3000
StreamT = TypeVar("StreamT", bound="Stream")


@dataclass
class StreamFilter:
    job_id: int | None = None
    modelname: str | None = None
    modelversion: str | None = None

    def matches(self, job_id: int, modelname: str, modelversion: str) -> bool:
        return ((self.job_id is None or job_id == self.job_id)
                and (self.modelname is None or modelname == self.modelname)
                and (self.modelversion is None or modelversion == self.modelversion))


@dataclass(eq=False)
class Stream:
    filter: StreamFilter
    last_id: int
    sock: socket.socket | None = None  # the connection, else None: frames go to `frames` (a request thread's)
    chunked: bool = True  # HTTP/1.1: chunked framing; HTTP/1.0: the bytes as they are, the body ends when closed
    frames: "queue.Queue[bytes | None]" = field(default_factory=queue.Queue)
    queued: int = 0  # bytes in `frames` not taken yet
    pending: bytearray = field(default_factory=bytearray)
    last_write: float = field(default_factory=time.monotonic)
    closed: bool = False
    finishing: bool = False  # the last chunk is written: closed once the client has it all

    def put(self, data: bytes) -> None:
        self.last_write = time.monotonic()
        if self.sock is None:
            self.queued += len(data)
            self.frames.put(data)
            if self.queued > MAX_PENDING_BYTES:  # a reader too far behind is dropped, as on a socket
                self.closed = True
                self.frames.put(None)
            return
        self.pending += (f"{len(data):x}\r\n".encode() + data + b"\r\n") if self.chunked else data

    def finish(self) -> None:
        """The response is complete: end the body (or the queue) once what is pending is written."""
        if self.sock is None:
            self.frames.put(None)
            self.closed = True
            return
        if self.chunked:
            self.pending += b"0\r\n\r\n"
        self.finishing = True

    def flush(self) -> None:
        """Write what the socket takes now; a client too far behind is closed, a finished one once written."""
        if self.sock is None or not self.pending:
            self.closed = self.closed or self.finishing
            return
        try:
            sent = self.sock.send(self.pending)
            del self.pending[:sent]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self.closed = True
        if len(self.pending) > MAX_PENDING_BYTES or (self.finishing and not self.pending):
            self.closed = True

    def close(self) -> None:
        self.closed = True
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
        else:
            self.frames.put(None)


@dataclass(eq=False)
class LogStream(Stream):
    """A followed run log (`.../training-jobs/{id}/logs?follow=true`): the output from `offset` on, until the job
    has ended and its kept log is written out."""

    offset: int = 0
    next_read: float = 0.0

    @property
    def job_id(self) -> int:
        return self.filter.job_id or 0


def frame(row: Any) -> bytes:
    """One SSE event: the job event as the history route shows it, with its job and model."""
    event = row.JobEvent
    data = {**dump_event(event), "job_id": event.job_id, "modelname": row.modelname,
            "modelversion": row.modelversion, "job_status": row.status}
    return f"id: {event.id}\nevent: job\ndata: {json.dumps(data)}\n\n".encode()


class EventHub:
    """The process's streams and the one thread that feeds them."""

    def __init__(self, app: Flask, max_streams: int):
        self.app = app
        self.max_streams = max_streams
        self.streams: list[Stream] = []
        self.reserved = 0  # slots taken by streams whose body has not started yet
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None
        self.watermark: int | None = None  # every event up to here has been seen (or given up on)
        self.gap_since: float | None = None  # when the hub first waited for the id after the watermark
        self.wake_up = threading.Event()

    # ------------------------------------------------------------------ streams come and go
    def reserve(self) -> None:
        """Take a slot for a stream about to open (its body is read later): 503 when the process serves as many
        streams as it may. _add takes the slot over; release() gives back one that never opened."""
        with self.lock:
            if len(self.streams) + self.reserved >= self.max_streams:
                raise AtCapacity(f"This process serves {self.max_streams} event streams and followed logs already "
                                 "(TM_MAX_EVENT_STREAMS); try again later.")
            self.reserved += 1

    def release(self) -> None:
        with self.lock:
            self.reserved = max(0, self.reserved - 1)

    def open(self, stream_filter: StreamFilter, last_id: int, sock: socket.socket | None = None,
             chunked: bool = True) -> Stream:
        """A new stream of the events after `last_id`, written to `sock`, else to its queue."""
        newest = self.newest_id() if self.watermark is None else None  # a hub already running knows where it is
        with self.lock:
            if self.watermark is None:
                self.watermark = newest if newest is not None else self.newest_id()
        return self._add(Stream(stream_filter, last_id, sock=sock, chunked=chunked))

    def open_log(self, job_id: int, offset: int, sock: socket.socket | None = None, chunked: bool = True
                 ) -> LogStream:
        """A followed run log from byte `offset` on, written to `sock`, else to its queue."""
        return self._add(LogStream(StreamFilter(job_id=job_id), 0, sock=sock, chunked=chunked, offset=offset,
                                   next_read=time.monotonic() + POLL_SECONDS))

    def _add(self, stream: StreamT) -> StreamT:
        """The stream joins the hub, in the slot reserve() took for it."""
        if stream.sock is not None:
            stream.sock.setblocking(False)
        with self.lock:
            self.reserved = max(0, self.reserved - 1)
            self.streams.append(stream)
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._run, name="tm-event-hub", daemon=True)
                self.thread.start()
        self.wake_up.set()
        return stream

    def forget(self, stream: Stream) -> None:
        stream.close()
        with self.lock:
            if stream in self.streams:
                self.streams.remove(stream)

    def newest_id(self) -> int:
        with self.app.app_context(), read_only_transactions():
            newest = db.session.scalar(select(func.max(JobEvent.id))) or 0
            db.session.remove()
        return newest

    # ------------------------------------------------------------------ the hub's thread
    def _run(self) -> None:
        selector = selectors.DefaultSelector()
        watched: dict[int, Stream] = {}
        next_poll = 0.0
        while True:
            with self.lock:
                streams = [s for s in self.streams if not s.closed]
                gone = [s for s in self.streams if s.closed]
                for stream in gone:
                    self.streams.remove(stream)
                if not streams:
                    # Nothing read from here on: the next stream starts from what is newest then.
                    self.thread, self.watermark, self.gap_since = None, None, None
            for stream in gone:
                stream.close()
            if not streams:
                break
            try:
                next_poll = self._serve(selector, watched, streams, next_poll)
            except Exception:  # noqa: BLE001 - the hub must outlive any one fault: its streams would hang
                log.exception("event hub: a round failed; the next one follows")
                time.sleep(POLL_SECONDS)
        for stream in watched.values():
            _unregister(selector, stream)
        selector.close()

    def _serve(self, selector: selectors.BaseSelector, watched: dict[int, Stream], streams: list[Stream],
               next_poll: float) -> float:
        """One round: new events out, heartbeats, writes, then a wait; when the next poll is due."""
        self._watch(selector, watched, streams)
        now = time.monotonic()
        event_streams = [s for s in streams if not isinstance(s, LogStream)]
        if now >= next_poll:
            full = bool(event_streams) and self._deliver(event_streams) == BATCH  # one far behind: read on at once
            next_poll = now + (0 if full else POLL_SECONDS)
        self._read_logs([s for s in streams if isinstance(s, LogStream)], now)
        for stream in streams:
            if stream in event_streams and time.monotonic() - stream.last_write >= HEARTBEAT_SECONDS:
                stream.put(b": keep-alive\n\n")
            stream.flush()
        self._wait(selector, max(0.0, next_poll - time.monotonic()))
        return next_poll

    def _watch(self, selector: selectors.BaseSelector, watched: dict[int, Stream], streams: list[Stream]) -> None:
        """Socket streams are watched for reading (a client that hangs up) and, with bytes pending, writing."""
        for key, stream in list(watched.items()):
            if stream.closed or stream.sock.fileno() < 0:
                _unregister(selector, stream)
                del watched[key]
        for stream in streams:
            if stream.sock is None or stream.closed:
                continue
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if stream.pending else 0)
            key = id(stream)
            try:
                if key in watched:
                    selector.modify(stream.sock, events, stream)
                else:
                    selector.register(stream.sock, events, stream)
                    watched[key] = stream
            except (ValueError, OSError):
                stream.closed = True

    def _wait(self, selector: selectors.BaseSelector, timeout: float) -> None:
        if not selector.get_map():
            self.wake_up.wait(timeout)
            self.wake_up.clear()
            return
        for key, mask in selector.select(min(timeout, POLL_SECONDS)):
            stream: Stream = key.data
            if mask & selectors.EVENT_READ:
                try:
                    if not stream.sock.recv(4096):  # the client closed its side
                        stream.closed = True
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError:
                    stream.closed = True
        self.wake_up.clear()

    def _deliver(self, streams: list[Stream]) -> int:
        """Pass on the new events; how many were read (BATCH: there may be more at once)."""
        after = min(stream.last_id for stream in streams)
        try:
            with self.app.app_context(), read_only_transactions():
                rows = db.session.execute(
                    select(JobEvent, Model.modelname, Model.modelversion, TrainingJob.status)
                    .join(TrainingJob, TrainingJob.id == JobEvent.job_id).join(Model, Model.id == TrainingJob.model_id)
                    .where(JobEvent.id > after).order_by(JobEvent.id).limit(BATCH)
                ).all()
                db.session.remove()
        except Exception as e:  # noqa: BLE001 - a database outage: the streams wait, and resume when it is back
            log.warning("event streams could not read new events: %s", e.__class__.__name__)
            return 0
        self._advance_watermark([row.JobEvent.id for row in rows])
        for row in rows:
            event_id = row.JobEvent.id
            if event_id > self.watermark:
                break
            for stream in streams:
                if event_id > stream.last_id:
                    if stream.filter.matches(row.JobEvent.job_id, row.modelname, row.modelversion):
                        stream.put(frame(row))
                    stream.last_id = event_id
        return len(rows)

    def _read_logs(self, streams: list[LogStream], now: float) -> None:
        """Pass on what the followed logs grew by; finish those whose job has ended and been written out."""
        due = [s for s in streams if now >= s.next_read and not s.finishing and not s.closed]
        if not due:
            return
        with self.app.app_context(), read_only_transactions():
            jobs = services().training_jobs()
            # A remote engine is asked no more often than the steps ask it.
            interval = max(POLL_SECONDS, services().engine.watch_interval)
            for stream in due:
                stream.next_read = now + interval
                try:
                    while True:
                        piece = jobs.run_log(stream.job_id, stream.offset)
                        if piece.data:
                            stream.put(piece.data)
                        stream.offset = piece.offset
                        if piece.ended:
                            stream.finish()
                        if piece.ended or not piece.data or len(stream.pending) > MAX_PENDING_BYTES // 2:
                            break
                except NotFound:  # the job was deleted meanwhile: its log went with it
                    stream.finish()
                except Exception as e:  # noqa: BLE001 - an engine or database outage: read again later
                    log.warning("a followed run log could not be read: %s", e.__class__.__name__)
                    db.session.rollback()  # the next stream's reads start on a clean session
            db.session.remove()

    def _advance_watermark(self, ids: list[int]) -> None:
        for event_id in ids:
            if event_id <= self.watermark:
                continue
            if event_id == self.watermark + 1:
                self.watermark, self.gap_since = event_id, None
                continue
            # A smaller id is not committed yet (or never will be): wait for it a while.
            now = time.monotonic()
            self.gap_since = self.gap_since or now
            if now - self.gap_since < GAP_SECONDS:
                return
            self.watermark, self.gap_since = event_id, None


def _unregister(selector: selectors.BaseSelector, stream: Stream) -> None:
    try:
        selector.unregister(stream.sock)
    except (KeyError, ValueError, OSError):  # closed, or never registered
        pass


def hub() -> EventHub:
    """The process's hub (built on first use, in the process that serves: never before a fork)."""
    hubs = current_app.extensions.setdefault("trainingmgr_event_hub", {})
    if "hub" not in hubs:
        hubs["hub"] = EventHub(current_app._get_current_object(), services().settings.max_event_streams)
    return hubs["hub"]


def _filter() -> StreamFilter:
    job_id = request.args.get("job_id")
    if job_id is not None and not (job_id.isascii() and job_id.isdigit() and len(job_id) <= 18 and int(job_id) > 0):
        raise BadRequest(f"job_id must be a positive integer, not {job_id[:40]!r}")
    modelversion = request.args.get("modelversion")
    modelname = request.args.get("modelname")
    if modelversion is not None and modelname is None:
        raise BadRequest("modelversion needs modelname")
    return StreamFilter(int(job_id) if job_id is not None else None, modelname, modelversion)


def _last_event_id() -> int | None:
    raw = request.headers.get("Last-Event-ID", request.args.get("last_event_id"))
    if raw is None or raw == "":
        return None
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 18):
        raise BadRequest(f"Last-Event-ID must be an event id (a non-negative integer), not {raw[:40]!r}")
    return int(raw)


@bp.get("/ai-ml-model-training/v1/events")
def job_events() -> Response:
    """Every job event as it happens (Server-Sent Events), filtered by job or model, resumable."""
    stream_filter, last_id = _filter(), _last_event_id()
    the_hub = hub()
    if last_id is None:  # from the next event on, as of this request
        last_id = the_hub.newest_id()
    first = f"retry: {RETRY_MILLISECONDS}\n\n".encode()
    return _streamed(first, lambda sock, chunked: the_hub.open(stream_filter, last_id, sock, chunked),
                     "text/event-stream")


def follow_log(job_id: int, first: bytes, offset: int) -> Response:
    """`.../training-jobs/{id}/logs?follow=true` once `first` (the output up to `offset`) is read: the rest as the
    run writes it, ending when the job has ended and its log is written out."""
    the_hub = hub()
    return _streamed(first, lambda sock, chunked: the_hub.open_log(job_id, offset, sock, chunked), "text/plain")


def _streamed(first: bytes, open_stream: Callable[[socket.socket | None, bool], Stream], mimetype: str) -> Response:
    """A streamed answer: `first`, then what the hub writes to the stream `open_stream` opens (503 when the
    process has no slot left for one).

    Under serve (trainingmgr.http_worker) the connection is handed to the hub once `first` is out, on its own copy
    of the socket: the hub writes chunks on HTTP/1.1, the bytes as they are on HTTP/1.0 (whose body ends when the
    hub closes the connection). So a stream holds no request thread. Elsewhere (the test client, `flask run`) the
    request thread reads the hub's frames from a queue. The stream opens once the body is read, not before: an
    answer never read holds a slot until it is closed, no stream. HEAD gets the head and `first` only."""
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    if request.method == "HEAD":
        return Response(first, mimetype=mimetype, headers=headers)
    the_hub = hub()
    the_hub.reserve()
    chunked = request.environ.get("SERVER_PROTOCOL") == "HTTP/1.1"
    sock = request.environ.get("gunicorn.socket") if request.environ.get("trainingmgr.can_detach") else None
    opened = False

    def body() -> Iterator[bytes]:
        nonlocal opened
        yield first
        opened = True
        if sock is not None:
            open_stream(socket.socket(fileno=os.dup(sock.fileno())), chunked)
            raise StreamDetached()
        stream = open_stream(None, chunked)
        try:
            while True:
                data = stream.frames.get()
                if data is None:
                    return
                stream.queued -= len(data)
                yield data
        except GeneratorExit:  # the client went away (or the server stops)
            the_hub.forget(stream)
            raise

    response = Response(body(), mimetype=mimetype, headers=headers)
    response.call_on_close(lambda: None if opened else the_hub.release())
    return response
