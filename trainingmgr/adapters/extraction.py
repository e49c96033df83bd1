"""The embedded data extractor: reads a CSV or Parquet file named by the feature group, or an InfluxDB 2 measurement
(InfluxSource, through influx_source.py), keeps the features, applies the job's query_filter and writes the dataset
as `<dataset_dir>/<featurepath>.csv` for the pipeline to read.

It runs inside a worker thread and does the whole extraction in `start`. Files are read in chunks of `chunk_rows`
rows, only the needed columns, so memory stays bounded whatever the size of the source. Source files may only come
from the configured source folders (TM_FILE_SOURCE_DIRS): a feature group must not be a way to read the server's
other files. An InfluxDB measurement is streamed the same way (only the needed columns, in chunks); each call to the
server is bounded by `influx_timeout` seconds.
"""
from __future__ import annotations

import abc
import dataclasses
import logging
import os
import re
import stat
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from .base import AdapterError, DataExtractor, ExtractionRequest, ExtractionStatus
from .outbound import OutboundPolicy
from .query_filter import CompiledFilter, FilterError, compile_filter, parse_filter

if TYPE_CHECKING:
    import pandas as pd

# pandas and pyarrow (about 100 MB of a process) are imported by the first extraction, not with this module: a step
# runner that has not extracted yet stays light.

log = logging.getLogger(__name__)

FEATUREPATH_PATTERN = re.compile(r"[A-Za-z0-9_]{1,200}")


def _bad(message: str) -> AdapterError:
    return AdapterError(message, retryable=False)


def check_featurepath(featurepath: str) -> None:
    # The featurepath becomes a file name: letters, digits and '_' only, so it can never walk out of dataset_dir.
    if not isinstance(featurepath, str) or not FEATUREPATH_PATTERN.fullmatch(featurepath):
        raise _bad(f"invalid featurepath {featurepath!r}: letters, digits and '_' only")


def _discard(path: Path) -> None:
    """Remove a temporary file if it is there; never mask the error that brought us here."""
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


class _TableReader(abc.ABC):
    """How one file format gives its column names and its rows in chunks."""

    @abc.abstractmethod
    def columns(self, path: Path) -> list[str]: ...

    @abc.abstractmethod
    def chunks(self, path: Path, columns: list[str], chunk_rows: int) -> Iterator[pd.DataFrame]: ...


class _CsvReader(_TableReader):
    # Types are inferred per chunk; a column whose values change kind mid-file (numbers, then text) can make a
    # filter fail on a later chunk, with a clear FilterError, rather than silently compare text with numbers.
    def columns(self, path: Path) -> list[str]:
        import pandas as pd

        return [str(c) for c in pd.read_csv(path, nrows=0).columns]

    def chunks(self, path: Path, columns: list[str], chunk_rows: int) -> Iterator[pd.DataFrame]:
        import pandas as pd

        with pd.read_csv(path, usecols=columns, chunksize=chunk_rows) as reader:
            yield from reader


class _ParquetReader(_TableReader):
    def columns(self, path: Path) -> list[str]:
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)

    def chunks(self, path: Path, columns: list[str], chunk_rows: int) -> Iterator[pd.DataFrame]:
        import pyarrow.parquet as pq

        with pq.ParquetFile(path) as parquet:
            for batch in parquet.iter_batches(batch_size=chunk_rows, columns=columns):
                yield batch.to_pandas()


_READERS: dict[str, type[_TableReader]] = {"CsvSource": _CsvReader, "ParquetSource": _ParquetReader}
INFLUX_SOURCE = "InfluxSource"


