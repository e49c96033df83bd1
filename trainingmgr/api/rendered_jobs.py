"""The job lists' answers, assembled from each job as last rendered.

A job list page dumps up to 1000 jobs; dumping one (its view read from the database, then JSON) costs about 30 us
of CPU, so a page of 100 cost ~3 ms before anything else, on every poll of a dashboard. A job's JSON changes only
when its row does, and every change of the row moves its updated_at (services.training_jobs.versions), so a page
reads the id and updated_at of its jobs first, takes the JSON of each job whose updated_at is still the rendered
one, and reads and renders only the others. Per process, bounded, least recently used first out.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Callable

from flask import Flask, current_app

# Entries kept per process: a page of the largest size (1000) and then some; ~2 KB each.
CAPACITY = 2000
_EXTENSION = "trainingmgr_rendered_jobs"


class RenderedJobs:
    """JSON bytes of jobs by id, each with the version (updated_at and the URL prefix it was rendered for) it
    shows."""

    def __init__(self, capacity: int = CAPACITY):
        self.capacity = capacity
        self._entries: OrderedDict[int, tuple[Any, bytes]] = OrderedDict()
        self._lock = threading.Lock()  # gunicorn's threads share it

    def get(self, job_id: int, version: Any) -> bytes | None:
        return self.get_many([(job_id, version)])[0]

    def get_many(self, wanted: list[tuple[int, Any]]) -> list[bytes | None]:
        """The JSON of each (job id, version) kept, None where none is kept for that version."""
        found: list[bytes | None] = []
        with self._lock:
            entries = self._entries
            for job_id, version in wanted:
                entry = entries.get(job_id)
                if entry is None or entry[0] != version:
                    found.append(None)
                else:
                    entries.move_to_end(job_id)
                    found.append(entry[1])
        return found

    def put(self, job_id: int, version: Any, body: bytes) -> None:
        with self._lock:
            self._entries[job_id] = (version, body)
            self._entries.move_to_end(job_id)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

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
