"""The job lists' answers, assembled from each job as last rendered.

A job list page dumps up to 1000 jobs; dumping one (its view read from the database, then JSON) costs about 30 us
of CPU, so a page of 100 cost ~3 ms before anything else, on every poll of a dashboard. A job's JSON changes only
when its row does, and every change of the row moves its updated_at (services.training_jobs.versions), so a page
reads the id and updated_at of its jobs first, takes the JSON of each job whose updated_at is still the rendered
one, and reads and renders only the others. Per process, bounded in bytes, least recently used first out, and
each rendering serves MAX_AGE seconds at most.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Any, Callable

from flask import Flask, current_app

# What a process keeps: the JSON of its last-rendered jobs up to this many bytes (a job is ~2 KB; a client's
# training_config may make one far larger: such a job is rendered each time rather than kept).
MAX_BYTES = 2 * 1024 * 1024
MAX_JOB_BYTES = 64 * 1024
# Seconds a rendering serves at most: a change written outside the service (an operator's SQL) that leaves
# updated_at as it was is shown after this long, not never.
MAX_AGE = 60.0
_EXTENSION = "trainingmgr_rendered_jobs"


class RenderedJobs:
    """JSON bytes of jobs by id, each with the version (updated_at and the URL prefix it was rendered for) it
    shows, kept up to `max_bytes` in all and `max_age` seconds each."""

    def __init__(self, max_bytes: int = MAX_BYTES, max_job_bytes: int = MAX_JOB_BYTES, max_age: float = MAX_AGE,
                 clock: Callable[[], float] = time.monotonic):
        self.max_bytes, self.max_job_bytes, self.max_age = max_bytes, max_job_bytes, max_age
        self.clock = clock
        self.bytes = 0
        self._entries: OrderedDict[int, tuple[Any, bytes, float]] = OrderedDict()  # id: (version, JSON, kept at)
        self._lock = threading.Lock()  # gunicorn's threads share it

    def get(self, job_id: int, version: Any) -> bytes | None:
        return self.get_many([(job_id, version)])[0]

    def get_many(self, wanted: list[tuple[int, Any]]) -> list[bytes | None]:
        """The JSON of each (job id, version) kept, None where none is kept for that version (or it is too old)."""
        found: list[bytes | None] = []
        oldest = self.clock() - self.max_age
        with self._lock:
            entries = self._entries
            for job_id, version in wanted:
                entry = entries.get(job_id)
                if entry is None or entry[0] != version or entry[2] < oldest:
                    found.append(None)
                else:
                    entries.move_to_end(job_id)
                    found.append(entry[1])
        return found

    def put(self, job_id: int, version: Any, body: bytes) -> None:
        with self._lock:
            old = self._entries.pop(job_id, None)
            if old is not None:
                self.bytes -= len(old[1])
            if len(body) > self.max_job_bytes:
                return
            self._entries[job_id] = (version, body, self.clock())
            self.bytes += len(body)
            while self.bytes > self.max_bytes:
                self.bytes -= len(self._entries.popitem(last=False)[1][1])

    def __len__(self) -> int:
        return len(self._entries)


def install_rendered_jobs(app: Flask) -> None:
    app.extensions[_EXTENSION] = RenderedJobs()


def rendered_jobs() -> RenderedJobs:
    return current_app.extensions[_EXTENSION]


def job_list_body(versions: list[dict[str, Any]], prefix: str,
                  read_views: Callable[[list[int]], dict[int, dict[str, Any]]],
                  render: Callable[[dict[str, Any]], bytes]) -> bytes:
    """The JSON array of the jobs `versions` names ({id, updated_at}, in the page's order): each job's JSON as
    rendered before for its updated_at and `prefix`, else its view read (all missing ones at once: `read_views`)
    and rendered (`render`). A job deleted since the page was read is left out."""
    cache = rendered_jobs()
    bodies = cache.get_many([(v["id"], (v["updated_at"], prefix)) for v in versions])
    missing = [v["id"] for v, body in zip(versions, bodies) if body is None]
    if missing:
        views = read_views(missing)
        for i, version in enumerate(versions):
            view = views.get(version["id"]) if bodies[i] is None else None
            if view is not None:
                body = render(view)
                # Under the view's own updated_at: it may be newer than the page's, if the job changed meanwhile.
                cache.put(view["id"], (view["updated_at"], prefix), body)
                bodies[i] = body
    return b"[" + b",".join(body for body in bodies if body is not None) + b"]\n"
