"""Backups of rebuilt files: the backup task and the scheduled audit of the backup store.

- :mod:`~msi_prefect.prefect_layer.backup.tasks`: back up one rebuilt file, verified;
- :mod:`~msi_prefect.prefect_layer.backup.audit`: find rebuilt files whose backup is
  missing or wrong and ask for them again.
"""
