"""The gunicorn worker `serve` runs: gunicorn's gthread worker, except that a request reaches a thread only once it
has fully arrived, and errors gunicorn answers itself (414, 431, a bad request line) are ProblemDetails.

Why: a gthread thread reads the request body itself, as the application asks for it. A client that announces
`Content-Length: 100000`, sends 5 bytes and waits held a thread for as long as it liked: seven of them stopped
`/healthz` from answering at all. Here the worker's event loop (the thread that accepts connections and watches
kept-alive ones) reads each request's head and body without blocking, Content-Length and chunked bodies alike, and
hands the connection to the thread pool only when the request is complete, so a stalled or trickling upload costs
a buffer, not a thread. A request that has not fully arrived within TM_REQUEST_READ_TIMEOUT seconds of the moment
the loop started reading it is answered 408 and its connection closed. `Expect: 100-continue` is answered by the
loop (the header is then taken out, so gunicorn does not answer it twice).

The loop understands every framing it passes on, and answers itself what it does not, so no thread ever reads a
request from the socket: a head over 64 KiB is a 431; Transfer-Encoding other than one `chunked`, or with
Content-Length, or either header repeated, is a 400/501; a body (announced or chunked) over TM_MAX_BODY_BYTES is a
413; malformed chunk framing is a 400. A chunked request is handed to gunicorn as a Content-Length one (the loop
has taken the chunks apart), so gunicorn's chunk parser never sees what a client sent. The bytes buffered beyond
the first 64 KiB of each request count against a budget of 4 x TM_MAX_BODY_BYTES per worker: a request that would
go over it is a 503 (Retry-After), so memory stays bounded however many clients upload at once. After answers that
leave a body unread (408, 413, 415) the connection is closed. (TLS and HTTP/2, which `serve` does not configure, and
requests arriving while the worker stops, go to a thread as gunicorn has them.)

This relies on gunicorn's gthread internals (TConn, the poller, enqueue_req, murder_pending): gunicorn is pinned,
and tests/test_slow_clients.py fails if an upgrade changes them.
"""
from __future__ import annotations

import json
import re
import selectors
import time
from functools import partial
from typing import Any, Callable, Iterable

from gunicorn.workers.gthread import ThreadWorker

HEAD_END = b"\r\n\r\n"
MAX_HEAD_BYTES = 64 * 1024
FREE_BYTES_PER_REQUEST = 64 * 1024  # buffered without counting against the budget: every small request passes
RETRY_AFTER_SECONDS = 5
_CONTENT_LENGTH = re.compile(rb"^content-length[ \t]*:([^\r\n]*)\r?$", re.IGNORECASE | re.MULTILINE)
_TRANSFER_ENCODING = re.compile(rb"^transfer-encoding[ \t]*:([^\r\n]*)\r?\n", re.IGNORECASE | re.MULTILINE)
_EXPECT_CONTINUE = re.compile(rb"^expect[ \t]*:[ \t]*100-continue[ \t]*\r\n", re.IGNORECASE | re.MULTILINE)
_DIGITS = re.compile(rb"[0-9]+")
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]+")
MAX_CHUNK_LINE = 8190  # gunicorn's limit_request_field_size
_READ_CHUNK = 256 * 1024
# Answers that leave the request body unread: the connection cannot carry another request after them.
_CLOSING_STATUSES = ("408", "413", "415")
_DETACHED = object()  # handle()'s answer for a connection a response took over


class StreamDetached(BaseException):
    """Raised by a response (an event stream) once it handed its connection to a writer of its own: the worker
    then neither answers nor closes the connection. A BaseException, so no `except Exception` on the way takes it
    for an error."""

# gunicorn answers these itself, before the application sees the request (see gunicorn.workers.base.handle_error).
_GUNICORN_TITLES = {400: "Bad Request", 403: "Forbidden", 414: "URI Too Long", 417: "Expectation Failed",
                    431: "Request Header Fields Too Large", 500: "Internal Server Error", 501: "Not Implemented"}


def problem_bytes(status: int, title: str, detail: str, headers: str = "") -> bytes:
    """A complete HTTP/1.1 response carrying a ProblemDetails body, closing the connection."""
    body = json.dumps({"title": title, "status": status, "detail": detail}).encode("utf-8")
    head = (f"HTTP/1.1 {status} {title}\r\nConnection: close\r\nContent-Type: application/problem+json\r\n"
            f"{headers}Content-Length: {len(body)}\r\n\r\n")
    return head.encode("latin-1") + body


