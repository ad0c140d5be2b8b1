"""Save the block documents of the embedded stack, all named ``embedded``.

The script form of :mod:`msi_prefect.stack.embedded_blocks` (``msi-prefect up`` runs it;
see that module for the documents it saves). Usage::

    eval "$(.venv/bin/msi-prefect env)"
    .venv/bin/msi-prefect status --json | .venv/bin/python blocks/create_embedded_blocks.py
"""

from __future__ import annotations

import sys

from msi_prefect.stack.embedded_blocks import (
    build_crypto_blocks,
    build_embedded_blocks,
    create_embedded_blocks,
    main,
)

__all__ = ["build_crypto_blocks", "build_embedded_blocks", "create_embedded_blocks", "main"]

if __name__ == "__main__":
    sys.exit(main())
