"""A forked run's Prefect settings, built once per distinct set of inputs, not once per run.

A forked child first rebuilds Prefect's settings from its run's environment
(``refresh_global_settings_context``): every settings model parsed again from the
environment and the settings files, about 40 ms of CPU and the largest single item left
between a run's fork and its first request (profiled). Yet the runs of one worker mostly
start with the same inputs: the worker's environment and the deployment's folder; what
differs from run to run (``PREFECT__FLOW_RUN_ID``, the control port and token, the
entrypoint) is not a setting.

So the warm server, once it has forked a child, builds the settings for that child's inputs
itself (:meth:`RunSettings.learn`), and a later child whose inputs are the same takes them
(:meth:`RunSettings.apply`) instead of building its own. Inputs are everything Prefect's
settings are read from: the ``PREFECT_*`` environment (and ``HOME``, which places the
profiles), the working folder and the files Prefect reads there (``.env``,
``prefect.toml``, ``pyproject.toml``) and the profiles files, the files by modification
time, size and inode. Any difference, and the child builds its own as before.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from msi_prefect.warm_start.prewarm import file_signature

if TYPE_CHECKING:
    from prefect.context import SettingsContext

logger = logging.getLogger("msi_prefect.warm_start")

#: Environment names Prefect's settings are read from (compared upper-case: Prefect's
#: settings are not case-sensitive).
SETTINGS_ENV_PREFIX = "PREFECT_"
#: Prefect's per-run variables (``PREFECT__FLOW_RUN_ID`` ...): no setting has this prefix.
PER_RUN_ENV_PREFIX = "PREFECT__"
#: Other environment that settings depend on (the default home is under it).
OTHER_SETTINGS_ENV = ("HOME",)
#: Files in the working folder that Prefect's settings are read from.
FOLDER_SETTINGS_FILES = (".env", "prefect.toml", "pyproject.toml")


@dataclass(frozen=True)
class SettingsInputs:
    """What a process's Prefect settings are built from, comparable between runs."""

    environment: tuple[tuple[str, str], ...]
    directory: str
    files: tuple[tuple[str, tuple[int, int, int] | None], ...]

    @classmethod
    def of(cls, env: Mapping[str, str], directory: str) -> SettingsInputs:
        """The inputs of a process with environment ``env`` working in ``directory``."""
        environment = tuple(
            sorted(
                (name, value)
                for name, value in env.items()
                if name in OTHER_SETTINGS_ENV
                or (
                    name.upper().startswith(SETTINGS_ENV_PREFIX)
                    and not name.upper().startswith(PER_RUN_ENV_PREFIX)
                )
            )
        )
        folder = Path(directory)
        paths = [folder / name for name in FOLDER_SETTINGS_FILES]
        paths.extend(_profiles_files(env))
        files = tuple((str(path), file_signature(path)) for path in paths)
        return cls(environment, directory, files)


def _profiles_files(env: Mapping[str, str]) -> list[Path]:
    """The profiles files settings may read: Prefect's defaults and the configured one."""
    from prefect.settings import DEFAULT_PROFILES_PATH, get_current_settings

    paths = [Path(DEFAULT_PROFILES_PATH)]
    configured = get_current_settings().profiles_path
    if configured is not None:
        paths.append(Path(configured))
    if named := env.get("PREFECT_PROFILES_PATH"):
        paths.append(Path(named))
    if home := env.get("PREFECT_HOME"):
        paths.append(Path(home) / "profiles.toml")
    return paths


@contextlib.contextmanager
def _process_environment(env: Mapping[str, str], directory: str) -> Iterator[None]:
    """Run with ``env`` as the environment and ``directory`` as the working folder."""
    saved_env = dict(os.environ)
    saved_directory = os.getcwd()
    os.environ.clear()
    os.environ.update(env)
    try:
        os.chdir(directory)
        yield
    finally:
        os.chdir(saved_directory)
        os.environ.clear()
        os.environ.update(saved_env)


class RunSettings:
    """The settings context built for the last distinct inputs the warm server saw."""

    def __init__(self, enabled: bool = True) -> None:
        self._enabled = enabled
        self._inputs: SettingsInputs | None = None
        self._context: SettingsContext | None = None

    def learn(self, env: Mapping[str, str], directory: str) -> None:
        """In the server, after a fork: build the settings for these inputs, unless known.

        A failure is logged and forgets what was known: children then build their own.
        """
        if not self._enabled:
            return
        try:
            inputs = SettingsInputs.of(env, directory)
            if inputs == self._inputs:
                return
            from prefect.context import root_settings_context

            with _process_environment(env, directory):
                context = root_settings_context()
        except Exception:
            logger.exception("warm start: could not build a run's settings; runs build their own")
            self._inputs = self._context = None
            return
        self._inputs, self._context = inputs, context

    def apply(self) -> bool:
        """In the child, with its environment and folder set: take the settings built already
        for the same inputs, or build them as Prefect does. Whether they were taken."""
        import prefect.context

        if self._context is not None and self._inputs == SettingsInputs.of(os.environ, os.getcwd()):
            prefect.context.GLOBAL_SETTINGS_CONTEXT = self._context
            return True
        prefect.context.refresh_global_settings_context()
        return False
