"""The Prefect layer: blocks, tasks, events and dispatch around the transfer core.

It imports the transfer core (through :mod:`msi_prefect.transfer`), the Prefect-free
libraries (:mod:`msi_prefect.metadata`, :mod:`msi_prefect.errors`) and Prefect; never the
stack or the CLI. Laid out like Prefect's own integrations (prefect-aws): one subpackage
per surface, with its block beside the tasks that use it:

- :mod:`~msi_prefect.prefect_layer.transfers`: the Kafka cluster, transfer settings and
  KafkaCrypto blocks, and the long-running transfer flows' work (``streaming``);
- :mod:`~msi_prefect.prefect_layer.backup`: the backup storage block, the backup task and
  the backup audit;
- :mod:`~msi_prefect.prefect_layer.dispatch`: how rebuilt files reach their downstream
  runs (dispatch mode, batcher and outbox, a task run per file of a batch);
- modules for the other downstream work (:mod:`~msi_prefect.prefect_layer.metadata_tasks`,
  :mod:`~msi_prefect.prefect_layer.analysis`, :mod:`~msi_prefect.prefect_layer.crashed_runs`)
  and what they share (:mod:`~msi_prefect.prefect_layer.events`,
  :mod:`~msi_prefect.prefect_layer.event_outbox`,
  :mod:`~msi_prefect.prefect_layer.flow_inputs`);
- :mod:`~msi_prefect.prefect_layer.blocks`: every block type, for ``prefect block
  register -m msi_prefect.prefect_layer.blocks`` and the ``prefect.collections`` entry point.
"""
