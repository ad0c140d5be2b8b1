"""The notification automations of `up --notify-url/--notify-block`, without a server."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from msi_prefect.cli.main import build_parser
from msi_prefect.errors import MsiError
from msi_prefect.stack.deploy import PROJECT_DIR
from msi_prefect.stack.notifications import (
    AUTOMATION_NAME_PREFIX,
    REMEMBERED_TARGET_FILE,
    SEND_NOTIFICATION,
    NotificationTarget,
    load_automation_specs,
    remember_block,
    remembered_target,
    validate_block_reference,
    validate_notify_url,
)

KINDS = {
    "msi: file rejected",
    "msi: downstream run failed",
    "msi: backup missing",
    "msi: transfer stopped",
}


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:8080/hook", "https://hooks.slack.com/services/T0/B0/x", "http://[::1]/h"],
)
def test_webhook_urls_are_accepted(url: str) -> None:
    assert validate_notify_url(url) == url


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("hooks.slack.com/services/x", "http:// or https://"),
        ("ftp://example.org/x", "http:// or https://"),
        ("http:///path-only", "names no host"),
        ("http://host:99999/x", "port"),
        ("http://host/a b", "spaces"),
        ("", "not a URL"),
    ],
)
def test_malformed_webhook_urls_are_refused_with_the_reason(url: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        validate_notify_url(url)


def test_block_references_are_type_and_name() -> None:
    assert validate_block_reference("slack-webhook/lab-channel") == "slack-webhook/lab-channel"
    for bad in ("lab-channel", "Slack/x", "slack-webhook/", "/x", "a/b/c"):
        with pytest.raises(ValueError, match="TYPE/NAME"):
            validate_block_reference(bad)


def test_a_target_is_a_url_or_a_block() -> None:
    with pytest.raises(ValueError, match="either"):
        NotificationTarget()
    with pytest.raises(ValueError, match="either"):
        NotificationTarget(webhook_url="http://x/h", block="custom-webhook/x")


def test_up_refuses_a_malformed_notify_url_before_starting_anything(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["up", "--notify-url", "slack.example/hook"])
    assert exit_info.value.code == 2
    assert "--notify-url: 'slack.example/hook': a webhook URL starts with" in (
        capsys.readouterr().err
    )
    with pytest.raises(SystemExit):
        build_parser().parse_args(
            ["up", "--notify-url", "http://x/h", "--notify-block", "custom-webhook/x"]
        )


def test_every_spec_is_a_valid_prefect_automation_sending_through_the_block() -> None:
    from prefect.server.events.schemas.automations import AutomationCore

    specs = load_automation_specs(PROJECT_DIR)
    assert {spec.name for spec in specs} == KINDS
    block_id = "4c1f6a4e-0b0e-4a43-9d6f-6f0f3c1b2a11"
    for spec in specs:
        assert spec.name.startswith(AUTOMATION_NAME_PREFIX)
        body = spec.with_block(block_id)
        automation = AutomationCore.model_validate(body)  # templates and trigger checked
        notifications = [a for a in automation.actions if a.type == SEND_NOTIFICATION]
        assert notifications, spec.source
        assert all(str(a.block_document_id) == block_id for a in notifications)  # type: ignore[union-attr]


def test_a_spec_without_its_parts_is_refused_by_name(tmp_path: Path) -> None:
    folder = tmp_path / "deployments" / "automations"
    folder.mkdir(parents=True)
    (folder / "broken.yaml").write_text("name: 'msi: broken'\n")
    with pytest.raises(MsiError, match=r"broken\.yaml: an automation needs"):
        load_automation_specs(tmp_path)


def _render(spec_name: str, context: dict[str, Any]) -> tuple[str, str]:
    """A spec's subject and body, rendered the way the server's actions service does."""
    from prefect.server.events.jinja_filters import all_filters
    from prefect.server.utilities.user_templates import (
        register_user_template_filters,
        render_user_template_sync,
    )

    register_user_template_filters(all_filters)
    (spec,) = [s for s in load_automation_specs(PROJECT_DIR) if s.name == spec_name]
    (action,) = spec.body["actions"]
    return (
        render_user_template_sync(action["subject"], context),
        render_user_template_sync(action["body"], context),
    )


def test_a_failed_batch_run_names_each_of_its_files() -> None:
    run = SimpleNamespace(
        name="process 2 files: a.dat, ...",
        parameters={
            "files": [
                {"path": "a.dat", "topic": "lab", "generation": 1},
                {"path": "run7/b.dat", "topic": "lab", "generation": 2},
            ]
        },
        state=SimpleNamespace(name="Failed", message="the backup store refused"),
    )
    context = {"flow_run": run, "flow": SimpleNamespace(name="process-batch")}
    subject, body = _render("msi: downstream run failed", context)
    assert subject == "msi-prefect: process-batch failed: process 2 files: a.dat, ..."
    assert "ended Failed: the backup store refused" in body
    assert "- path: a.dat (topic lab, generation 1)" in body
    assert "- path: run7/b.dat (topic lab, generation 2)" in body
    assert "path: a.dat\n" not in body  # the per-file lines are for per-file runs


def test_a_rejected_message_without_a_path_or_run_still_renders() -> None:
    event = SimpleNamespace(
        payload={
            "path": "",
            "topic": "lab",
            "generation": None,
            "reason": "not ours",
            "reason_code": "not-msi",
        }
    )
    subject, body = _render("msi: file rejected", {"event": event, "flow_run": None})
    assert subject == "msi-prefect: file rejected: unknown path"
    assert "what: rejected (not-msi): not ours" in body
    assert "run: none" in body


def test_the_block_is_remembered_for_later_ups_but_no_url(tmp_path: Path) -> None:
    assert remembered_target(tmp_path) is None
    remember_block(tmp_path, "custom-webhook/msi-notify")
    assert remembered_target(tmp_path) == NotificationTarget(block="custom-webhook/msi-notify")
    assert "http" not in (tmp_path / REMEMBERED_TARGET_FILE).read_text()
    (tmp_path / REMEMBERED_TARGET_FILE).write_text('{"url": "x"}')
    with pytest.raises(MsiError, match="does not name a notification block"):
        remembered_target(tmp_path)


def test_notify_without_the_prefect_server_is_refused_before_anything_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from msi_prefect.cli.main import main

    state = tmp_path / "state"
    argv = ["--state-dir", str(state), "up", "--only", "s3", "--notify-url", "http://x/h"]
    assert main(argv) == 1
    assert "need the Prefect server" in capsys.readouterr().err
    assert not list((state / "run").glob("*.pid")) if (state / "run").exists() else True
