"""The three kinds of host a facility runs, and the work pool each one's worker serves.

``prefect.yaml`` puts each deployment in the work pool of the host that must run it:

* **instrument** (``MSI_INSTRUMENT_POOL``): ``watch-directory``, ``upload-file`` and
  ``prune-source`` read (and prune) the instrument's folder, so they run on the instrument PC;
* **storage** (``MSI_STORAGE_POOL``): ``reconstruct-files`` writes the destination and
  ``audit-backups`` reads its progress store, so they run on the storage host; each
  storage host's worker runs its own copy of ``reconstruct-files``, ``reconstruct-files/
  <host>``, on a queue of its own (``msi_prefect.stack.storage_host``);
* **compute** (``MSI_COMPUTE_POOL``): backup, metadata and analysis (per file and per
  batch) and ``rerun-crashed``; they read each rebuilt file by its URL, so they may run
  on any number of compute hosts.

The embedded stack (one machine) deploys all three into its one pool; a facility exports
the three variables (defaults :func:`default_pool`) before ``prefect deploy --all`` and
starts one worker per host with ``msi-prefect worker --role ROLE``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from enum import StrEnum

from msi_prefect.errors import MsiError
from msi_prefect.prefect_layer.dispatch.mode import BATCH_FLOW, PER_FILE_FLOWS

__all__ = [
    "ROLE_DEPLOYMENTS",
    "HostRole",
    "default_pool",
    "pool_env",
    "pool_of",
    "single_host_pools",
]


class HostRole(StrEnum):
    """What a host does in a facility."""

    INSTRUMENT = "instrument"
    STORAGE = "storage"
    COMPUTE = "compute"


#: The deployments (of prefect.yaml) each role's pool holds.
ROLE_DEPLOYMENTS: dict[HostRole, tuple[str, ...]] = {
    HostRole.INSTRUMENT: ("watch-directory", "upload-file", "prune-source"),
    HostRole.STORAGE: ("reconstruct-files", "audit-backups"),
    HostRole.COMPUTE: (*PER_FILE_FLOWS, BATCH_FLOW, "rerun-crashed"),
}


def pool_env(role: HostRole) -> str:
    """The environment variable prefect.yaml reads the role's work pool name from."""
    return f"MSI_{role.value.upper()}_POOL"


def default_pool(role: HostRole) -> str:
    """The pool name a facility uses unless it chooses another: ``msi-<role>``."""
    return f"msi-{role.value}"


def pool_of(role: HostRole, environ: Mapping[str, str] | None = None) -> str:
    """The role's pool: its variable when set (as for ``prefect deploy``), else the default.

    Raises:
        MsiError: The variable is set but blank.
    """
    environ = os.environ if environ is None else environ
    name = pool_env(role)
    if name not in environ:
        return default_pool(role)
    value = environ[name].strip()
    if not value:
        raise MsiError(f"{name} is set but empty; give the {role.value} work pool's name")
    return value


def single_host_pools(pool: str) -> dict[str, str]:
    """The variables that put every deployment in one pool (the embedded stack)."""
    return {pool_env(role): pool for role in HostRole}
