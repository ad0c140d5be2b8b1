"""A new stack's SQLite Prefect database starts as a copy of an empty, migrated one.

A Prefect server on a new SQLite database first runs every migration of its schema (over
a hundred Alembic steps: 3-5 s of CPU on 2 cores, more on a busy machine), for every new
state dir. The result is the same for every new database of one Prefect installation, so
it is made once, kept in the user's cache folder (:func:`cache_dir`, named after the
Prefect version and its migrations) and copied. Prefect still checks its migrations when
it starts (on the copy, nothing is left to do).

The Prefect server's process calls :func:`seed_new_database` before Prefect opens the
database (`msi_prefect.stack.components.prefect_server_main`). Whatever goes wrong here
(no cache folder, a damaged template) only costs the time it saves: the server then
migrates its new database itself, as it always did.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path

logger = logging.getLogger(__name__)

DATABASE_URL_ENV = "PREFECT_API_DATABASE_CONNECTION_URL"
SQLITE_URL_PREFIX = "sqlite+aiosqlite:///"
#: Under ``$XDG_CACHE_HOME`` (default ``~/.cache``).
CACHE_SUBDIR = "msi-prefect"
#: Making the template: Prefect's own migration of a new database, in a process of its own
#: (its connections are closed, and the file complete, when it exits).
MIGRATE_PROGRAM = (
    "import asyncio\n"
    "from prefect.server.database import provide_database_interface\n"
    "asyncio.run(provide_database_interface().create_db())\n"
)
MIGRATE_TIMEOUT_S = 300


def sqlite_path(environ: Mapping[str, str]) -> Path | None:
    """The SQLite file the Prefect server of ``environ`` uses, or None (PostgreSQL)."""
    url = environ.get(DATABASE_URL_ENV, "")
    if not url.startswith(SQLITE_URL_PREFIX):
        return None
    return Path(url.removeprefix(SQLITE_URL_PREFIX))


def cache_dir(environ: Mapping[str, str]) -> Path:
    """Where the templates are kept: ``$XDG_CACHE_HOME/msi-prefect``."""
    root = environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / CACHE_SUBDIR


def template_name() -> str:
    """The template's file name: the Prefect version and a digest of its SQLite migrations."""
    spec = importlib.util.find_spec("prefect")
    assert spec is not None and spec.submodule_search_locations
    package = Path(next(iter(spec.submodule_search_locations)))
    versions = package / "server" / "database" / "_migrations" / "versions" / "sqlite"
    names = sorted(path.name for path in versions.glob("*.py"))
    digest = hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]
    return f"prefect-{metadata.version('prefect')}-sqlite-{digest}.db"


def make_template(template: Path, environ: Mapping[str, str]) -> None:
    """Migrate a new, empty database into ``template`` (written whole or not at all).

    Raises:
        OSError: The cache folder cannot be written.
        subprocess.SubprocessError: The migration failed or took too long.
    """
    template.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=template.parent, prefix=".making-", suffix=".db")
    os.close(fd)
    os.unlink(partial)  # SQLite creates it
    try:
        subprocess.run(
            [sys.executable, "-c", MIGRATE_PROGRAM],
            env={**environ, DATABASE_URL_ENV: SQLITE_URL_PREFIX + partial},
            capture_output=True,
            timeout=MIGRATE_TIMEOUT_S,
            check=True,
        )
        # Readers of a rollback-journal database leave no -wal/-shm files beside it (the
        # copies start in it too; Prefect turns each to WAL when it opens it).
        connection = sqlite3.connect(partial)
        try:
            connection.execute("PRAGMA journal_mode=DELETE")
        finally:
            connection.close()
        os.replace(partial, template)
    finally:
        for leftover in (partial, f"{partial}-wal", f"{partial}-shm"):
            Path(leftover).unlink(missing_ok=True)


def copy_database(source: Path, target: Path) -> None:
    """Copy an SQLite database with SQLite's backup API (a consistent copy, whole or none).

    Raises:
        sqlite3.Error: ``source`` is not a database.
        OSError: ``target`` cannot be written.
    """
    partial = target.with_name(f".{target.name}.copying")
    partial.unlink(missing_ok=True)
    try:
        reader = sqlite3.connect(f"file:{source}?mode=ro&immutable=1", uri=True)
        try:
            writer = sqlite3.connect(partial)
            try:
                reader.backup(writer)
            finally:
                writer.close()
        finally:
            reader.close()
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def seed_new_database(environ: Mapping[str, str] | None = None) -> bool:
    """Copy the migrated template into the server's SQLite file if that does not exist yet.

    Returns:
        Whether the file was made from the template (False: an existing database, a
        PostgreSQL one, or no template could be made: Prefect migrates it then).
    """
    environ = os.environ if environ is None else environ
    target = sqlite_path(environ)
    if target is None or target.exists():
        return False
    template = cache_dir(environ) / template_name()
    try:
        if not template.is_file():
            make_template(template, environ)
        target.parent.mkdir(parents=True, exist_ok=True)
        copy_database(template, target)
    except sqlite3.Error as exc:  # a damaged template: the next start makes a new one
        logger.warning("damaged template %s (%s): Prefect migrates %s", template, exc, target)
        template.unlink(missing_ok=True)
        return False
    except (OSError, subprocess.SubprocessError) as exc:  # no cache folder, say
        logger.warning("no migrated template for %s (%s): Prefect migrates it", target, exc)
        return False
    return True
