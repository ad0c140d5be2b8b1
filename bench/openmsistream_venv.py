"""The separate virtual environment that holds the real OpenMSIStream (from PyPI).

OpenMSIStream pins dependencies that clash with ours, so it never goes into the project's
``.venv``. The benchmark (``bench.compare``), the compatibility tests
(``tests/transfer/test_openmsistream_compat.py``) and ``scripts/bootstrap --with-test-tools``
all get its interpreter from :func:`ensure_openmsistream_python`, which creates
``bench/.venv-openmsistream`` once and re-installs only when the wanted requirement changes
(a stamp file records it, like ``scripts/bootstrap`` does for ``.venv``).

``$MSI_BENCH_OMSI_PYTHON`` names another interpreter with openmsistream installed and skips
the venv entirely.

Usage::

    python -m bench.openmsistream_venv          # create or check it; prints the interpreter
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

OMSI_PYTHON_ENV = "MSI_BENCH_OMSI_PYTHON"
"""Environment variable naming an interpreter that already has openmsistream."""

OMSI_VENV = Path(__file__).resolve().parent / ".venv-openmsistream"
"""Where the venv is created."""

OMSI_REQUIREMENT = "openmsistream==1.8.8"
"""The release the compatibility layer was written and tested against."""

STAMP_NAME = ".msi-openmsistream-installed"
PIP_TIMEOUT_S = 900.0


def _wanted_stamp() -> str:
    return hashlib.sha256(OMSI_REQUIREMENT.encode("utf-8")).hexdigest()


def ensure_openmsistream_python(venv: Path = OMSI_VENV, quiet: bool = False) -> Path:
    """Return an interpreter that can run OpenMSIStream's programs, creating its venv once.

    Args:
        venv: Where to create the virtual environment.
        quiet: Print nothing (tests); otherwise say when installing.

    Returns:
        The interpreter: ``$MSI_BENCH_OMSI_PYTHON`` if set, else ``VENV/bin/python``.

    Raises:
        FileNotFoundError: ``$MSI_BENCH_OMSI_PYTHON`` names a missing file.
        subprocess.CalledProcessError: The venv could not be created or pip failed.
    """
    override = os.environ.get(OMSI_PYTHON_ENV)
    if override:
        path = Path(override)
        if not path.exists():
            raise FileNotFoundError(f"${OMSI_PYTHON_ENV} names {path}, which does not exist")
        return path
    python = venv / "bin" / "python"
    stamp = venv / STAMP_NAME
    wanted = _wanted_stamp()
    if python.exists() and stamp.exists() and stamp.read_text().strip() == wanted:
        return python
    if not quiet:
        print(f"creating {venv} with {OMSI_REQUIREMENT} (once)", file=sys.stderr, flush=True)
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            OMSI_REQUIREMENT,
        ],
        check=True,
        timeout=PIP_TIMEOUT_S,
    )
    subprocess.run([str(python), "-c", "import openmsistream"], check=True, timeout=120)
    stamp.write_text(wanted + "\n")
    return python


def main() -> int:
    """Create (or check) the venv and print its interpreter."""
    print(ensure_openmsistream_python())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
