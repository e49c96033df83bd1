"""How requests use the database. Read-only requests (GET) run in autocommit on PostgreSQL (no BEGIN/ROLLBACK
round trips) and in a deferred transaction on SQLite (they neither wait for the writer nor block it); writing
requests and work outside a request keep their transactions (BEGIN IMMEDIATE on SQLite), and a connection a read
used goes back to the pool ready for a transaction. Real databases, through the HTTP layer.
"""
import sqlite3

import pytest
from flask import has_request_context, request
from sqlalchemy import event, text, update

from tests.factories import FG_V1 as FG
from tests.factories import create_feature_group, feature_group_body
from trainingmgr.extensions import db
from trainingmgr.models import FeatureGroup


@pytest.fixture
def statements(app):
    """Every SQL statement as (HTTP method or None, DBAPI connection id, autocommit?, statement)."""
    seen: list[tuple[str | None, int, bool, str]] = []

    def record(conn, _cursor, statement, *_):
        dbapi = conn.connection.dbapi_connection
        autocommit = getattr(dbapi, "autocommit", None)  # psycopg2; sqlite3's is not ours to read here
        seen.append((request.method if has_request_context() else None, id(dbapi), autocommit, statement))

    with app.app_context():
        engine = db.engine
    event.listen(engine, "before_cursor_execute", record)
    yield seen
    event.remove(engine, "before_cursor_execute", record)


def exercise(app, client):
    create_feature_group(client, "cell_kpis")
    for i in range(3):
        assert client.get(f"{FG}/cell_kpis").status_code == 200
        body = feature_group_body("cell_kpis", measurement=f"round_{i}")
        assert client.put(f"{FG}/cell_kpis", json=body).status_code == 200
    assert client.get(FG).status_code == 200
    with app.app_context():  # a worker's or the CLI's session: not a request
        db.session.execute(text("SELECT 1"))
        db.session.rollback()


def test_reads_do_not_write(app, client, statements):
    exercise(app, client)
    reads = [sql for method, _, _, sql in statements if method == "GET"]
    assert reads and not [sql for sql in reads if sql.lstrip().upper().startswith(("INSERT", "UPDATE", "DELETE"))]


def test_reads_autocommit_writes_in_transactions(app, client, statements, pg_only):
    exercise(app, client)
    reads = [s for s in statements if s[0] == "GET"]
    writes = [s for s in statements if s[0] in ("POST", "PUT")]
    outside = [s for s in statements if s[0] is None]
    assert len(reads) >= 4 and len(writes) >= 4 and outside
    assert all(autocommit for _, _, autocommit, _ in reads), reads
    assert not any(autocommit for _, _, autocommit, _ in writes), writes
    assert not any(autocommit for _, _, autocommit, _ in outside), outside
    # One thread, one pooled connection: the PUTs ran in a transaction on the very connection the GETs had used.
    assert {conn for _, conn, _, _ in reads} & {conn for _, conn, _, _ in writes}


def test_a_write_after_reads_is_still_a_transaction(app, client, statements, pg_only):
    """A connection that served a read goes back to the pool out of autocommit: a write on it that rolls back
    leaves nothing behind."""
    create_feature_group(client, "cell_kpis", measurement="before")
    assert client.get(f"{FG}/cell_kpis").status_code == 200
    with app.test_request_context(f"{FG}/cell_kpis", method="PUT"):
        db.session.execute(
            update(FeatureGroup).where(FeatureGroup.name == "cell_kpis").values(measurement="half_done")
        )
        db.session.rollback()  # as when the rest of a PUT fails
        db.session.remove()
    assert client.get(f"{FG}/cell_kpis").get_json()["featuregroup"]["measurement"] == "before"
    put_conn = next(conn for method, conn, _, sql in statements if method == "PUT" and sql.startswith("UPDATE"))
    assert put_conn in {conn for method, conn, _, _ in statements if method == "GET"}, "the GET's connection"


def test_sqlite_reads_begin_deferred_writes_immediate(app, client, statements, sqlite_only):
    exercise(app, client)
    begins = [(method, sql) for method, _, _, sql in statements if sql.startswith("BEGIN")]
    assert {sql for method, sql in begins if method == "GET"} == {"BEGIN"}
    assert {sql for method, sql in begins if method != "GET"} == {"BEGIN IMMEDIATE"}


def test_sqlite_reads_answer_while_a_writer_holds_the_lock(app, client, settings, sqlite_only):
    create_feature_group(client, "cell_kpis")
    writer = sqlite3.connect(settings.sqlalchemy_url.removeprefix("sqlite:///"), isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")  # a worker step in the middle of its transaction
        writer.execute("UPDATE feature_groups SET measurement = 'uncommitted'")
        got = client.get(f"{FG}/cell_kpis")
        assert got.status_code == 200
        assert got.get_json()["featuregroup"]["measurement"] == "cell_kpis"  # the last committed state
    finally:
        writer.execute("ROLLBACK")
        writer.close()
