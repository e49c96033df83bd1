"""The application factory: the Flask app of one process, its database engine and its Container."""
from __future__ import annotations

import sqlite3
import threading
import time
from typing import Any, Mapping

from flask import Flask, g, has_app_context, has_request_context, request
from sqlalchemy import event

from . import SWAGGER_FILE
from .config import Settings
from .extensions import READ_ONLY_FLAG
from .json_codec import FastJSONProvider, load_json


SQLITE_BUSY_TIMEOUT = 30.0  # seconds a write waits for another's lock before "database is locked"


def _engine_options(settings: Settings) -> dict[str, Any]:
    if settings.is_sqlite:
        # One connection per thread; wait for a busy database instead of failing at once; this process's writers
        # take turns (SerialisedSQLiteConnection: one write lock per engine, hence a class per app).
        factory = type("SerialisedSQLiteConnection", (SerialisedSQLiteConnection,), {"writers": WriterTurns()})
        return {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT, "check_same_thread": False, "factory": factory},
                "json_deserializer": load_json}
    options: dict[str, Any] = {
        "json_deserializer": load_json,  # the JSON columns of a job list: a sixth of its CPU with json.loads
        # No pre-ping on every check-out (a second round trip per request): only a connection idle for a while is
        # pinged (_postgres_checkout); a busy one found cut is handled when it happens (TrainingManagerApp tries a
        # read once more; the workers take their next look). LIFO keeps the busy connections busy.
        "pool_use_lifo": True,
        "pool_size": settings.db_pool_size,
        "max_overflow": settings.db_max_overflow,
        "pool_timeout": settings.db_pool_timeout,
    }
    from sqlalchemy.engine import make_url

    url = make_url(settings.sqlalchemy_url)
    if url.get_driver_name() in ("psycopg2", "psycopg") and "connect_timeout" not in url.query:
        # A database host that does not answer at all (no refusal) fails a connection attempt after this many
        # seconds, so requests answer 503 then instead of hanging for the system's TCP timeout (minutes).
        options["connect_args"] = {"connect_timeout": max(1, settings.db_pool_timeout)}
    return options


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # Let SQLAlchemy, not pysqlite, open transactions (so SAVEPOINT works), enforce foreign keys and use WAL
    # so readers do not block the writer.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


