"""Where `msi-prefect up` finds the project it deploys (prefect.yaml, flows/, deployments/).

In this order:

1. the current folder, when it holds an msi-prefect ``prefect.yaml`` (a lab project written
   by ``msi-prefect init``, or a checkout of this repository): `up` deploys it, as
   ``prefect deploy`` deploys the ``prefect.yaml`` of the folder it runs in;
2. the project files the package carries: a wheel holds the repository's top-level
   ``prefect.yaml``, ``flows/``, ``deployments/`` and ``blocks/`` as ``msi_prefect/project``
   (copied by ``setup.py`` when the wheel is built), so `up` works from ``pip install``;
3. the checkout an editable install runs from (its top-level files are those same files).

The stack's own automations (``deployments/stack-automations``) always come from 2 or 3:
they belong to the stack, not to a lab's deployments.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from msi_prefect.errors import MsiError

#: The file that makes a folder a project.
PROJECT_FILE = "prefect.yaml"
#: Where a wheel holds the project files (see ``setup.py``).
PACKAGED_PROJECT_DIR = Path(__file__).resolve().parents[1] / "project"
#: The checkout of an editable install (its top level holds the project files).
CHECKOUT_DIR = Path(__file__).resolve().parents[2]
#: A lab project's own notification automations, if it has any (else the bundled ones).
AUTOMATIONS_SUBDIR = Path("deployments") / "automations"
#: The script that saves the embedded stack's blocks, relative to a project.
BLOCKS_SCRIPT = Path("blocks") / "create_embedded_blocks.py"


def bundled_project_dir() -> Path:
    """The project files this installation carries (a wheel's, else the checkout's).

    Raises:
        MsiError: Neither holds a prefect.yaml (an install from an incomplete build).
    """
    for candidate in (PACKAGED_PROJECT_DIR, CHECKOUT_DIR):
        if (candidate / PROJECT_FILE).is_file():
            return candidate
    raise MsiError(
        f"this installation of msi-prefect carries no project files ({PROJECT_FILE}, flows/): "
        f"{PACKAGED_PROJECT_DIR} is missing. Reinstall it from a wheel built with "
        "`pip wheel` or `python -m build`, or from a checkout."
    )


def deployment_names(prefect_yaml: Path) -> set[str]:
    """The names of the deployments a prefect.yaml declares.

    Raises:
        MsiError: The file cannot be read or is not a prefect.yaml (YAML with a
            ``deployments`` list of named entries).
    """
    import yaml

    try:
        document = yaml.safe_load(prefect_yaml.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise MsiError(f"cannot read {prefect_yaml}: {exc}") from exc
    deployments = document.get("deployments") if isinstance(document, dict) else None
    if not isinstance(deployments, list):
        raise MsiError(f"{prefect_yaml} has no 'deployments' list; it is not a prefect.yaml")
    return {
        entry["name"]
        for entry in deployments
        if isinstance(entry, dict) and isinstance(entry.get("name"), str)
    }


def project_for_up(folder: Path, required_deployments: Iterable[str]) -> Path:
    """The project `up` deploys when run in ``folder``.

    Args:
        folder: Where `up` runs (the current folder).
        required_deployments: Deployments `up` starts or schedules by name, which a
            project of the folder must declare.

    Returns:
        ``folder`` when it holds a prefect.yaml that declares them, else the bundled project.

    Raises:
        MsiError: ``folder`` holds a prefect.yaml that is not an msi-prefect project (it
            lacks one of those deployments), or there are no bundled project files.
    """
    prefect_yaml = folder / PROJECT_FILE
    if not prefect_yaml.is_file():
        return bundled_project_dir()
    missing = sorted(set(required_deployments) - deployment_names(prefect_yaml))
    if missing:
        raise MsiError(
            f"{prefect_yaml} is not an msi-prefect project: it declares no deployment "
            f"{', '.join(missing)}. Run `msi-prefect up` in another folder (it then deploys "
            "the project this installation carries), or write a project to edit with "
            "`msi-prefect init DIR`."
        )
    return folder.absolute()


def automations_project(project: Path) -> Path:
    """The project whose ``deployments/automations`` `up` applies: its own, else bundled."""
    return project if (project / AUTOMATIONS_SUBDIR).is_dir() else bundled_project_dir()


def blocks_script(project: Path) -> Path:
    """The script that saves the embedded blocks: the project's own, else the bundled one."""
    own = project / BLOCKS_SCRIPT
    return own if own.is_file() else bundled_project_dir() / BLOCKS_SCRIPT