class _Refused(Exception):
    """The loop answers the request itself (`answer`) and closes the connection."""

    def __init__(self, answer: bytes):
        super().__init__()
        self.answer = answer


class _Buffering:
    """A connection whose request the loop is still reading."""

    __slots__ = ("data", "deadline", "head_end", "searched", "size", "chunk_at", "chunk_total", "charged", "registered")

    def __init__(self, deadline: float, data: bytes = b""):
        self.data = bytearray(data)
        self.deadline = deadline
        self.head_end = -1  # the index just after the head's blank line, once seen
        self.searched = 0  # bytes already searched for the head's end
        self.size = 0  # Content-Length requests: the whole request's length
        self.chunk_at = -1  # chunked requests: where the next chunk-size line starts
        self.chunk_total = 0  # chunked requests: body bytes seen so far
        self.charged = 0  # bytes of this request counted against the worker's budget
        self.registered = False  # with the poller, waiting for more of the request


def chunked_end(data: bytearray, at: int, total: int, limit: int) -> tuple[int, int, int]:
    """Scan chunks from `at`: (end of the body with its trailers or -1 if more is needed, where to resume, body
    bytes so far). ValueError for framing the loop refuses (400), OverflowError past `limit` (413)."""
    while True:
        line_end = data.find(b"\r\n", at)
        if line_end < 0:
            if len(data) - at > MAX_CHUNK_LINE:
                raise ValueError("a chunk-size line is too long")
            return -1, at, total
        if line_end - at > MAX_CHUNK_LINE:
            raise ValueError("a chunk-size line is too long")
        size_text = bytes(data[at:line_end]).split(b";", 1)[0]
        if not _CHUNK_SIZE.fullmatch(size_text):
            raise ValueError("a chunk size is not a hexadecimal number")
        digits = size_text.lstrip(b"0")
        if len(digits) > 16:
            raise OverflowError(total)
        size = int(digits or b"0", 16)
        if size == 0:
            trailer = line_end + 2
            while True:  # trailer fields, then the blank line
                end = data.find(b"\r\n", trailer)
                if end < 0:
                    if len(data) - trailer > MAX_HEAD_BYTES:
                        raise ValueError("the trailer is too long")
                    return -1, at, total
                if end == trailer:
                    return end + 2, at, total
                trailer = end + 2
        if total + size > limit:
            raise OverflowError(total + size)
        chunk_end = line_end + 2 + size
        if len(data) < chunk_end + 2:
            return -1, at, total
        if data[chunk_end:chunk_end + 2] != b"\r\n":
            raise ValueError("chunk data is not followed by CRLF")
        total += size
        at = chunk_end + 2


def dechunked(data: bytes, at: int, end: int) -> bytes:
    """The body of a chunked message whose framing chunked_end accepted (from `at`, its first size line, to `end`)."""
    parts = []
    while True:
        line_end = data.index(b"\r\n", at)
        size = int(data[at:line_end].split(b";", 1)[0].lstrip(b"0") or b"0", 16)
        if size == 0:
            return b"".join(parts)
        parts.append(data[line_end + 2:line_end + 2 + size])
        at = line_end + 2 + size + 2
        if at > end:
            raise ValueError("chunks past the end")