class WriterTurns:
    """The write transactions of one process's threads on one SQLite database, one at a time.

    SQLite lets one writer in and makes the others poll with growing sleeps (1, 2, 5, 10 ... 100 ms): a thread
    that waits behind a few short writes loses tens of milliseconds after the lock is free. Threads of one process
    queue here instead and go on the moment the writer before them ends; SQLite's own lock still orders them with
    other processes. A thread that holds a turn through one connection and begins a write on another does not wait
    for itself: SQLite answers that as it did before."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.holder: int | None = None  # the thread id holding the turn

    def take(self) -> bool | None:
        """True: the turn is this transaction's. None: this thread holds it already (through another connection),
        go on without. False: not had within the busy timeout."""
        me = threading.get_ident()
        if self.holder == me:
            return None
        if not self._lock.acquire(timeout=SQLITE_BUSY_TIMEOUT):
            return False
        self.holder = me
        return True

    def give_back(self) -> None:
        self.holder = None
        self._lock.release()


class SerialisedSQLiteConnection(sqlite3.Connection):
    """An SQLite connection whose write transactions take their turn in the process's WriterTurns; the turn ends
    with the transaction (commit, rollback, close)."""

    writers: WriterTurns  # set on the subclass made per engine (_engine_options)
    holds_turn = False

    def end_turn(self) -> None:
        if self.holds_turn:
            self.holds_turn = False
            self.writers.give_back()

    def commit(self) -> None:
        try:
            super().commit()
        finally:
            self.end_turn()

    def rollback(self) -> None:
        try:
            super().rollback()
        finally:
            self.end_turn()

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.end_turn()


READ_ONLY_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def _read_only() -> bool:
    """Serving GET, HEAD or OPTIONS (these handlers only read: that is the rule this relies on), or inside
    extensions.read_only_transactions()."""
    if has_request_context() and request.method in READ_ONLY_METHODS:
        return True
    return has_app_context() and g.get(READ_ONLY_FLAG, False)


def _sqlite_begin(conn: Any) -> None:
    # IMMEDIATE: take the write lock at the start. A deferred transaction that reads and then writes fails at
    # once with "database is locked" when another writer committed in between; waiting for the lock does not.
    # A read-only transaction never writes: its deferred BEGIN neither waits for the writer nor blocks it (WAL).
    if _read_only():
        conn.exec_driver_sql("BEGIN")
        return
    dbapi_connection = conn.connection.dbapi_connection
    taken = dbapi_connection.writers.take()
    dbapi_connection.holds_turn = bool(taken)
    # A turn not had within the busy timeout means a writer of this process holds the lock that long: SQLite
    # would keep this one waiting as long again, so it answers "database is locked" now instead (no wait).
    out_of_time = taken is False
    try:
        if out_of_time:
            dbapi_connection.execute("PRAGMA busy_timeout = 0")
        conn.exec_driver_sql("BEGIN IMMEDIATE")
    except BaseException:
        dbapi_connection.end_turn()
        raise
    finally:
        if out_of_time:
            dbapi_connection.execute(f"PRAGMA busy_timeout = {int(SQLITE_BUSY_TIMEOUT * 1000)}")


# A pooled connection unused for this long is pinged when checked out: a restart or a proxy's idle timeout cuts
# connections while they wait, and a write is not tried twice. Busy connections are not pinged (no round trip).
PING_AFTER_IDLE_SECONDS = 1.0


def _postgres_checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
    checked_in_at = record.info.get("checked_in_at")
    if checked_in_at is not None and time.monotonic() - checked_in_at >= PING_AFTER_IDLE_SECONDS:
        _ping(dbapi_connection)
    # A read-only HTTP request (no GET handler writes) runs its statements in autocommit: under READ COMMITTED each
    # statement has its own snapshot anyway, so answers are the same, and the BEGIN and ROLLBACK round trips (two
    # of a one-row GET's four) go away. psycopg2 sets this client-side, without a round trip. Workers
    # and writing requests keep their transactions.
    if _read_only():
        dbapi_connection.autocommit = True


def _postgres_checkin(dbapi_connection: Any, record: Any) -> None:
    record.info["checked_in_at"] = time.monotonic()
    if dbapi_connection is not None and not dbapi_connection.closed and dbapi_connection.autocommit:
        dbapi_connection.autocommit = False


def _ping(dbapi_connection: Any) -> None:
    """SELECT 1 in autocommit; a connection that fails it is replaced (DisconnectionError: the pool retries)."""
    import psycopg2
    from sqlalchemy.exc import DisconnectionError

    autocommit = dbapi_connection.autocommit
    try:
        dbapi_connection.autocommit = True
        with dbapi_connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        dbapi_connection.autocommit = autocommit
    except (psycopg2.OperationalError, psycopg2.InterfaceError) as e:
        raise DisconnectionError(str(e)) from e


class TrainingManagerApp(Flask):
    json_provider_class = FastJSONProvider

    def dispatch_request(self) -> Any:
        """A read whose pooled connection turns out to be cut (the database restarted, a proxy or
        pg_terminate_backend ended it) is tried once more: SQLAlchemy has invalidated the pool's connections of
        before the cut, so the second try runs on a fresh one. A write is not repeated: its error is the answer."""
        from sqlalchemy.exc import DBAPIError

        from .extensions import db

        try:
            return super().dispatch_request()
        except DBAPIError as e:
            if not (e.connection_invalidated and _read_only()):
                raise
            db.session.rollback()
            self.logger.info("database connection was cut; the read is tried once more on a new one")
            return super().dispatch_request()


def create_app(config: Settings | Mapping[str, Any] | None = None) -> Flask:
    """Build the application. `config` is a Settings, a mapping of Settings overrides, or None (environment)."""
    from . import models  # noqa: F401  (registers the tables)
    from .api import register_blueprints
    from .api.cors import install_cors
    from .api.metrics import install_metrics
    from .container import Container
    from .errors import register_error_handlers
    from .extensions import db
    from .logs import configure_logging, install_request_logging

    if isinstance(config, Settings):
        settings = config
    else:
        settings = Settings.from_env(**dict(config or {}))
    configure_logging(settings.log_level)

    app = TrainingManagerApp(__name__, static_folder=None)  # no static files: Swagger UI's come from the docs blueprint
    app.config.update(
        SQLALCHEMY_DATABASE_URI=settings.sqlalchemy_url,
        SQLALCHEMY_ENGINE_OPTIONS=_engine_options(settings),
        MAX_CONTENT_LENGTH=settings.max_body_bytes,
        TM_SETTINGS=settings,
        TM_SWAGGER_FILE=SWAGGER_FILE,
    )
    app.json.sort_keys = False
    if settings.is_sqlite:
        settings.data_path.mkdir(parents=True, exist_ok=True)

    db.init_app(app)
    if settings.is_sqlite:
        with app.app_context():
            event.listen(db.engine, "connect", _sqlite_pragmas)
            event.listen(db.engine, "begin", _sqlite_begin)
    else:
        with app.app_context():
            event.listen(db.engine, "checkout", _postgres_checkout)
            event.listen(db.engine, "checkin", _postgres_checkin)

    app.extensions["trainingmgr"] = Container(settings)
    install_request_logging(app)
    install_cors(app, settings.cors_origins)
    register_error_handlers(app)
    register_blueprints(app)
    install_metrics(app)
    return app
