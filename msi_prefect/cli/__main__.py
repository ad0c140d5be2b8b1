"""``python -m msi_prefect.cli ARGS``: the same as the ``msi-prefect`` console script."""

import sys

from msi_prefect.cli.main import main

sys.exit(main())
