"""The worker's Prefect settings as environment variables, computed once per settings object.

Prefect's worker turns its settings into environment variables twice for every run it
starts: for the job configuration (``BaseJobConfiguration._base_environment``) and again for
the process (``EngineCommandStarter.start``). ``Settings.to_environment_variables`` dumps
every nested settings model at every level, about 18 ms of CPU a call here: a third of the
worker's CPU, on each run's path from Pending to its process (py-spy of the worker, one
file every 5 s, 2026-12-06). The settings do not change between runs: Prefect makes a new
settings object for every change (``copy_with_update``, ``temporary_settings``) and never
changes one in place.

:func:`remember_settings_environment` makes ``to_environment_variables`` of the root
settings class answer again from its last answer for the same settings object and the
same arguments; every caller gets its own copy of the dictionary.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from msi_prefect.warm_start.patching import library_original, put_in_place

logger = logging.getLogger("msi_prefect.warm_start")


@dataclass(frozen=True)
class _Answer:
    # The settings object itself, not its id: an id can be reused once an object is gone.
    settings: Any
    arguments: tuple[bool, bool, bool]
    environment: dict[str, str]


def remember_settings_environment() -> bool:
    """Let Prefect's root settings reuse their last environment (see the module docstring).

    Returns False (and changes nothing) when Prefect's settings are not as expected.
    """
    try:
        from prefect.settings import Settings
    except ImportError:
        return False
    compute = library_original(Settings, "to_environment_variables")
    if compute is None:
        return False
    last: _Answer | None = None

    def to_environment_variables(
        self: Any,
        exclude_unset: bool = False,
        include_secrets: bool = True,
        include_aliases: bool = False,
    ) -> dict[str, str]:
        nonlocal last
        arguments = (exclude_unset, include_secrets, include_aliases)
        if last is not None and last.settings is self and last.arguments == arguments:
            return dict(last.environment)
        environment = compute(self, *arguments)
        last = _Answer(self, arguments, dict(environment))
        return environment

    put_in_place(Settings, "to_environment_variables", to_environment_variables, compute)
    return True
