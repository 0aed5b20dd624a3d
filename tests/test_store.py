"""The local store: the state directory and SQLite databases shared by workers."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from relayd.config import Settings, updated
from relayd.store import state_dir
from relayd.store.sqlite import StoreSchemaError, open_database

MIGRATIONS = (
    "CREATE TABLE grants (id TEXT PRIMARY KEY, n INTEGER NOT NULL);",
    "ALTER TABLE grants ADD COLUMN note TEXT;\nCREATE INDEX grants_n ON grants (n);",
)


def test_state_dir_prefers_setting_then_systemd_then_xdg(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    assert state_dir(Settings()) == tmp_path / "xdg" / "relayd"
    monkeypatch.setenv("STATE_DIRECTORY", f"{tmp_path / 'unit'}:{tmp_path / 'other'}")
    assert state_dir(Settings()) == tmp_path / "unit"
    chosen = updated(Settings(), store={"dir": str(tmp_path / "chosen")})
    assert state_dir(chosen) == tmp_path / "chosen"
    assert (tmp_path / "chosen").stat().st_mode & 0o777 == 0o700


def test_migrations_run_once_in_order_and_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "grants.sqlite3"
    first = open_database(path, MIGRATIONS[:1])
    first.execute("INSERT INTO grants VALUES ('a', 1)")
    first.close()
    second = open_database(path, MIGRATIONS)
    assert second.execute("PRAGMA user_version").fetchone() == (2,)
    assert second.execute("SELECT id, n, note FROM grants").fetchall() == [("a", 1, None)]
    assert second.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert path.stat().st_mode & 0o777 == 0o600
    second.close()


def test_a_database_from_a_newer_relayd_is_refused_not_misread(tmp_path: Path) -> None:
    path = tmp_path / "grants.sqlite3"
    open_database(path, MIGRATIONS).close()
    with pytest.raises(StoreSchemaError, match="newer than this relayd knows"):
        open_database(path, MIGRATIONS[:1])


def test_a_failed_migration_leaves_the_database_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "grants.sqlite3"
    open_database(path, MIGRATIONS[:1]).close()
    with pytest.raises(sqlite3.OperationalError):
        open_database(path, (*MIGRATIONS[:1], "ALTER TABLE missing ADD COLUMN x TEXT;"))
    again = open_database(path, MIGRATIONS[:1])
    assert again.execute("PRAGMA user_version").fetchone() == (1,)
    again.close()
