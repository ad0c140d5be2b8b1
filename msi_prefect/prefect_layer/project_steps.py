"""Deployment steps of a lab project (``msi-prefect init``): its own modules importable.

A lab project keeps its analysis beside its ``prefect.yaml`` (``lab_analysis.py``), and its
deployments name it as ``lab_analysis:analyze``. The flow run imports that name when it
runs, after Prefect has loaded the flow script; Prefect puts the project folder on
``sys.path`` only while it loads the script. The project's ``prefect.yaml`` therefore adds
it in its ``pull`` section, after ``set_working_directory``::

    pull:
      - prefect.deployments.steps.set_working_directory:
          directory: "{{ $MSI_PROJECT_DIR }}"
      - msi_prefect.prefect_layer.project_steps.import_from_directory:
          directory: "{{ $MSI_PROJECT_DIR }}"
"""

from __future__ import annotations

import sys
from pathlib import Path

from msi_prefect.errors import MsiError


def import_from_directory(directory: str) -> dict[str, str]:
    """Make the modules of ``directory`` importable in this flow run (a pull step).

    Args:
        directory: The project folder.

    Returns:
        ``{"directory": <the folder>}``, as Prefect's own pull steps return theirs.

    Raises:
        MsiError: The folder does not exist.
    """
    folder = Path(directory).expanduser().absolute()
    if not folder.is_dir():
        raise MsiError(f"the project folder {folder} does not exist (pull step of prefect.yaml)")
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    return {"directory": str(folder)}
