"""PostgreSQL behind the state contract (CONTRACT §7, §10): the connection, the run lock, the dialect.

`adapter.state` writes its SQL once, in the subset both engines speak (`INSERT … ON CONFLICT`, `?`
placeholders, TEXT/INTEGER/REAL columns). This module is the only place that knows PostgreSQL: it turns
`?` into psycopg's `%s`, `REAL` (8 bytes in SQLite, 4 in PostgreSQL) into `DOUBLE PRECISION`, and
`BEGIN IMMEDIATE` into `BEGIN`, and returns rows that read like `sqlite3.Row` (by column name, `dict()`).

psycopg is an optional dependency (`pip install 'anc-adapter[postgresql]'`): it is imported here only,
and only when a `[state] url` is configured, so the SQLite default never needs it."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from adapter.errors import ConfigError, LockHeldError

SCHEMES = ("postgresql://", "postgres://")
PASSWORD_ENV = "ANC_STATE_PASSWORD"
_LOCK_NAMESPACE = "anc-adapter:"
_SQLITE_ONLY = re.compile(r"\s*(INSERT\s+OR\s+(REPLACE|IGNORE)|REPLACE\s+INTO)\b", re.IGNORECASE)
_CREATES = re.compile(r"\s*CREATE\s+(?:UNIQUE\s+)?(?:TABLE|INDEX)\s+IF\s+NOT\s+EXISTS\s+(\w+)", re.IGNORECASE)


def is_url(location: object) -> bool:
    return isinstance(location, str) and location.startswith(SCHEMES)


def redacted(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        netloc = parts.netloc
    else:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    query = re.sub(r"(?i)(^|&)(password)=[^&]*", r"\1\2=***", parts.query)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError:
        raise ConfigError("state.url: a PostgreSQL state needs psycopg; install it with "
                          "pip install 'anc-adapter[postgresql]'") from None
    return psycopg


def _session(url: str) -> Any:
    """A new autocommit session: `State.transaction()` opens and closes transactions itself, as with
    SQLite in isolation_level=None. Default READ COMMITTED and synchronous_commit=on (COMMIT returns
    only once the server has the transaction on disk) are kept on purpose."""
    psycopg = _psycopg()
    from psycopg.rows import dict_row

    password = os.environ.get(PASSWORD_ENV)  # else libpq's own PGPASSWORD / PGPASSFILE, as for psql
    extra = {"password": password} if password else {}
    try:
        return psycopg.connect(url, autocommit=True, row_factory=dict_row,
                               application_name="anc-adapter", connect_timeout=30, **extra)
    except psycopg.Error as exc:
        # psycopg's message names host and port, never the password.
        raise ConfigError(f"state.url: cannot connect to {redacted(url)}: {str(exc).strip()}") from None


class Connection:
    """A psycopg session that takes the state's SQLite-spelled SQL (see the module docstring)."""

    def __init__(self, session: Any):
        self.session = session

    def execute(self, sql: str, parameters: Sequence[Any] = ()) -> Any:
        # Always a tuple, even empty: then psycopg reads `%%` back as `%` in every statement alike.
        return self.session.execute(translate(sql), tuple(parameters))

    def executescript(self, script: str) -> None:
        # One statement at a time: psycopg runs a multi-statement string only without parameters, and a
        # failing statement is then named in the error.
        for statement in _statements(script):
            # CREATE INDEX takes a lock on its table before it looks whether the index exists, so it would
            # wait for a run's open transaction: `status` beside a run must not. Existing objects are
            # skipped before that (the schema only ever adds objects).
            created = _CREATES.match(statement)
            if created and self.session.execute("SELECT to_regclass(%s) AS o", (created[1],)).fetchone()["o"]:
                continue
            self.execute(statement)

    def columns(self, table: str) -> set[str]:
        rows = self.session.execute(
            "SELECT column_name FROM information_schema.columns"
            " WHERE table_schema = current_schema() AND table_name = %s", (table,)
        ).fetchall()
        return {row["column_name"] for row in rows}

    def close(self) -> None:
        self.session.close()


def translate(sql: str) -> str:
    """SQLite spelling -> PostgreSQL. The state's SQL passes values only as parameters, so a `?` or a
    `%` is never inside a string literal."""
    if _SQLITE_ONLY.match(sql):
        raise ValueError("INSERT OR REPLACE/IGNORE is SQLite's alone: write it with State._upsert or "
                         "INSERT … ON CONFLICT (key) DO UPDATE/NOTHING")
    sql = sql.replace("%", "%%").replace("?", "%s")
    if sql.lstrip().upper().startswith(("CREATE", "ALTER")):
        sql = re.sub(r"\bREAL\b", "DOUBLE PRECISION", sql)  # SQLite's REAL is 8 bytes; PostgreSQL's 4
    if sql.strip().upper() == "BEGIN IMMEDIATE":
        sql = "BEGIN"  # the advisory lock already makes the pass the only writer
    return sql


def _statements(script: str) -> Iterator[str]:
    without_comments = re.sub(r"--[^\n]*", "", script)
    for statement in without_comments.split(";"):
        if statement.strip():
            yield statement


def connect(url: str) -> Connection:
    session = _session(url)
    # A commit is what lets the watermark pass an Observation: it must survive a server crash. A database
    # (or role) set to synchronous_commit=off could lose the last commits and then skip their alerts;
    # 'local', 'remote_write', 'on' and 'remote_apply' all flush locally first and are left as set.
    if session.execute("SHOW synchronous_commit").fetchone()["synchronous_commit"] == "off":
        session.execute("SET synchronous_commit = on")
    return Connection(session)


def lock_key(schema: str) -> int:
    """The advisory lock's key: a signed 64-bit number derived from the schema holding the state, so
    two states in two schemas of one database do not block each other (advisory locks are per
    database already)."""
    digest = hashlib.sha256(f"{_LOCK_NAMESPACE}{schema}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


@contextmanager
def advisory_lock(url: str) -> Iterator[None]:
    """One pass at a time per PostgreSQL state (CONTRACT §10), the second exits 5. The lock lives in a
    session of its own, held for the whole run: it is released when the run ends, and by the server
    when the session dies with the process or the pod (no stale lock file to clean up)."""
    session = _session(url)
    try:
        schema = session.execute("SELECT coalesce(current_schema(), '') AS s").fetchone()["s"]
        key = lock_key(schema)
        if not session.execute("SELECT pg_try_advisory_lock(%s) AS ok", (key,)).fetchone()["ok"]:
            raise LockHeldError(f"another run holds the lock on the state at {redacted(url)} "
                                f"(schema {schema!r}); nothing was done")
        yield
    finally:
        session.close()  # ends the session, which releases its advisory locks
