"""The `msi-prefect` command line, the top layer: it may import every other layer.

One module per group of subcommands: :mod:`~msi_prefect.cli.stack` (``up``, ``down``,
``status``, ``env``), :mod:`~msi_prefect.cli.transfer` (``upload``, ``watch``,
``reconstruct``), :mod:`~msi_prefect.cli.crypto` (``crypto provision``),
:mod:`~msi_prefect.cli.rerun` (``rerun``) and :mod:`~msi_prefect.cli.inspect_files`
(``inspect``); :mod:`~msi_prefect.cli.main` builds the parser from them. The console
script ``msi-prefect`` and ``python -m msi_prefect.cli`` both run :func:`main`.
"""

from msi_prefect.cli.main import main

__all__ = ["main"]
