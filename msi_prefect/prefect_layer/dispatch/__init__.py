"""Batch dispatch: how rebuilt files reach their backup, metadata and analysis runs.

- :mod:`~msi_prefect.prefect_layer.dispatch.mode`: the dispatch modes and the per-file
  flows they start (Prefect-free, so the stack's configuration can name a mode);
- :mod:`~msi_prefect.prefect_layer.dispatch.batcher`: the reconstruct flow's side: the
  adaptive gate, the durable batch outbox and the ``msi.files.batch-ready`` events;
- :mod:`~msi_prefect.prefect_layer.dispatch.batches`: the batch flow's side: task runs
  per file of a batch.
"""
