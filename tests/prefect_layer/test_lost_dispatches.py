"""The downstream runs a dying Prefect server was told to start and never did (no server)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from msi_prefect.prefect_layer.dispatch.mode import BATCH_FLOW, PER_FILE_FLOWS
from msi_prefect.prefect_layer.events import (
    REBUILT_FILE_FIELDS,
    batch_event,
    facts_of,
    from_reassembler,
)
from msi_prefect.prefect_layer.lost_dispatches import (
    LOST_DISPATCH_WINDOW_S,
    DispatchingEvent,
    expected_dispatches,
    missing_dispatches,
    previous_life_events,
)

START = datetime(2026, 12, 5, 19, 30, 48, tzinfo=UTC)


def _file(name: str, generation: int = 1) -> dict[str, Any]:
    return {
        "topic": "lab-files",
        "file_id": name.encode().hex()[:32].ljust(32, "0"),
        "generation": generation,
        "path": name,
        "url": f"file:///data/{name}",
        "size": 1170232,
        "sha256": "1d" * 32,
    }


def _event(
    payload: dict[str, Any],
    name: str = "msi.file.reconstructed",
    dispatch: str = "per-file",
    received: datetime = START - timedelta(seconds=0.3),
) -> DispatchingEvent:
    return DispatchingEvent.from_json(
        {
            "id": f"e40b220e-7149-5029-9d2d-{abs(hash((name, str(payload)))) % 10**12:012d}",
            "event": name,
            "resource": {"prefect.resource.id": "msi.file.x", "msi.dispatch": dispatch},
            "occurred": (received - timedelta(seconds=0.05)).isoformat(),
            "received": received.isoformat(),
            "payload": payload,
        }
    )


def _batch(files: list[dict[str, Any]], **kwargs: Any) -> DispatchingEvent:
    return _event(
        {"topic": "lab-files", "files": files}, "msi.files.batch-ready", "batch", **kwargs
    )


def test_the_run_a_power_cut_kept_from_starting_is_started_and_only_that_one() -> None:
    # As in the failed CI run: the cut came 0.3 s after the server stored cut-0004.bin's
    # event; its analyze-file and backup-file runs existed (crashed, then re-run with the
    # same parameters), its extract-metadata run never did.
    cut = _event(_file("cut-0004.bin"))
    others = [_file(f"cut-000{n}.bin") for n in (0, 1, 2, 3)]
    batch = _batch(others, received=START - timedelta(seconds=20))
    file_parameters = {field: cut.payload[field] for field in REBUILT_FILE_FIELDS}
    runs = [
        ("analyze-file", file_parameters),
        ("backup-file", {**file_parameters, "trigger_event_id": cut.id}),
        ("analyze-file", file_parameters),  # the re-run of the crashed one
        (BATCH_FLOW, {"files": others}),
    ]

    (missing,) = missing_dispatches([cut, batch], runs)

    assert missing.flow == "extract-metadata" and missing.event_id == cut.id
    assert missing.parameters == {**file_parameters, "announced_at": str(cut.occurred)}
    assert missing.idempotency_key == f"msi.lost-dispatch:{cut.id}:extract-metadata"
    # Once started (a run of the deployment with the file), nothing is missing any more.
    assert missing_dispatches([cut, batch], [*runs, (missing.flow, missing.parameters)]) == []


def test_a_batch_is_covered_only_by_runs_that_hold_every_file_of_it() -> None:
    files = [_file("a.bin"), _file("b.bin"), _file("c.bin", generation=2)]
    batch = _batch(files)
    older_generation = {"files": [files[0], files[1], {**files[2], "generation": 1}]}
    partial_runs = [
        (BATCH_FLOW, {"files": files[:2]}),  # c.bin is in no run
        (BATCH_FLOW, older_generation),
    ]

    (missing,) = missing_dispatches([batch], partial_runs)

    assert missing.flow == BATCH_FLOW and missing.parameters["files"] == files
    assert missing_dispatches([batch], [*partial_runs, (BATCH_FLOW, {"files": files})]) == []


def test_only_the_dispatching_events_of_the_previous_server_are_checked() -> None:
    per_file = _event(_file("old.bin"))
    in_a_batch = _event(_file("batched.bin"), dispatch="batch")  # starts nothing itself
    # Posted again by an outbox to the restarted server: its triggers act on it.
    after_start = _event(_file("late.bin"), received=START + timedelta(seconds=5))
    long_before = _event(
        _file("older.bin"), received=START - timedelta(seconds=LOST_DISPATCH_WINDOW_S + 10)
    )
    window_edge = _event(
        _file("edge.bin"), received=START - timedelta(seconds=LOST_DISPATCH_WINDOW_S - 10)
    )

    checked = previous_life_events(
        [long_before, in_a_batch, after_start, per_file, window_edge], START
    )

    assert checked == [per_file, window_edge]
    assert expected_dispatches(in_a_batch) == []
    assert previous_life_events([after_start], START) == []


def test_the_parameters_are_the_ones_the_triggers_of_prefect_yaml_render() -> None:
    import jinja2
    import yaml

    from tests.flow_helpers import REPO
    from tests.prefect_layer.test_events import _rebuilt

    facts = facts_of(from_reassembler(_rebuilt()))
    per_file = _event(dict(facts.parameters()))
    batch = _batch(list(batch_event("lab", [facts]).payload["files"]))
    project = yaml.safe_load((REPO / "prefect.yaml").read_text())
    rendered: dict[str, dict[str, str]] = {}
    for deployment in project["deployments"]:
        for trigger in deployment.get("triggers", []):
            expect = set(trigger.get("expect", []))
            if not expect & {"msi.file.reconstructed", "msi.files.batch-ready"}:
                continue
            event = per_file if "msi.file.reconstructed" in expect else batch
            context = {
                "id": event.id,
                "occurred": event.occurred,
                "payload": dict(event.payload),
            }
            rendered[deployment["name"]] = {
                name: jinja2.Template(template).render(event=context)
                for name, template in trigger["parameters"].items()
            }

    assert set(rendered) == {*PER_FILE_FLOWS, BATCH_FLOW}
    ours = {
        dispatch.flow: {name: str(value) for name, value in dispatch.parameters.items()}
        for event in (per_file, batch)
        for dispatch in expected_dispatches(event)
    }
    assert ours == rendered


def test_the_sweeps_up_starts_pass_the_server_start_as_the_flow_names_it() -> None:
    import inspect

    from msi_prefect.stack.deploy import SERVER_STARTED_AT_PARAMETER
    from tests.flow_helpers import load_flow

    sweep = load_flow("flows/rerun_crashed.py:rerun_crashed_flow")
    assert SERVER_STARTED_AT_PARAMETER in inspect.signature(sweep.fn).parameters
