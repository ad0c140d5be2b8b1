"""A new SQLite Prefect database is a copy of a migrated one, made once per Prefect version."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from msi_prefect.stack.sqlite_template import (
    DATABASE_URL_ENV,
    SQLITE_URL_PREFIX,
    cache_dir,
    seed_new_database,
    template_name,
)


def _env(cache: Path, database: Path) -> dict[str, str]:
    return {"XDG_CACHE_HOME": str(cache), DATABASE_URL_ENV: SQLITE_URL_PREFIX + str(database)}


def _revision(database: Path) -> list[tuple[str, ...]]:
    with sqlite3.connect(database) as connection:
        return connection.execute("SELECT version_num FROM alembic_version").fetchall()


def _tables(database: Path) -> set[str]:
    with sqlite3.connect(database) as connection:
        rows = connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        return {name for (name,) in rows}


def test_the_template_is_migrated_once_and_each_new_database_is_a_copy(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = tmp_path / "one" / "prefect.db"
    assert seed_new_database(_env(cache, first))
    template = cache_dir(_env(cache, first)) / template_name()
    assert template.is_file()
    # Prefect's schema at its newest migration, and no rows of anyone's.
    assert len(_revision(first)) == 1
    assert {"flow_run", "deployment", "block_document", "alembic_version"} <= _tables(first)
    with sqlite3.connect(first) as connection:
        assert connection.execute("SELECT count(*) FROM flow_run").fetchone() == (0,)

    made = template.stat().st_mtime_ns
    second = tmp_path / "two" / "prefect.db"
    assert seed_new_database(_env(cache, second))
    assert template.stat().st_mtime_ns == made  # copied, not migrated again
    assert _revision(second) == _revision(first)
    assert _tables(second) == _tables(first)

    # A database that exists is the stack's own: never replaced.
    with sqlite3.connect(second) as connection:
        connection.execute("CREATE TABLE mine (x)")
    assert not seed_new_database(_env(cache, second))
    assert "mine" in _tables(second)


def test_postgresql_and_a_damaged_template_leave_the_migration_to_prefect(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    postgres = {"XDG_CACHE_HOME": str(cache), DATABASE_URL_ENV: "postgresql+asyncpg://x@h/db"}
    assert not seed_new_database(postgres)
    assert not cache.exists()

    database = tmp_path / "state" / "prefect.db"
    template = cache_dir(_env(cache, database)) / template_name()
    template.parent.mkdir(parents=True)
    template.write_bytes(b"not a database at all" * 100)
    assert not seed_new_database(_env(cache, database))
    assert not database.exists()  # Prefect makes and migrates it
    assert not template.exists()  # the next start makes a good one
    assert list(database.parent.iterdir()) == []
