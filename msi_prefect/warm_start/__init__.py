"""Warm start: Prefect flow runs forked from a pre-imported process instead of a new interpreter.

A process worker starts every flow run as ``python -m prefect.engine``: a fresh interpreter
that spends about a second importing Prefect, then the flow's own libraries (boto3, s3fs,
confluent-kafka), before the run does any work. On a 2-core machine that is most of what a
file waits for. Here the work pool's ``command`` is :mod:`msi_prefect.warm_start.launch`, a
stdlib-only launcher that starts in milliseconds and asks a warm server
(:mod:`msi_prefect.warm_start.server`, started by :mod:`msi_prefect.warm_start.worker` beside
the worker) to fork a child that has everything imported already. The child runs exactly
what ``python -m prefect.engine`` runs, with the launcher's environment, working directory
and standard streams, so the process worker keeps doing what it always does: logs in the UI,
cancellation (signals to the launcher reach the child), Crashed when the process dies (the
launcher exits non-zero), concurrency limits and retries.

Each run is still a process of its own (a user's analysis code that crashes or leaks takes
only its own run down); only the import cost is shared. Without a warm server (none
configured, or it is gone), the launcher turns itself into ``python -m prefect.engine``.
"""

#: The warm server's Unix socket; set for the worker, inherited by every flow run it starts.
SOCKET_ENV = "MSI_WARM_START_SOCKET"
#: The launcher, as the work pool's ``command`` runs it (after the Python executable).
LAUNCH_MODULE = "msi_prefect.warm_start.launch"
#: Folders (``os.pathsep``-separated) whose ``*.py`` flow scripts the warm server executes
#: once (:mod:`msi_prefect.warm_start.prewarm`); a run whose entrypoint is one of them,
#: unchanged, reuses that module.
FLOWS_ENV = "MSI_WARM_START_FLOWS"
#: ``prefect worker start --type`` of the stack's worker
#: (:class:`msi_prefect.warm_start.process_worker.WarmProcessWorker`, registered when that
#: module is imported); its pool stays of Prefect's type ``process``.
WORKER_TYPE = "msi-warm-process"
