"""`msi-prefect init DIR`: write a lab project whose deployments the lab edits.

Like the recipes of ``prefect init``: a ``prefect.yaml`` (the deployments this installation
carries, each analysis deployment naming the project's own analysis), the thin flow files,
an analysis function to fill in (``lab_analysis.py``) and a README. ``msi-prefect up`` run
in that folder deploys its ``prefect.yaml`` instead of the bundled one
(:mod:`msi_prefect.stack.project`).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from msi_prefect.errors import MsiError

#: The project's analysis module and function, as its analysis deployments name them.
ANALYSIS_MODULE = "lab_analysis"
ANALYSIS_FUNCTION = "analyze"
ANALYSIS_SPEC = f"{ANALYSIS_MODULE}:{ANALYSIS_FUNCTION}"
#: The deployments that run the analysis, by their entrypoint line in prefect.yaml.
ANALYSIS_ENTRYPOINTS = (
    "flows/analyze_file.py:analyze_file_flow",
    "flows/process_batch.py:process_batch_flow",
)
#: What the bundled prefect.yaml's pull section is, and what a lab project's becomes.
BUNDLED_PULL = """pull:
  - prefect.deployments.steps.set_working_directory:
      directory: "{{ $MSI_PROJECT_DIR }}"
"""
PROJECT_PULL = (
    BUNDLED_PULL
    + """  - msi_prefect.prefect_layer.project_steps.import_from_directory:
      directory: "{{ $MSI_PROJECT_DIR }}"
"""
)
PROJECT_HEADER = f"""\
# The deployments of this lab project: `msi-prefect up` in this folder deploys them
# (instead of the ones the msi-prefect package carries), as `prefect deploy --all` would.
# Written by `msi-prefect init` from the package's prefect.yaml; edit freely.
#
# Differences from the package's: analyze-file and process-batch run this folder's
# analysis ({ANALYSIS_SPEC}, in {ANALYSIS_MODULE}.py), and the pull steps make this
# folder's modules importable in the flow runs. MSI_PROJECT_DIR, MSI_WATCH_DIR and
# MSI_DESTINATION_DIR are set by `msi-prefect up` (export them for a `prefect deploy` of
# your own). The flows in flows/ are thin: the work is in the msi_prefect package.
#
"""

ANALYSIS_STUB = f'''\
"""This lab's analysis: msi-prefect runs `{ANALYSIS_FUNCTION}` on every rebuilt file.

The deployments analyze-file (a run per file) and process-batch (a run per batch of
files) of prefect.yaml name it as "{ANALYSIS_SPEC}". What it returns is shown in the
Prefect UI (an artifact of the run) and carried by the file's `msi.file.analyzed` event.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def {ANALYSIS_FUNCTION}(path: Path, metadata: dict[str, Any]) -> dict[str, Any]:
    """Analyse one rebuilt file.

    Args:
        path: The rebuilt file, verified by its SHA-256 (read it, do not change it).
        metadata: What the file's event says about it (topic, relative path, size, sha256,
            generation).

    Returns:
        JSON values: a mapping becomes a table in the UI, a list of mappings a table of rows.
    """
    # Replace this with the lab's analysis.
    return {{
        "analysis": "{ANALYSIS_MODULE}",
        "file": metadata.get("path", path.name),
        "size_bytes": path.stat().st_size,
    }}
