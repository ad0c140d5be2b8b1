"""The dispatch mode: how rebuilt files start their downstream runs.

Shared by the stack's settings, the blocks and the events; a module of its own so that
`msi-prefect` can offer the choices without importing the event code (and the reassembler
behind it).
"""

from __future__ import annotations

from enum import StrEnum


class DownstreamDispatch(StrEnum):
    """How rebuilt files start their downstream deployments.

    The per-file triggers of ``prefect.yaml`` match events labelled ``msi.dispatch:
    per-file``; in ``batch`` mode the per-file events are still emitted (labelled ``batch``,
    for the record) but only the batch events start work. ``adaptive`` (the default)
    chooses per file: a file rebuilt while the downstream runs keep up is dispatched on its
    own (labelled ``per-file``); one rebuilt while runs are still waiting to start joins
    the next batch (labelled ``batch``), so batches grow with the backlog. ``adaptive`` is
    a mode, never a label.
    """

    ADAPTIVE = "adaptive"
    PER_FILE = "per-file"
    BATCH = "batch"


#: The flows a file dispatched on its own starts (a run per step).
PER_FILE_FLOWS = ("backup-file", "extract-metadata", "analyze-file")
#: The flow a batch starts: one run does the three steps of every file of the batch.
BATCH_FLOW = "process-batch"
#: The flows a batch started, a run per step, before ``process-batch``: `up` retires their
#: deployments; a lab project written earlier (``msi-prefect init``) may still deploy them.
EARLIER_BATCH_FLOWS = ("backup-batch", "extract-metadata-batch", "analyze-batch")
#: The flows a rebuilt file starts, on its own or in a batch (not the audit, which a
#: schedule starts).
FILE_FLOWS = (*PER_FILE_FLOWS, BATCH_FLOW, *EARLIER_BATCH_FLOWS)