def _read_error(measurement: str, error: Exception) -> AdapterError:
    """Sort a reading failure into bad input (the file is wrong: do not retry) or a transient I/O failure."""
    import pandas as pd
    import pyarrow as pa

    if isinstance(error, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):
        return _bad(f"source file {measurement!r} not found")
    if isinstance(error, PermissionError):
        return _bad(f"source file {measurement!r} cannot be read (permission denied)")
    if isinstance(error, pd.errors.EmptyDataError):
        return _bad(f"source file {measurement!r} is empty")
    if isinstance(error, UnicodeDecodeError):
        return _bad(f"source file {measurement!r} is not UTF-8 text")
    if isinstance(error, (pd.errors.ParserError, pa.ArrowException, ValueError)):
        return _bad(f"source file {measurement!r} cannot be read: {str(error)[:300]}")
    if isinstance(error, OSError):
        return AdapterError(f"reading source file {measurement!r} failed: {error.strerror or error}", retryable=True)
    return _bad(f"source file {measurement!r} cannot be read: {error.__class__.__name__}")


class EmbeddedExtractor(DataExtractor):
    """With a `fork_server` (the pipeline engine's warm launcher), each extraction runs in a process forked from
    it, where pandas and pyarrow are loaded already, unless this process carries them itself: the step runner
    stays light. Without one, or when it cannot answer, the extraction runs here."""

    def __init__(
        self,
        source_roots: Sequence[Path],
        dataset_dir: Path,
        *,
        outbound: OutboundPolicy,
        chunk_rows: int = 100_000,
        influx_timeout: float = 30.0,
        fork_server: Any = None,
        answer_timeout: float = 3600.0,
    ):
        self.source_roots = [Path(r) for r in source_roots]
        self.dataset_dir = Path(dataset_dir)
        self.chunk_rows = max(1, chunk_rows)
        self.influx_timeout = float(influx_timeout)
        self.outbound = outbound
        self.fork_server = fork_server
        self.answer_timeout = answer_timeout

    # ------------------------------------------------------------------ DataExtractor
    def start(self, request: ExtractionRequest) -> ExtractionStatus:
        check_featurepath(request.featurepath)
        if self.fork_server is not None and not _loaded_here():
            answer = self.fork_server.extract(self._job(request), self.answer_timeout)
            if answer is not None:
                return _from_answer(answer)
        return self._extract(request)

    def _job(self, request: ExtractionRequest) -> dict[str, Any]:
        """What a forked process needs to do this extraction (run_extraction_job), as JSON."""
        return {"extractor": {"source_roots": [str(r) for r in self.source_roots],
                              "dataset_dir": str(self.dataset_dir), "chunk_rows": self.chunk_rows,
                              "influx_timeout": self.influx_timeout,
                              "outbound": [self.outbound.allow, self.outbound.deny]},
                "request": dataclasses.asdict(request)}

    def _extract(self, request: ExtractionRequest) -> ExtractionStatus:
        if request.datalake_source == INFLUX_SOURCE:
            return self._start_influx(request, self._features(request))
        reader = self._reader(request.datalake_source)
        features = self._features(request)
        measurement = str(request.source.get("measurement") or "").strip()
        path = self.resolve_source(measurement)

        try:
            available = reader.columns(path)
        except Exception as e:  # sorted into retryable or not below; anything else is a bad file
            raise _read_error(measurement, e) from e
        missing = [f for f in features if f not in set(available)]
        if missing:
            raise _bad(f"feature(s) not in {measurement!r}: {', '.join(missing)}")
        try:
            row_filter = compile_filter(request.query_filter, set(available))
        except FilterError as e:
            raise _bad(f"query_filter: {e}") from e
        # The filter may test columns that are not features: read those too, write only the features.
        needed = features + sorted(c for c in row_filter.columns if c not in features)

        target = self.dataset_path(request.featurepath)
        chunks = self._source_chunks(reader, path, measurement, needed)
        return self._finish(request, measurement, self._write(chunks, features, row_filter, target), row_filter, target)

    def _start_influx(self, request: ExtractionRequest, features: list[str]) -> ExtractionStatus:
        """Stream the measurement's needed columns from InfluxDB, filter and write them like a file source."""
        measurement = str(request.source.get("measurement") or "").strip()
        try:
            row_filter = parse_filter(request.query_filter)
        except FilterError as e:
            raise _bad(f"query_filter: {e}") from e
        needed = features + sorted(c for c in row_filter.columns if c not in features)
        target = self.dataset_path(request.featurepath)
        chunks = self._influx_chunks(request, measurement, needed, features)
        return self._finish(request, measurement, self._write(chunks, features, row_filter, target), row_filter, target)

    def _influx_chunks(
        self, request: ExtractionRequest, measurement: str, needed: list[str], features: list[str]
    ) -> Iterator[pd.DataFrame]:
        try:
            from .influx_source import MissingColumns, read_influx  # influxdb-client is loaded only when used
        except ImportError as e:
            raise _bad(f"InfluxSource needs the influxdb-client package ({e.name or e})") from e

        try:
            yield from read_influx(request.source, needed, timeout=self.influx_timeout, outbound=self.outbound,
                                   chunk_rows=self.chunk_rows)
        except MissingColumns as e:  # raised after the last chunk, before the dataset is moved in place
            absent = [c for c in e.missing if c in features]
            if absent:
                raise _bad(f"feature(s) not in {measurement!r}: {', '.join(absent)}") from e
            names = ", ".join(repr(c) for c in e.missing)
            raise _bad(f"query_filter: unknown column{'s' if len(e.missing) > 1 else ''} {names} "
                       f"(not in measurement {measurement!r})") from e

    def _finish(
        self, request: ExtractionRequest, measurement: str, rows: int, row_filter: CompiledFilter, target: Path
    ) -> ExtractionStatus:
        if rows == 0:
            raise _bad("the filter left no rows" if row_filter.tree is not None else f"{measurement!r} has no rows")
        log.info(
            "dataset written", extra={"trainingjob_id": request.trainingjob_id, "rows": rows, "dataset": target.name}
        )
        return ExtractionStatus("COMPLETED", dataset_uri=str(target), rows=rows)

    def status(self, request: ExtractionRequest) -> ExtractionStatus:
        check_featurepath(request.featurepath)
        target = self.dataset_path(request.featurepath)
        if target.is_file():
            return ExtractionStatus("COMPLETED", dataset_uri=str(target))
        return ExtractionStatus("FAILED", error="no dataset")

    def remove(self, featurepath: str) -> None:
        check_featurepath(featurepath)
        self.dataset_path(featurepath).unlink(missing_ok=True)
        # A worker that died mid-write leaves its temporary file behind: clear those too.
        for leftover in self.dataset_dir.glob(f".{featurepath}.*.tmp"):
            _discard(leftover)

    # ------------------------------------------------------------------ helpers
    def dataset_path(self, featurepath: str) -> Path:
        return Path(os.path.abspath(self.dataset_dir / f"{featurepath}.csv"))

    @staticmethod
    def _features(request: ExtractionRequest) -> list[str]:
        features = list(dict.fromkeys(f.strip() for f in request.feature_list if f and f.strip()))
        if not features:
            raise _bad("the feature list is empty")
        return features

    def _reader(self, datalake_source: str) -> _TableReader:
        reader = _READERS.get(datalake_source)
        if reader is None:
            known = ", ".join([INFLUX_SOURCE, *_READERS])
            raise _bad(f"unknown datalake source {datalake_source!r}; expected one of {known}")
        return reader()

    def resolve_source(self, measurement: str) -> Path:
        """The real path of the file `measurement` names, inside one of the source roots, or AdapterError.

        Relative names are looked up in each root in turn (first hit wins); absolute names must lie inside a root.
        '..' is refused outright, and the resolved path (symlinks followed) must still be inside the same root.
        """
        if not measurement:
            raise _bad("the feature group's measurement (the source file) is empty")
        if "\x00" in measurement:
            raise _bad("the source file name contains a NUL character")
        name = Path(measurement)
        if ".." in name.parts:
            raise _bad(f"source file {measurement!r} must not contain '..'")
        for root in self.source_roots:
            real_root = root.resolve()
            if name.is_absolute():
                if name.is_relative_to(root):
                    candidate = name
                elif name.is_relative_to(real_root):
                    candidate = name
                else:
                    continue
            else:
                candidate = root / name
            if not os.path.lexists(candidate):
                continue
            real = candidate.resolve()
            if not real.is_relative_to(real_root):
                raise _bad(f"source file {measurement!r} leads outside the source folders")
            try:
                mode = os.stat(real).st_mode
            except FileNotFoundError:  # a dangling symlink
                continue
            except OSError as e:
                raise AdapterError(f"source file {measurement!r}: {e.strerror}", retryable=True) from e
            if not stat.S_ISREG(mode):
                raise _bad(f"source file {measurement!r} is not a regular file")
            return real
        if name.is_absolute():
            raise _bad(f"source file {measurement!r} is not inside the source folders (TM_FILE_SOURCE_DIRS)")
        raise _bad(f"source file {measurement!r} not found in the source folders (TM_FILE_SOURCE_DIRS)")

    def _source_chunks(
        self, reader: _TableReader, path: Path, measurement: str, needed: list[str]
    ) -> Iterator[pd.DataFrame]:
        """The reader's chunks, with its failures already sorted into AdapterErrors (bad file or transient I/O)."""
        chunks = reader.chunks(path, needed, self.chunk_rows)
        try:
            while True:
                try:
                    chunk = next(chunks)
                except StopIteration:
                    return
                except Exception as e:  # parser, Arrow and OS errors of the source: see _read_error
                    raise _read_error(measurement, e) from e
                yield chunk
        finally:
            chunks.close()  # type: ignore[attr-defined]

    def _write(
        self,
        chunks: Iterator[pd.DataFrame],
        features: list[str],
        row_filter: CompiledFilter,
        target: Path,
    ) -> int:
        """Filter chunk by chunk into a temporary file, then move it in place: readers never see half a dataset.

        `chunks` gives the source's rows, its failures already sorted into AdapterErrors; an error it raises after
        its last chunk still prevents the move.
        """
        tmp = target.parent / f".{target.stem}.{uuid.uuid4().hex}.tmp"
        rows = 0
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "w", encoding="utf-8", newline="") as out:
                header = True
                for chunk in chunks:
                    try:
                        kept = chunk.loc[row_filter(chunk), features]
                    except FilterError as e:  # a type mismatch only the data could reveal
                        raise _bad(f"query_filter: {e}") from e
                    # The header goes out exactly once, even when the first chunks keep nothing.
                    if header or len(kept):
                        kept.to_csv(out, header=header, index=False)
                        header = False
                    rows += len(kept)
                if header:
                    import pandas as pd

                    pd.DataFrame(columns=features).to_csv(out, index=False)
                out.flush()
                os.fsync(out.fileno())
            if rows:
                os.replace(tmp, target)
        except OSError as e:  # the source's errors arrive as AdapterError: this is our output (disk full ...)
            raise AdapterError(f"writing the dataset failed: {e.strerror or e}", retryable=True) from e
        finally:
            chunks.close()  # type: ignore[attr-defined]  # a generator: its source is released now
            _discard(tmp)
        return rows


