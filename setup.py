"""Build hook: the wheel carries the project's deployment files as ``msi_prefect/project``.

The top-level ``prefect.yaml``, ``flows/``, ``deployments/`` and ``blocks/`` of this
repository (the design card's layout) are the one source. A wheel copies them into the
package, so ``msi-prefect up`` deploys the same flows from an install as from a checkout
(``msi_prefect/stack/project.py`` finds them). An editable install needs no copy: the
package then finds them in the checkout. ``tests/stack/test_install.py`` checks that a
built wheel holds every one of them, byte for byte.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).parent
# The project files, relative to the repository and to msi_prefect/project in the wheel.
PROJECT_FILES = ("prefect.yaml", "flows", "deployments", "blocks")
PROJECT_PACKAGE_DIR = Path("msi_prefect") / "project"
SKIPPED = shutil.ignore_patterns("__pycache__", "*.pyc", ".*")


class BuildPyWithProject(build_py):
    """``build_py`` that also copies the project files into the package."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = Path(self.build_lib) / PROJECT_PACKAGE_DIR
        for name in PROJECT_FILES:
            source = HERE / name
            if source.is_dir():
                shutil.copytree(source, target / name, ignore=SKIPPED, dirs_exist_ok=True)
            else:
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target / name)


setup(cmdclass={"build_py": BuildPyWithProject})
