"""Where a destination keeps its transfer state: one definition of the folder's layout.

A local destination holds, besides the rebuilt files::

    DEST/.msi-staging/            staging files being written (same filesystem: atomic rename)
    DEST/.msi-state/              the work directory (or --work-dir / work_dir, elsewhere)
        progress.sqlite           the consumer's progress store
        quarantine/               files that failed verification
        event-outbox.sqlite       events not yet confirmed by Prefect (reconstruct flow)
        dispatch-outbox.sqlite    files waiting for their batch (reconstruct flow)
        rebuilder.lock            held by the one rebuilder using the folder (work_lock.py)

A remote destination (an fsspec URL) needs an explicit work directory, which then also
holds the staging files (``staging/``). The reassembler, the backup audit, the
reconstruct flow and the CLI all find these files through :class:`DestinationLayout`.

The sending side keeps one file, its producer registry (what was sent, by content): in the
stack's state folder for the CLI, or beside a watched folder for the Prefect flows
(:func:`registry_beside`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

#: The work directory's name inside a local destination.
STATE_DIR_NAME: Final = ".msi-state"
#: The staging directory's name inside a local destination.
STAGING_DIR_NAME: Final = ".msi-staging"
#: First path segments a transfer never writes a received file to.
RESERVED_TOP_LEVEL_NAMES: Final = frozenset({STAGING_DIR_NAME, STATE_DIR_NAME})
PROGRESS_FILE_NAME: Final = "progress.sqlite"
QUARANTINE_DIR_NAME: Final = "quarantine"
#: Staging below the work directory, for a remote destination.
REMOTE_STAGING_DIR_NAME: Final = "staging"
EVENT_OUTBOX_FILE: Final = "event-outbox.sqlite"
BATCH_OUTBOX_FILE: Final = "dispatch-outbox.sqlite"
#: The producer registry's file name (in a state folder; hidden as ``.msi-...`` beside one).
REGISTRY_FILE: Final = "producer-registry.sqlite"
# Where the transfer commands and a host's downstream runs keep their state outside a
# stack's project folder.
XDG_STATE_ENV: Final = "XDG_STATE_HOME"
USER_STATE_SUBDIR: Final = "msi-prefect"


@dataclass(frozen=True)
class DestinationLayout:
    """The state files and folders of one destination.

    Attributes:
        work_dir: Progress store, quarantine and outboxes.
        staging_dir: Where files are written before they are verified and delivered.
    """

    work_dir: Path
    staging_dir: Path

    @classmethod
    def of_local(cls, destination: Path, work_dir: Path | None = None) -> DestinationLayout:
        """The layout of a local destination directory (work dir ``DEST/.msi-state`` by default)."""
        return cls(
            work_dir=work_dir if work_dir is not None else destination / STATE_DIR_NAME,
            staging_dir=destination / STAGING_DIR_NAME,
        )

    @classmethod
    def of_remote(cls, work_dir: Path) -> DestinationLayout:
        """The layout of a remote destination: everything below the given work directory."""
        return cls(work_dir=work_dir, staging_dir=work_dir / REMOTE_STAGING_DIR_NAME)

    @property
    def progress_store(self) -> Path:
        """The consumer's progress store (SQLite)."""
        return self.work_dir / PROGRESS_FILE_NAME

    @property
    def quarantine_dir(self) -> Path:
        """Where files that failed verification are kept, for people to look at."""
        return self.work_dir / QUARANTINE_DIR_NAME

    @property
    def event_outbox(self) -> Path:
        """The reconstruct flow's durable outbox of file events."""
        return self.work_dir / EVENT_OUTBOX_FILE

    @property
    def batch_outbox(self) -> Path:
        """The reconstruct flow's durable outbox of files waiting for their batch."""
        return self.work_dir / BATCH_OUTBOX_FILE

    def create(self) -> None:
        """Create the work, staging and quarantine directories (existing ones are kept)."""
        for directory in (self.work_dir, self.staging_dir, self.quarantine_dir):
            directory.mkdir(parents=True, exist_ok=True)


def registry_beside(path: Path) -> Path:
    """The producer registry the Prefect flows keep for a watched folder (or a sent file).

    It sits beside ``path``, hidden: ``PARENT/.msi-producer-registry.sqlite``. The
    watch-directory flow, the prune-source flow and ``msi-prefect files`` all find it here.
    """
    return path.parent / f".msi-{REGISTRY_FILE}"


def user_state_dir() -> Path:
    """The user's state directory for msi-prefect: ``$XDG_STATE_HOME/msi-prefect``.

    ``~/.local/state/msi-prefect`` when ``$XDG_STATE_HOME`` is unset, empty or relative
    (the XDG base directory specification says to ignore a relative one).
    """
    base = os.environ.get(XDG_STATE_ENV, "")
    root = Path(base) if base and Path(base).is_absolute() else Path.home() / ".local" / "state"
    return root / USER_STATE_SUBDIR