def _bad_request(detail: str) -> _Refused:
    return _Refused(problem_bytes(400, "Bad Request", detail))


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
        self.charged_bytes = 0
        self.buffering: dict[Any, _Buffering] = {}
        super().init_process()

    def load_wsgi(self) -> None:
        super().load_wsgi()
        self.wsgi = _closing_after_unread_body(self.wsgi)
        app = self.wsgi

        def detachable(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            environ["trainingmgr.can_detach"] = True  # a response may hand its connection over (event streams)
            return app(environ, start_response)

        self.wsgi = detachable

    # ------------------------------------------------------------------ the loop's side
    def enqueue_req(self, conn: Any) -> None:
        if self.cfg.is_ssl or conn.is_http2 or not self.alive:
            return super().enqueue_req(conn)
        # Pipelined bytes the parser read ahead (behind the previous request) start this request.
        early = conn.parser.unreader.take_buffered() if conn.parser is not None else b""
        state = _Buffering(time.monotonic() + self.read_timeout, early)
        self.buffering[conn] = state
        if conn.sock.getblocking():  # a new connection (a kept-alive one is non-blocking already)
            conn.sock.setblocking(False)
        # Read at once: a kept-alive connection comes here because its next request arrived, most often whole, and
        # is then dispatched without being registered with the poller and taken out again.
        if early and not self._advance(conn, state):
            return
        if self._receive(conn, state):
            state.registered = True
            self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._readable, conn))

    def _readable(self, conn: Any, _sock: Any) -> None:
        self._receive(conn, self.buffering[conn])

    def _receive(self, conn: Any, state: _Buffering) -> bool:
        """Read what the socket holds: True while more of the request is wanted (else it was dispatched, refused or
        the connection dropped)."""
        while True:
            try:
                chunk = conn.sock.recv(_READ_CHUNK)
            except (BlockingIOError, InterruptedError):
                return True
            except OSError:
                self._drop(conn)
                return False
            if not chunk:  # the client went away before its request was complete
                self._drop(conn)
                return False
            state.data += chunk
            if not self._advance(conn, state):
                return False

    def _advance(self, conn: Any, state: _Buffering) -> bool:
        """Look at what arrived: True while more of the request is wanted (else it was dispatched or refused)."""
        try:
            complete = self._complete(conn, state)
            self._charge(state)
        except _Refused as refused:
            self._drop(conn, refused.answer)
            return False
        if complete:
            self._dispatch(conn, state)
            return False
        return True

    def _complete(self, conn: Any, state: _Buffering) -> bool:
        """Whether the request has fully arrived; _Refused for what the loop answers itself."""
        if state.head_end < 0:
            end = state.data.find(HEAD_END, max(0, state.searched - len(HEAD_END) + 1))
            state.searched = len(state.data)
            if end < 0:
                if len(state.data) > MAX_HEAD_BYTES:
                    raise _Refused(problem_bytes(431, "Request Header Fields Too Large",
                                                 f"The request head is larger than {MAX_HEAD_BYTES} bytes"))
                return False
            self._read_head(conn, state, end)
        if state.chunk_at >= 0:
            try:
                end, state.chunk_at, state.chunk_total = chunked_end(state.data, state.chunk_at, state.chunk_total,
                                                                     self.max_body)
            except ValueError as e:
                raise _bad_request(f"Invalid chunked body: {e}") from None
            except OverflowError:
                raise self._too_large() from None
            if end >= 0:
                self._as_content_length(state, end)
                return True
            return False
        return len(state.data) >= state.size

    def _read_head(self, conn: Any, state: _Buffering, end: int) -> None:
        """Decide how the body is read once the head is here. The loop understands every framing it passes on: what
        it does not (and what gunicorn would refuse anyway) it answers itself, so no thread ever reads a body."""
        head = bytes(state.data[:end + 2])
        encodings = _TRANSFER_ENCODING.findall(head)
        lengths = _CONTENT_LENGTH.findall(head)
        expect = _EXPECT_CONTINUE.search(head)
        if encodings and lengths:
            raise _bad_request("A request may not carry both Transfer-Encoding and Content-Length")
        if len(encodings) > 1 or len(lengths) > 1:
            raise _bad_request("Transfer-Encoding or Content-Length is repeated")
        if encodings and encodings[0].strip(b" \t").lower() != b"chunked":
            raise _Refused(problem_bytes(501, "Not Implemented", "Transfer-Encoding must be chunked"))
        if expect:
            # Answered here; taken out so that gunicorn, which would answer it too, never sees it.
            del state.data[expect.start():expect.end()]
            end -= expect.end() - expect.start()
        state.head_end = end + len(HEAD_END)
        if encodings:
            state.chunk_at = state.head_end
        else:
            body = 0
            if lengths:
                value = lengths[0].strip(b" \t")
                if not _DIGITS.fullmatch(value):
                    raise _bad_request("Content-Length is not a number")
                digits = value.lstrip(b"0")
                if len(digits) > 19 or int(digits or b"0") > self.max_body:
                    raise self._too_large()
                body = int(digits or b"0")
            state.size = state.head_end + body
        if expect and (state.chunk_at >= 0 or state.size > state.head_end):
            self._send(conn.sock, b"HTTP/1.1 100 Continue\r\n\r\n")

    def _too_large(self) -> _Refused:
        return _Refused(problem_bytes(413, "Request Entity Too Large",
                                      f"Request body is larger than the limit of {self.max_body} bytes"))

    @staticmethod
    def _as_content_length(state: _Buffering, end: int) -> None:
        """Hand gunicorn the chunked request as a Content-Length one: the loop has read and checked the framing,
        so gunicorn's own chunk parser never runs on what a client sent."""
        data = bytes(state.data)
        body = dechunked(data, state.head_end, end)
        head = _TRANSFER_ENCODING.sub(b"", data[:state.head_end - 2], count=1)
        state.data = bytearray(head + b"Content-Length: %d\r\n\r\n" % len(body) + body + data[end:])

    def _charge(self, state: _Buffering) -> None:
        """Count what this request holds beyond its free allowance; refuse it when the worker's budget is spent."""
        wanted = max(0, len(state.data) - FREE_BYTES_PER_REQUEST)
        if wanted > state.charged:
            if self.charged_bytes + wanted - state.charged > self.buffer_budget:
                raise _Refused(problem_bytes(
                    503, "Service Unavailable",
                    "The server is receiving too many request bodies at once; retry later",
                    f"Retry-After: {RETRY_AFTER_SECONDS}\r\n"))
            self.charged_bytes += wanted - state.charged
            state.charged = wanted

    def _forget(self, conn: Any) -> _Buffering:
        state = self.buffering.pop(conn)
        self.charged_bytes -= state.charged
        if state.registered:
            try:
                self.poller.unregister(conn.sock)
            except (KeyError, ValueError, OSError):
                pass
        return state

    def _dispatch(self, conn: Any, state: _Buffering) -> None:
        self._forget(conn)
        conn.tm_prebuffered = bytes(state.data)
        conn.data_ready = True
        super().enqueue_req(conn)

    def _drop(self, conn: Any, answer: bytes = b"") -> None:
        self._forget(conn)
        if answer:
            self._send(conn.sock, answer)
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
                if started:
                    self.log.warning("request not received within %ss; connection closed", self.read_timeout)
                self._drop(conn, problem_bytes(
                    408, "Request Timeout",
                    f"The request did not arrive within {self.read_timeout:g} seconds",
                ) if started else b"")

    # ------------------------------------------------------------------ the thread's side
    def handle(self, conn: Any) -> Any:
        data = conn.__dict__.pop("tm_prebuffered", None)
        if data is not None:
            conn.init()  # (gunicorn's handle sets the socket blocking again)
            conn.parser.unreader.unread(data)
        try:
            return super().handle(conn)
        except StreamDetached:
            return _DETACHED  # the event hub writes to this connection now (on its own copy of the socket)

    def finish_request(self, conn: Any, fs: Any) -> None:
        if not fs.cancelled() and fs.exception() is None and fs.result() is _DETACHED:
            self.nr_conns -= 1
            try:
                conn.sock.close()  # this copy only: no shutdown, which would end the hub's stream too
            except OSError:
                pass
            return
        super().finish_request(conn, fs)

    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        capture = _ErrorCapture()
        super().handle_error(req, capture, addr, exc)  # logs and access-logs as gunicorn does; we answer
        status = capture.status
        detail = str(exc) if 400 <= status < 500 else "The server failed to handle the request"
        self._send(client, problem_bytes(status, _GUNICORN_TITLES.get(status, "Error"), detail[:500]))

    @staticmethod
    def _send(client: Any, data: bytes) -> None:
        """Best effort, never blocking: a client that stalled may not read either."""
        try:
            client.setblocking(False)
            client.send(data)
        except OSError:
            pass


def _closing_after_unread_body(app: Callable[..., Any]) -> Callable[..., Any]:
    """The WSGI app, with the connection closed after an answer that leaves the body unread (408, 413, 415): the
    client may not send another request on it (gunicorn would otherwise announce keep-alive, then drop it while
    draining a large body). The app cannot say so itself: gunicorn drops hop-by-hop headers such as Connection."""

    def wrapped(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            if status[:3] in _CLOSING_STATUSES:
                response = getattr(start_response, "__self__", None)
                if response is not None and hasattr(response, "force_close"):
                    response.force_close()
            return start_response(status, headers, exc_info)

        return app(environ, start)

    return wrapped
