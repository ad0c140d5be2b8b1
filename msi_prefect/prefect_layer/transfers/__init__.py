"""The long-running transfer flows' work: watch and send, receive and rebuild.

- :mod:`~msi_prefect.prefect_layer.transfers.streaming`: ``run_upload_files``,
  ``run_watch_directory`` and ``run_reconstruct_files``, the bodies of the ``upload-file``,
  ``watch-directory`` and ``reconstruct-files`` flows.
"""
