"""The gunicorn worker `serve` runs: gunicorn's gthread worker, except that a request reaches a thread only once it
has fully arrived, and errors gunicorn answers itself (414, 431, a bad request line) are ProblemDetails.

Why: a gthread thread reads the request body itself, as the application asks for it. A client that announces
`Content-Length: 100000`, sends 5 bytes and waits held a thread for as long as it liked: seven of them stopped
`/healthz` from answering at all. Here the worker's event loop (the thread that accepts connections and watches
kept-alive ones) reads each request's head and body without blocking, and hands the connection to the thread pool
only when the body is complete, so a stalled upload costs a buffer, not a thread. A request that has not fully
arrived within TM_REQUEST_READ_TIMEOUT seconds of its first byte is answered 408 and its connection closed.

Requests the loop does not buffer go to a thread at once and read from a socket with a receive timeout of the same
length: chunked bodies, `Expect: 100-continue` (the client waits for the thread's 100 before it sends), bodies over
TM_MAX_BODY_BYTES (the application refuses them, 413, without reading) and bodies that would take the worker's
buffers over their bound (4 x TM_MAX_BODY_BYTES, so memory stays bounded however many clients upload at once).

This relies on gunicorn's gthread internals (TConn, the poller, enqueue_req, murder_pending): gunicorn is pinned,
and tests/test_slow_clients.py fails if an upgrade changes them.
"""
from __future__ import annotations

import json
import re
import selectors
import socket
import struct
import time
from functools import partial
from typing import Any

from gunicorn.workers.gthread import ThreadWorker

HEAD_END = b"\r\n\r\n"
# gunicorn's own limits refuse heads larger than this (request line + 100 fields of 8190 bytes); past it the
# parser in the thread answers 431 or 414 instead of the loop waiting for an end that may never come.
MAX_HEAD_BYTES = 4096 + 100 * 8192
_CONTENT_LENGTH = re.compile(rb"^content-length[ \t]*:[ \t]*([0-9]{1,19})[ \t]*\r?$", re.IGNORECASE | re.MULTILINE)
_HANDS_OVER = re.compile(rb"^(?:transfer-encoding|expect)[ \t]*:", re.IGNORECASE | re.MULTILINE)
_READ_CHUNK = 256 * 1024

# gunicorn answers these itself, before the application sees the request (see gunicorn.workers.base.handle_error).
_GUNICORN_TITLES = {400: "Bad Request", 403: "Forbidden", 414: "URI Too Long", 417: "Expectation Failed",
                    431: "Request Header Fields Too Large", 500: "Internal Server Error", 501: "Not Implemented"}


