"""One SQLite database per concept, shared by every worker of one machine.

Each store (OAuth grants, the spend ledger) owns its own file and its own list of
migrations, so they evolve independently. A database is opened in WAL mode (readers
never block the writer, and a ``relayd usage`` report can read while relayd writes),
with ``synchronous=NORMAL`` (a commit survives a process kill; only a power loss
may drop the last transactions) and a busy timeout, so a second worker's write
waits briefly instead of failing.

Migrations are numbered by their position: the database's ``user_version`` says how
many have run. At open, the missing ones run in one transaction each; a database
written by a newer relayd (more migrations than this one knows) is refused rather
than misread.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path

__all__ = ["StoreSchemaError", "open_database"]


class StoreSchemaError(RuntimeError):
    """The database was written by a newer relayd."""


def open_database(
    path: Path, migrations: Sequence[str], *, busy_timeout_s: float = 2.0
) -> sqlite3.Connection:
    """Open (creating if needed) the database at ``path`` and bring it up to date.

    ``migrations`` are SQL scripts, oldest first; never edit one that has shipped,
    append a new one. The connection is in autocommit mode: callers open their own
    short transactions (``BEGIN IMMEDIATE`` for read-modify-write).
    """
    connection = sqlite3.connect(
        path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
    )
    try:
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        connection.execute("PRAGMA foreign_keys=ON")
        _migrate(connection, path, migrations)
    except BaseException:
        connection.close()
        raise
    path.chmod(0o600)
    return connection


def _migrate(connection: sqlite3.Connection, path: Path, migrations: Sequence[str]) -> None:
    connection.execute("BEGIN IMMEDIATE")  # one worker migrates; the others wait
    try:
        (version,) = connection.execute("PRAGMA user_version").fetchone()
        if version > len(migrations):
            raise StoreSchemaError(
                f"{path} has schema version {version}, newer than this relayd knows "
                f"({len(migrations)}); upgrade relayd or point it at another state directory"
            )
        for number, script in enumerate(migrations[version:], start=version + 1):
            for statement in _statements(script):
                connection.execute(statement)
            connection.execute(f"PRAGMA user_version={number}")
        connection.execute("COMMIT")
    except BaseException:
        connection.execute("ROLLBACK")
        raise


def _statements(script: str) -> list[str]:
    """``script`` split into complete statements (``executescript`` would commit)."""
    statements, pending = [], ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            statements.append(pending.strip())
            pending = ""
    if pending.strip():
        raise ValueError(f"incomplete SQL statement in a migration: {pending.strip()[:60]!r}")
    return statements