'''

README = f"""\
# A lab project for msi-prefect

Written by `msi-prefect init`. It holds the deployments a lab edits:

- `prefect.yaml`: every deployment, with its triggers and schedules: the transfers
  (watch-directory, reconstruct-files), the flows each rebuilt file starts (backup,
  metadata, analysis), the hourly audit and the re-run of crashed runs;
- `flows/`: the thin flow files the deployments run (the work is in the msi_prefect package);
- `{ANALYSIS_MODULE}.py`: the lab's analysis, `{ANALYSIS_FUNCTION}(path, metadata)`, run on
  every rebuilt file.

## Use it

    cd THIS_FOLDER
    msi-prefect up          # the embedded stack, with this folder's deployments
    cp some_file inbox/     # rebuilt into received/, backed up, described, analysed
    prefect flow-run ls     # the Prefect CLI points at the stack (`up` made its profile active)
    msi-prefect down

`up` keeps the stack's state in `.msi/` here; the watched folder is `inbox/` and rebuilt
files go to `received/` (`msi-prefect up --help` for other folders).

## Change it

- **The analysis**: edit `{ANALYSIS_FUNCTION}` in `{ANALYSIS_MODULE}.py`. The flow runs
  import it from this folder. To use a function of an installed package instead, set
  `analysis: package.module:function` in the analyze-file and process-batch deployments.
- **Schedules, triggers, parameters**: edit `prefect.yaml`, then run `msi-prefect up` again
  (on a running stack it deploys again and starts nothing twice).
- **A real Prefect server**: `prefect deploy --all` here, with `PREFECT_API_URL` and the
  variables named at the top of `prefect.yaml` set; see msi-prefect's docs/deployment.md.
"""


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `init` to the CLI."""
    init = subparsers.add_parser(
        "init",
        help="write a lab project (prefect.yaml, the flow files, an analysis function to "
        "fill in, a README) to edit the deployments; `up` in it deploys it",
    )
    init.add_argument("directory", type=Path, help="the project folder (new, or empty)")
    init.set_defaults(handler=_init)


def _init(args: argparse.Namespace) -> int:
    written = write_project(args.directory)
    print(f"wrote a lab project in {args.directory}:")
    for path in written:
        print(f"  {path.relative_to(args.directory)}")
    print(f"run `msi-prefect up` in {args.directory} to deploy it")
    return 0


def write_project(directory: Path) -> list[Path]:
    """Write a lab project into ``directory`` (created if need be).

    Args:
        directory: A folder that does not exist yet, or an empty one.

    Returns:
        The files written.

    Raises:
        MsiError: ``directory`` is a file or not empty, or the bundled prefect.yaml is not
            of the shape this command edits.
    """
    from msi_prefect.stack.project import PROJECT_FILE, bundled_project_dir

    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise MsiError(
            f"{directory} is not an empty folder; `msi-prefect init` writes a project into "
            "a new or empty one (it never overwrites files)"
        )
    bundled = bundled_project_dir()
    prefect_yaml = project_prefect_yaml((bundled / PROJECT_FILE).read_text())
    flows = directory / "flows"
    flows.mkdir(parents=True, exist_ok=True)
    written = []
    for script in sorted((bundled / "flows").glob("*.py")):
        shutil.copyfile(script, flows / script.name)
        written.append(flows / script.name)
    for name, text in (
        (PROJECT_FILE, prefect_yaml),
        (f"{ANALYSIS_MODULE}.py", ANALYSIS_STUB),
        ("README.md", README),
    ):
        (directory / name).write_text(text)
        written.append(directory / name)
    return written


def project_prefect_yaml(bundled: str) -> str:
    """A lab project's prefect.yaml, made from the bundled one's text (comments kept).

    Raises:
        MsiError: The bundled text lacks a part this edits (its pull section or an
            analysis entrypoint).
    """
    if BUNDLED_PULL not in bundled:
        raise MsiError("the bundled prefect.yaml has no pull section of the shape `init` edits")
    text = PROJECT_HEADER + bundled.replace(BUNDLED_PULL, PROJECT_PULL, 1)
    for entrypoint in ANALYSIS_ENTRYPOINTS:
        line = f"    entrypoint: {entrypoint}\n"
        if line not in text:
            raise MsiError(f"the bundled prefect.yaml has no deployment of {entrypoint}")
        text = text.replace(line, f'{line}    parameters:\n      analysis: "{ANALYSIS_SPEC}"\n', 1)
    return text
