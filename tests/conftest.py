"""Fixtures: a fresh app per test on a real, migrated database — SQLite and PostgreSQL.

Every test that takes `app` or `client` runs once per backend (ids `[sqlite]` and `[postgresql]`). The
PostgreSQL server is the one at TM_TEST_POSTGRES_URL (default: postgres on 127.0.0.1:5432, trust auth); each test
session gets a database of its own, dropped at the end. When that server is down the PostgreSQL runs are skipped,
except under CI=true (or TM_TEST_REQUIRE_POSTGRES=1), where that is an error.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Iterator

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from trainingmgr import create_app
from trainingmgr.config import Settings
from trainingmgr.extensions import db
from trainingmgr.models import Base
from trainingmgr.schema import upgrade

POSTGRES_ADMIN_URL = os.environ.get(
    "TM_TEST_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
)
REQUIRE_POSTGRES = os.environ.get("CI", "").lower() == "true" or os.environ.get("TM_TEST_REQUIRE_POSTGRES") == "1"
TEST_SECRET_KEY = "test-secret-key"


def _migrate(settings: Settings) -> None:
    app = create_app(settings)
    upgrade(app)
    with app.app_context():
        db.engine.dispose()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as e:  # the server is down or refuses us
        admin.dispose()
        message = f"PostgreSQL at {POSTGRES_ADMIN_URL} is not reachable: {e.__class__.__name__}: {e}"
        if REQUIRE_POSTGRES:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    name = f"tm_test_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    yield url
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tm")


@pytest.fixture(scope="session")
def migrated_urls(session_dir: Path) -> dict[str, str]:
    """Backends already migrated this session, by name."""
    return {}


@pytest.fixture(params=["sqlite", "postgresql"])
def settings(
    request: pytest.FixtureRequest, session_dir: Path, migrated_urls: dict[str, str], tmp_path: Path
) -> Settings:
    backend = request.param
    if backend not in migrated_urls:
        if backend == "sqlite":
            url = f"sqlite:///{session_dir / 'test.db'}"
        else:
            url = request.getfixturevalue("postgres_url")
        _migrate(Settings(data_dir=str(session_dir), database_url=url, secret_key=TEST_SECRET_KEY))
        migrated_urls[backend] = url
    return Settings(
        data_dir=str(tmp_path / "data"),  # runs, datasets and models of one test only
        database_url=migrated_urls[backend],
        secret_key=TEST_SECRET_KEY,
        log_level="WARNING",
        worker_poll_seconds=0.05,
        worker_threads=3,
        lease_seconds=5,
        notify_timeout=2.0,
        advertised_url="http://tm.example:32002",
        # The peers of these tests (DME, InfluxDB, rApp receivers) are local servers: loopback is allowed here.
        # The outbound policy's own tests build apps without it.
        outbound_allow="127.0.0.1/32,localhost",
    )


@pytest.fixture
def build_app(settings: Settings):
    """build_app(**setting_overrides): an app on the test's database with some settings changed. Its workers are
    stopped and every table emptied (the schema stays as migrated) when the test ends, so each test starts clean."""
    apps = []

    def make(**overrides):
        app = create_app(settings.replace(**overrides))
        app.config["TESTING"] = True
        apps.append(app)
        return app

    yield make
    for app in reversed(apps):
        app.extensions["trainingmgr"].stop_worker()
    for app in reversed(apps):
        with app.app_context():
            with db.engine.begin() as conn:
                for table in reversed(Base.metadata.sorted_tables):
                    conn.execute(table.delete())
            db.engine.dispose()


@pytest.fixture
def app(build_app):
    return build_app()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def backend(settings: Settings) -> str:
    return "sqlite" if settings.is_sqlite else "postgresql"


@pytest.fixture
def pg_only(request, backend: str) -> None:
    """A test of PostgreSQL behaviour: skipped on the SQLite parameter."""
    if backend != "postgresql":
        pytest.skip(f"{request.node.originalname}: a PostgreSQL test")


@pytest.fixture
def sqlite_only(request, backend: str) -> None:
    """A test of SQLite behaviour: skipped on the PostgreSQL parameter."""
    if backend != "sqlite":
        pytest.skip(f"{request.node.originalname}: a SQLite test")


@pytest.fixture
def worker(app):
    """The embedded worker threads, as `serve` runs them, against the test's database."""
    return app.extensions["trainingmgr"].start_worker(app)


@pytest.fixture
def dme():
    """A DME double; feature groups reach it with host 127.0.0.1 and dme_port = dme.port."""
    from tests.peers import DmeDouble

    double = DmeDouble().start()
    yield double
    double.stop()
