"""Mark a run Crashed when its process or machine died, without waiting for `up`.

Every flow run the stack's worker starts sends a ``prefect.flow-run.heartbeat`` event
every :data:`~msi_prefect.stack.components.FLOW_RUN_HEARTBEAT_S` seconds (Prefect's
``PREFECT_FLOWS_HEARTBEAT_FREQUENCY``, set in the worker's environment). A run whose
process was killed, or whose machine lost power, sends none any more and stays Running.
The automation ``msi: crash unresponsive runs`` (``deployments/stack-automations/``), a
proactive trigger of Prefect's, sets such a run ``CRASHED`` once no heartbeat and no final
state followed the last heartbeat for :data:`MISSED_HEARTBEATS` heartbeats; the
``rerun-crashed`` trigger then runs a downstream run again. `up` applies it every time,
with or without notifications (creating it, or updating the one of its name).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from msi_prefect.stack.components import FLOW_RUN_HEARTBEAT_S, HEARTBEAT_ENV, worker_tuning
from msi_prefect.stack.notifications import AutomationSpec, apply_automations, load_automation_specs

#: The project's folder of the automations every `up` applies.
STACK_AUTOMATIONS_FOLDER = Path("deployments") / "stack-automations"
#: A run is marked Crashed after this many heartbeat periods without one (300 s at 30 s).
#: Not two or three: a heartbeat the server takes in after the window crashes a run that
#: is alive (a live transfer marked Crashed would be started a second time by the next
#: `up`). The server takes in events late under a burst of files (bench/RESULTS.md), and a
#: run's heartbeats sent while the server is away (a restart: the chaos tests stop it for
#: 60 s) arrive when its events client reconnects.
MISSED_HEARTBEATS = 10
#: Prefect's smallest heartbeat frequency (its settings refuse less).
MIN_HEARTBEAT_S = 30
HEARTBEAT_EVENT = "prefect.flow-run.heartbeat"


def heartbeat_s(environ: Mapping[str, str] | None = None) -> int:
    """The heartbeat frequency the stack's worker gives its runs (the caller's env wins)."""
    raw = worker_tuning(environ).get(HEARTBEAT_ENV, str(FLOW_RUN_HEARTBEAT_S))
    try:
        return max(int(raw), MIN_HEARTBEAT_S)
    except ValueError:
        return FLOW_RUN_HEARTBEAT_S


def unresponsive_after_s(frequency_s: int) -> int:
    """Seconds after a run's last heartbeat that it is marked Crashed."""
    return MISSED_HEARTBEATS * frequency_s


def load_stack_automations(project: Path, frequency_s: int) -> list[AutomationSpec]:
    """The project's stack automations, a heartbeat trigger's window fitted to the frequency.

    Raises:
        MsiError: The folder is missing, or a file is not a valid spec.
    """
    specs = []
    for spec in load_automation_specs(project, STACK_AUTOMATIONS_FOLDER):
        trigger: dict[str, Any] = spec.body["trigger"]
        if HEARTBEAT_EVENT in trigger.get("after", []):
            trigger = {**trigger, "within": unresponsive_after_s(frequency_s)}
        specs.append(AutomationSpec(source=spec.source, body={**spec.body, "trigger": trigger}))
    return specs


def apply_stack_automations(api_url: str, project: Path, frequency_s: int) -> list[str]:
    """Create or update the stack's own automations (no notification block needed).

    Returns:
        The names of the automations applied.

    Raises:
        MsiError: A spec is invalid.
        PrefectApiError: The API did not answer in time, or refused.
    """
    import httpx

    specs = load_stack_automations(project, frequency_s)
    with httpx.Client(base_url=api_url) as client:
        return apply_automations(client, specs, None)