def _loaded_here() -> bool:
    """Whether this process carries pandas already (then nothing is saved by extracting elsewhere)."""
    return "pandas" in sys.modules


# ------------------------------------------------------------------ in a forked process (run_launcher)
class _KeptLog(logging.Handler):
    """The log lines of a forked extraction, sent back with its outcome: they belong in the service's log, which
    the launcher's process does not write."""

    _OWN = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        fields = {k: v for k, v in vars(record).items()
                  if k not in self._OWN and isinstance(v, (str, int, float, bool, type(None)))}
        if record.exc_info:
            fields["error"] = logging.Formatter().formatException(record.exc_info)[-2000:]
        self.lines.append({"level": record.levelno, "logger": record.name, "message": record.getMessage(),
                           "fields": fields})


def replay_log(lines: list[dict[str, Any]]) -> None:
    """The log lines a forked extraction sent, written to this process's log as if they were its own."""
    for line in lines if isinstance(lines, list) else []:
        try:
            logging.getLogger(str(line["logger"])).log(int(line["level"]), "%s", str(line["message"]),
                                                       extra=dict(line.get("fields") or {}))
        except (KeyError, TypeError, ValueError):  # not a line we sent: dropped
            continue


def run_extraction_job(job: dict[str, Any]) -> dict[str, Any]:
    """Do the extraction EmbeddedExtractor._job describes; its outcome as JSON: {"extracted": status} or
    {"failed": {message, retryable, unreachable}}, with its log lines ("log")."""
    kept = _KeptLog()
    ours = logging.getLogger("trainingmgr")
    ours.addHandler(kept)
    ours.setLevel(logging.INFO)
    ours.propagate = False  # a forked process of its own: nothing of it goes anywhere but back with the answer
    answer = _extraction_outcome(job)
    answer["log"] = kept.lines
    return answer


