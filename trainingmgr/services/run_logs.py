"""A job's pipeline run output: read from the engine while the run lasts, kept with the job once it ends (the
engine's copy goes with the run's files), and served from there for as long as the job exists."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session

from ..adapters.base import AdapterError
from ..models import JobLog, TrainingJob
from ..models import lifecycle as lc
from ..models.base import utcnow

if TYPE_CHECKING:
    from ..adapters.base import PipelineEngine

log = logging.getLogger(__name__)

LINE_SEARCH_BYTES = 4096  # how far a cut log looks for the start of its next line


@dataclass(frozen=True)
class LogPiece:
    data: bytes
    offset: int  # where the next read starts: the bytes of the run's output read so far
    ended: bool  # nothing more will come: the job has ended and this is the last of its output


def run_log_to_keep(engine: "PipelineEngine", job: TrainingJob, max_bytes: int) -> JobLog | None:
    """The end of the job's run output, as a row to add where the run ends (before its files are removed).
    None when there is no run or the engine cannot say (the job then keeps no log; the reason is logged).

    It asks the engine and writes nothing: call it before taking locks, then add the row in the transaction that
    ends the job."""
    if not job.run_id:
        return None
    try:
        size = engine.run_log(job.run_id, 0, 0).size
        start = max(0, size - max_bytes)
        piece = engine.run_log(job.run_id, start, max_bytes)
    except AdapterError as e:  # a run that never started has nothing to keep; an unreachable engine is worth a word
        log.log(logging.WARNING if e.retryable else logging.INFO, "run output not kept",
                extra={"trainingjob_id": job.id, "run_id": job.run_id, "error": str(e)[:300]})
        return None
    content = piece.data
    if start > 0:  # cut in the middle of a line: keep from the next whole one
        newline = content.find(b"\n", 0, LINE_SEARCH_BYTES)
        if newline >= 0:
            content = content[newline + 1:]
    return JobLog(job_id=job.id, size=start + len(piece.data), content=content, kept_at=utcnow())


def read_run_log(session: Session, engine: "PipelineEngine", job: TrainingJob, offset: int | None,
                 limit: int) -> LogPiece:
    """At most `limit` bytes of the job's run output from `offset` (None: its last `limit` bytes).

    Raises AdapterError (retryable) when a running run's engine cannot be reached."""
    kept = session.get(JobLog, job.id)
    if kept is not None:
        return _from_kept(kept, offset, limit)
    ended = job.status in lc.ENDED
    if not job.run_id:
        return LogPiece(b"", offset or 0, ended)
    try:
        if offset is None:
            offset = max(0, engine.run_log(job.run_id, 0, 0).size - limit)
        piece = engine.run_log(job.run_id, offset, limit)
    except AdapterError as e:
        if e.retryable:
            raise
        # The engine does not know the run: not started yet, or its files went without a log kept (an older
        # job, or the engine could not be read at its end).
        return LogPiece(b"", offset or 0, ended)
    # An ended job whose run the engine still has: its log is being kept, and the next read finds it there.
    return LogPiece(piece.data, offset + len(piece.data), False)


def _from_kept(kept: JobLog, offset: int | None, limit: int) -> LogPiece:
    start = kept.size - len(kept.content)  # the bytes of the run's output before the kept part
    if offset is None:  # the last `limit` bytes, or all that was kept: then what was not is said to be missing
        offset = 0 if limit >= len(kept.content) else kept.size - limit
    note = b""
    if offset < start:
        note = f"[{start - offset} bytes of the run's output not kept here (TM_RUN_LOG_MAX_BYTES)]\n".encode()
        offset = start
    data = kept.content[offset - start:offset - start + limit]
    next_offset = offset + len(data)
    return LogPiece(note + data, next_offset, next_offset >= kept.size)
