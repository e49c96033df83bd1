"""Flask extensions, created unbound and bound to an app in create_app."""
from collections.abc import Iterator
from contextlib import contextmanager

from flask import g
from flask_sqlalchemy import SQLAlchemy

from .models.base import Base

db = SQLAlchemy(model_class=Base)

READ_ONLY_FLAG = "tm_read_only"  # in flask.g while read_only_transactions() lasts


@contextmanager
def read_only_transactions() -> Iterator[None]:
    """The database transactions begun inside (in this app context) only read, as a GET request's do. On SQLite
    they begin deferred: no write lock taken, none waited for (WAL); on PostgreSQL they run in autocommit. Each
    pooled connection is checked out and begun inside, and ended (rollback, remove) before leaving."""
    before = g.get(READ_ONLY_FLAG, False)
    setattr(g, READ_ONLY_FLAG, True)
    try:
        yield
    finally:
        setattr(g, READ_ONLY_FLAG, before)
