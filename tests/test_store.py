"""The local store: the state directory and SQLite databases shared by workers."""

from __future__ import annotations

import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from relayd.config import ConfigError, Settings, updated
from relayd.store import state_dir
from relayd.store.signing import signing_key
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


def test_the_signing_secret_is_made_once_and_kept_private_in_the_state_directory(
    tmp_path: Path,
) -> None:
    settings = updated(Settings(), store={"dir": str(tmp_path / "state")})
    with ThreadPoolExecutor(4) as pool:  # workers starting at once
        made = set(pool.map(lambda _: signing_key(settings), range(8)))
    assert len(made) == 1
    kept = tmp_path / "state" / "signing_secret"
    assert kept.stat().st_mode & 0o777 == 0o600
    assert signing_key(settings) in made  # a restart signs as before
    assert [p.name for p in kept.parent.iterdir()] == ["signing_secret"]


def test_a_configured_signing_secret_wins_and_redis_without_one_is_refused(
    tmp_path: Path,
) -> None:
    given = updated(Settings(), store={"dir": str(tmp_path)}, actions={"signing_secret": "s" * 40})
    assert signing_key(given) == b"s" * 40
    assert not (tmp_path / "signing_secret").exists()
    shared = updated(Settings(), store={"backend": "redis", "redis_url": "redis://h:6379/0"})
    with pytest.raises(ConfigError, match="LoadCredential"):
        signing_key(shared)


def test_a_relay_on_the_local_store_never_loads_the_redis_client() -> None:
    # redis-py costs about 6 MiB and 0.1 s at start: a relay on one machine pays neither.
    import subprocess
    import sys

    probe = (
        "import sys, relayd.app, relayd.cli, relayd.preflight\n"
        "from relayd.app import create_app\n"
        "from relayd.config import Settings\n"
        "create_app(Settings())\n"
        "print('redis' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "False"
