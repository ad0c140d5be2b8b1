"""The stack's heartbeats and its automation that crashes unresponsive runs, without a server."""

from __future__ import annotations

from msi_prefect.stack.components import FLOW_RUN_HEARTBEAT_S, HEARTBEAT_ENV, worker_tuning
from msi_prefect.stack.deploy import PROJECT_DIR
from msi_prefect.stack.unresponsive_runs import (
    HEARTBEAT_EVENT,
    MISSED_HEARTBEATS,
    heartbeat_s,
    load_stack_automations,
)


def test_the_worker_gives_its_runs_a_heartbeat_and_the_callers_value_wins() -> None:
    assert worker_tuning({})[HEARTBEAT_ENV] == str(FLOW_RUN_HEARTBEAT_S)
    assert worker_tuning({HEARTBEAT_ENV: "60"})[HEARTBEAT_ENV] == "60"
    assert heartbeat_s({}) == FLOW_RUN_HEARTBEAT_S
    assert heartbeat_s({HEARTBEAT_ENV: "60"}) == 60
    assert heartbeat_s({HEARTBEAT_ENV: "5"}) == 30  # Prefect's minimum
    assert heartbeat_s({HEARTBEAT_ENV: "often"}) == FLOW_RUN_HEARTBEAT_S


def test_the_automation_is_a_valid_proactive_heartbeat_trigger_that_crashes_the_run() -> None:
    from prefect.server.events.schemas.automations import AutomationCore, EventTrigger, Posture

    (spec,) = load_stack_automations(PROJECT_DIR, 45)
    automation = AutomationCore.model_validate(spec.with_block(None))
    trigger = automation.trigger
    assert isinstance(trigger, EventTrigger)
    assert trigger.posture == Posture.Proactive
    assert trigger.after == {HEARTBEAT_EVENT}
    assert {HEARTBEAT_EVENT, "prefect.flow-run.Completed", "prefect.flow-run.Crashed"} <= (
        trigger.expect
    )
    assert trigger.for_each == {"prefect.resource.id"}
    assert trigger.within.total_seconds() == MISSED_HEARTBEATS * 45
    (action,) = automation.actions
    assert action.type == "change-flow-run-state"
    assert action.state.value == "CRASHED"  # type: ignore[union-attr]
    assert action.message  # type: ignore[union-attr]
