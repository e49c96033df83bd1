"""Idle statements: what the default `serve` sends to its PostgreSQL while nobody calls it (issue 12, item 3).

Usage: .venv/bin/python bench/idle_bench.py [--idle 30] [--checkout DIR]

It initdb's a PostgreSQL cluster of its own on a free port (tests/private_postgres.py) with `log_statement=all`,
serves this checkout (or `--checkout DIR`, another checkout of the project, e.g. an older commit in a git worktree,
for a before/after figure in one run) on it with the default settings (the web process and the step runner `serve`
keeps), waits for /readyz and 5 s more, then counts the statements the server's log shows for `--idle`
seconds without a request. Everything is stopped and removed at the end, also on error or Ctrl-C.
"""
from __future__ import annotations

import argparse
import collections
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.private_postgres import private_cluster  # noqa: E402
from tests.processes import assert_ready, free_port, served  # noqa: E402

STATEMENT = re.compile(rb"LOG:  statement: (\S+)")


def statements(log: Path, start: int) -> collections.Counter:
    data = log.read_bytes()[start:]
    return collections.Counter(m.group(1).decode().upper().rstrip(";") for m in STATEMENT.finditer(data))


def idle_statements(checkout: Path, idle: float) -> collections.Counter:
    """The statements the default `serve` of `checkout` sends to a private PostgreSQL in `idle` seconds without a
    request (after /readyz and 5 s more), by first word."""
    import psycopg2

    with tempfile.TemporaryDirectory(prefix="tm-idle-") as tmp, private_cluster() as cluster:
        tmp_path = Path(tmp)
        conn = psycopg2.connect(host="127.0.0.1", port=cluster.port, user="postgres", dbname="postgres")
        try:
            conn.autocommit = True  # ALTER SYSTEM runs outside a transaction
            with conn.cursor() as cursor:
                cursor.execute("ALTER SYSTEM SET log_statement = 'all'")
                cursor.execute("SELECT pg_reload_conf()")
        finally:
            conn.close()
        port = free_port()
        env = {"TM_DATABASE_URL": cluster.url, "TM_DATA_DIR": str(tmp_path / "data"), "TM_SECRET_KEY": "bench",
               "TM_LOG_LEVEL": "WARNING", "PYTHONPATH": str(checkout.resolve())}
        with served(tmp_path, port, env) as server:
            assert_ready(f"http://127.0.0.1:{port}", server, 180, tmp_path / "server.log")
            time.sleep(5.0)  # the workers' first looks
            start = cluster.log_path.stat().st_size
            time.sleep(idle)
            return statements(cluster.log_path, start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--idle", type=float, default=30.0, help="seconds counted without requests")
    parser.add_argument("--checkout", type=Path, default=ROOT, help="the project checkout to serve")
    args = parser.parse_args()
    counted = idle_statements(args.checkout, args.idle)
    total = sum(counted.values())
    print(f"serve (default settings: its web process and step runner) of {args.checkout}, idle {args.idle:.0f} s on "
          f"PostgreSQL: {total} statements, {total / args.idle:.2f} per second")
    for word, count in counted.most_common():
        print(f"  {word:<10} {count:6d}  {count / args.idle:8.2f}/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
