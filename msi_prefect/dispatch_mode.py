"""The dispatch mode: how rebuilt files start their downstream runs.

Shared by the stack's settings, the blocks and the events; a module of its own so that
`msi-prefect` can offer the choices without importing the event code (and the reassembler
behind it).
"""

from __future__ import annotations

from enum import StrEnum


class DownstreamDispatch(StrEnum):
    """How rebuilt files start their downstream deployments (the ``msi.dispatch`` label).

    The per-file triggers of ``prefect.yaml`` match ``per-file``; in ``batch`` mode the
    per-file events are still emitted (for the record) but only the batch events start work.
    """

    PER_FILE = "per-file"
    BATCH = "batch"