def problem_bytes(status: int, title: str, detail: str) -> bytes:
    """A complete HTTP/1.1 response carrying a ProblemDetails body, closing the connection."""
    body = json.dumps({"title": title, "status": status, "detail": detail}).encode("utf-8")
    head = (f"HTTP/1.1 {status} {title}\r\nConnection: close\r\nContent-Type: application/problem+json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode("latin-1") + body


class _Buffering:
    """A connection whose request the loop is still reading."""

    __slots__ = ("data", "deadline", "size", "searched")

    def __init__(self, deadline: float):
        self.data = bytearray()
        self.deadline = deadline
        self.size = 0  # the whole request's length (head and body), once its head has been read
        self.searched = 0  # bytes already searched for the head's end


class _ErrorCapture:
    """Stands in for the client socket while gunicorn writes its HTML error page, so it can be sent as JSON."""

    def __init__(self) -> None:
        self.status = 500

    def gettimeout(self) -> float:
        return 0.0

    def sendall(self, data: bytes) -> None:
        match = re.match(rb"HTTP/1\.1 (\d{3}) ", data)
        if match:
            self.status = int(match.group(1))

    send = sendall


class RequestBufferingWorker(ThreadWorker):
    """gunicorn's gthread worker with whole-request buffering in its event loop (see the module's docstring)."""

    def init_process(self) -> None:
        settings = getattr(self.app, "settings_for_workers", None)
        self.read_timeout = float(getattr(settings, "request_read_timeout", 30.0))
        self.max_body = int(getattr(settings, "max_body_bytes", 16 * 1024 * 1024))
        self.buffer_budget = 4 * self.max_body
        self.buffered_bytes = 0
        self.buffering: dict[Any, _Buffering] = {}
        super().init_process()

    # ------------------------------------------------------------------ the loop's side
    def enqueue_req(self, conn: Any) -> None:
        pipelined = conn.parser is not None and bool(conn.parser.unreader.buf.getvalue())
        if self.cfg.is_ssl or conn.is_http2 or pipelined or not self.alive:
            return self._to_thread(conn)
        state = _Buffering(time.monotonic() + self.read_timeout)
        self.buffering[conn] = state
        conn.sock.setblocking(False)
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._readable, conn))

    def _readable(self, conn: Any, _sock: Any) -> None:
        state = self.buffering[conn]
        while True:
            try:
                chunk = conn.sock.recv(_READ_CHUNK)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                return self._drop(conn)
            if not chunk:  # the client went away before its request was complete
                return self._drop(conn)
            state.data += chunk
            if not self._more_wanted(state):
                return self._dispatch(conn, state)

    def _more_wanted(self, state: _Buffering) -> bool:
        """False once the request is complete, or once the loop should stop buffering it (a thread reads the rest)."""
        if state.size:
            return len(state.data) < state.size
        end = state.data.find(HEAD_END, max(0, state.searched - len(HEAD_END) + 1))
        state.searched = len(state.data)
        if end < 0:
            return len(state.data) <= MAX_HEAD_BYTES
        head = bytes(state.data[:end + 2])
        if _HANDS_OVER.search(head):
            return False
        match = _CONTENT_LENGTH.search(head)
        body = int(match.group(1)) if match else 0
        size = end + len(HEAD_END) + body
        if body > self.max_body or self.buffered_bytes + size > self.buffer_budget:
            return False
        state.size = size
        self.buffered_bytes += size
        return len(state.data) < size

    def _forget(self, conn: Any) -> _Buffering:
        state = self.buffering.pop(conn)
        self.buffered_bytes -= state.size
        try:
            self.poller.unregister(conn.sock)
        except (KeyError, ValueError, OSError):
            pass
        return state

    def _dispatch(self, conn: Any, state: _Buffering) -> None:
        self._forget(conn)
        conn.tm_prebuffered = bytes(state.data)
        conn.data_ready = True
        self._to_thread(conn)

    def _to_thread(self, conn: Any) -> None:
        if not getattr(conn, "tm_receive_timeout", False):
            # Reads a thread still makes (a chunked body, one past the buffer budget) give up after the read
            # timeout; werkzeug turns that into ClientDisconnected, which the app answers 408.
            seconds = int(self.read_timeout)
            microseconds = int((self.read_timeout - seconds) * 1e6)
            try:
                conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", seconds, microseconds))
            except OSError:
                pass
            conn.tm_receive_timeout = True
        super().enqueue_req(conn)

    def _drop(self, conn: Any, answer: bytes = b"") -> None:
        self._forget(conn)
        if answer:
            try:
                conn.sock.send(answer)  # non-blocking, best effort: the client stalled, it may not read either
            except OSError:
                pass
        self.nr_conns -= 1
        conn.close()

    def murder_pending(self) -> None:
        super().murder_pending()
        now = time.monotonic()
        for conn, state in list(self.buffering.items()):
            if not self.alive:
                self._drop(conn)
            elif now >= state.deadline:
                started = bool(state.data)
                self.log.warning("request not received within %ss; connection closed", self.read_timeout)
                self._drop(conn, problem_bytes(
                    408, "Request Timeout",
                    f"The request did not arrive within {self.read_timeout:g} seconds",
                ) if started else b"")

    # ------------------------------------------------------------------ the thread's side
    def handle(self, conn: Any) -> Any:
        data = conn.__dict__.pop("tm_prebuffered", None)
        if data is not None:
            conn.sock.setblocking(True)
            conn.init()
            conn.parser.unreader.unread(data)
        return super().handle(conn)

    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        capture = _ErrorCapture()
        super().handle_error(req, capture, addr, exc)  # logs and access-logs as gunicorn does; we answer
        status = capture.status
        detail = str(exc) if 400 <= status < 500 else "The server failed to handle the request"
        self._send(client, problem_bytes(status, _GUNICORN_TITLES.get(status, "Error"), detail[:500]))

    @staticmethod
    def _send(client: Any, data: bytes) -> None:
        try:
            client.setblocking(False)
            client.send(data)
        except OSError:
            pass