def _extraction_outcome(job: dict[str, Any]) -> dict[str, Any]:
    try:
        settings = job["extractor"]
        allow, deny = settings["outbound"]
        extractor = EmbeddedExtractor(settings["source_roots"], Path(settings["dataset_dir"]),
                                      outbound=OutboundPolicy(allow, deny), chunk_rows=int(settings["chunk_rows"]),
                                      influx_timeout=float(settings["influx_timeout"]))
        status = extractor._extract(ExtractionRequest(**job["request"]))
    except AdapterError as e:
        return {"failed": {"message": str(e), "retryable": e.retryable, "unreachable": e.unreachable}}
    except Exception as e:  # noqa: BLE001 - as in process, where the step comes back later: tried again
        log.exception("extraction failed")
        return {"failed": {"message": f"{e.__class__.__name__}: {e}", "retryable": True, "unreachable": False}}
    return {"extracted": dataclasses.asdict(status)}


def warm_up() -> None:
    """Run a tiny CSV extraction here, in a scratch folder. The warm launcher does it once before it forks: what
    pandas loads or builds on its first use (parsers, writers, kernels) is then in every forked extraction
    already, instead of costing each one its first call again (about 30 ms of a 2,000-row CSV). CSV only: reading
    Parquet would start pyarrow's thread pools here, and the launcher forks only while it has a single thread."""
    import tempfile

    import pandas as pd

    with tempfile.TemporaryDirectory(prefix="tm-warm-up-") as folder:
        root = Path(folder)
        pd.DataFrame({"a": [1.0, 2.0, 3.0], "b": [4, 5, 6], "c": ["x", "y", "z"]}).to_csv(root / "warm.csv",
                                                                                          index=False)
        extractor = EmbeddedExtractor([root], root / "out", outbound=OutboundPolicy())
        logging.disable(logging.INFO)  # its "dataset written" line says nothing of interest
        try:
            extractor._extract(ExtractionRequest(
                trainingjob_id=0, featurepath="warm_0", datalake_source="CsvSource", feature_list=["a", "b"],
                query_filter="b > 4 and c != 'q'", source={"measurement": "warm.csv"}))
        finally:
            logging.disable(logging.NOTSET)


def _from_answer(answer: dict[str, Any]) -> ExtractionStatus:
    """The outcome a forked extraction sent (run_extraction_job), as start() gives it; its log lines written here."""
    replay_log(answer.get("log") or [])
    if "extracted" in answer:
        return ExtractionStatus(**answer["extracted"])
    failed = answer.get("failed") or {}
    raise AdapterError(str(failed.get("message") or "the extraction failed without a reason"),
                       retryable=bool(failed.get("retryable")), unreachable=bool(failed.get("unreachable")))
