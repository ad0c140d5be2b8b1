"""Notify people when a file or a transfer needs attention: `msi-prefect up --notify-...`.

The notices are Prefect automations whose action is Prefect's own ``send-notification``
through a notification block. Their specs are YAML files in ``deployments/automations/``
(one automation each, in the JSON shape of Prefect's ``POST /automations/`` without the
block); this module picks the block, fills it into every ``send-notification`` action and
creates or updates each automation by name, so `up` run again changes nothing twice.

The block is either one the user saved already (``--notify-block TYPE/NAME``, e.g. a
``slack-webhook`` or ``ms-teams-webhook`` document made in the UI), or a Prefect
``CustomWebhookNotificationBlock`` that `up` saves as :data:`WEBHOOK_BLOCK_NAME` for
``--notify-url URL``: a JSON ``POST`` with ``subject``, ``body`` and ``text`` (the two
joined, what Slack's and Mattermost's incoming webhooks show).

The templates render only what the events and runs say about a file (path, topic,
generation, reason, run name, state message, UI link); no block, credential or setting
of the stack is in them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from msi_prefect.errors import MsiError
from msi_prefect.stack.prefect_api import checked, request

#: The folder of the project holding one automation spec per file.
AUTOMATIONS_FOLDER = Path("deployments") / "automations"
#: The block `up --notify-url` saves (a Custom Webhook).
WEBHOOK_BLOCK_TYPE = "custom-webhook"
WEBHOOK_BLOCK_NAME = "msi-notify"
#: The automations this project manages are the ones whose name starts with this.
AUTOMATION_NAME_PREFIX = "msi: "
SEND_NOTIFICATION = "send-notification"
WEBHOOK_SCHEMES = ("http", "https")
#: Seconds the server's notification request may take.
WEBHOOK_TIMEOUT_S = 10.0
#: In the state dir: the block the notices go through, so a later `up` applies the
#: automations again (after an upgrade changed them) without the option. Only the block's
#: name: a webhook URL can hold a token, and the block on the server keeps it.
REMEMBERED_TARGET_FILE = "notifications.json"
#: ``TYPE/NAME``: a block type slug and a block document name.
_BLOCK_REF_RE = re.compile(r"[a-z0-9][a-z0-9-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def validate_notify_url(url: str) -> str:
    """Check a webhook URL given to ``--notify-url``.

    Args:
        url: The URL, e.g. ``https://hooks.slack.com/services/...`` or
            ``http://127.0.0.1:8080/hook``.

    Returns:
        The URL, unchanged.

    Raises:
        ValueError: It is not an absolute ``http``/``https`` URL with a host.
    """
    if not url or any(char.isspace() for char in url):
        raise ValueError(f"{url!r} is not a URL (empty, or it contains spaces)")
    parts = urlsplit(url)
    if parts.scheme not in WEBHOOK_SCHEMES:
        raise ValueError(f"{url!r}: a webhook URL starts with http:// or https://")
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"{url!r}: the port is not a number from 0 to 65535") from exc
    if not parts.hostname:
        raise ValueError(f"{url!r}: the URL names no host")
    del port
    return url


def validate_block_reference(reference: str) -> str:
    """Check a block given to ``--notify-block``: ``TYPE/NAME`` (``slack-webhook/lab``).

    Raises:
        ValueError: It is not a block type slug and a document name joined by ``/``.
    """
    if not _BLOCK_REF_RE.fullmatch(reference):
        raise ValueError(
            f"{reference!r}: name the block as TYPE/NAME, its type's slug and its name, "
            "e.g. slack-webhook/lab-channel or custom-webhook/msi-notify"
        )
    return reference


@dataclass(frozen=True)
class NotificationTarget:
    """Where the notices go: a webhook URL `up` saves as a block, or a saved block.

    Attributes:
        webhook_url: ``--notify-url``: saved as the block :data:`WEBHOOK_BLOCK_NAME`.
        block: ``--notify-block``: ``TYPE/NAME`` of a notification block saved already.
    """

    webhook_url: str | None = None
    block: str | None = None

    def __post_init__(self) -> None:
        if (self.webhook_url is None) == (self.block is None):
            raise ValueError("give either a webhook URL or a block, not both or none")
        if self.webhook_url is not None:
            validate_notify_url(self.webhook_url)
        if self.block is not None:
            validate_block_reference(self.block)


@dataclass(frozen=True)
class AutomationSpec:
    """One automation of ``deployments/automations``.

    Attributes:
        source: The file it was read from.
        body: The automation as Prefect's API takes it, without the block id.
    """

    source: Path
    body: dict[str, Any]

    @property
    def name(self) -> str:
        """The automation's name (unique among the project's automations)."""
        return str(self.body["name"])

    def with_block(self, block_document_id: str | None) -> dict[str, Any]:
        """The automation with every ``send-notification`` action sending through a block.

        With None, the actions stay as they are (for automations that notify no one).
        """
        actions = [
            {**action, "block_document_id": block_document_id}
            if action.get("type") == SEND_NOTIFICATION and block_document_id is not None
            else action
            for action in self.body.get("actions", [])
        ]
        return {
            "actions_on_trigger": [],
            "actions_on_resolve": [],
            **self.body,
            "actions": actions,
        }


def remember_block(state_root: Path, reference: str) -> None:
    """Keep the block the notices go through for later `up`s of this state dir."""
    target = state_root / REMEMBERED_TARGET_FILE
    target.write_text(json.dumps({"block": validate_block_reference(reference)}) + "\n")


def remembered_target(state_root: Path) -> NotificationTarget | None:
    """The notification block an earlier `up` of this state dir set up, or None.

    Raises:
        MsiError: The file is there but does not name a block.
    """
    source = state_root / REMEMBERED_TARGET_FILE
    if not source.is_file():
        return None
    try:
        return NotificationTarget(block=json.loads(source.read_text())["block"])
    except (ValueError, KeyError, TypeError) as exc:
        raise MsiError(f"{source} does not name a notification block ({exc}); remove it") from exc


def load_automation_specs(project: Path, folder: Path = AUTOMATIONS_FOLDER) -> list[AutomationSpec]:
    """Read every automation spec of a project's ``folder``, sorted by file name.

    Raises:
        MsiError: The folder is missing, or a file is not a valid spec (named).
    """
    import yaml

    folder = project / folder
    if not folder.is_dir():
        raise MsiError(f"no automation specs in {folder}")
    specs = []
    for path in sorted(folder.glob("*.yaml")):
        try:
            body = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise MsiError(f"{path} is not valid YAML: {exc}") from exc
        if not isinstance(body, dict) or not {"name", "trigger", "actions"} <= body.keys():
            raise MsiError(f"{path}: an automation needs name, trigger and actions")
        if not str(body["name"]).startswith(AUTOMATION_NAME_PREFIX):
            raise MsiError(
                f"{path}: the automation's name must start with {AUTOMATION_NAME_PREFIX!r}"
            )
        specs.append(AutomationSpec(source=path, body=body))
    return specs


def save_webhook_block(api_url: str, webhook_url: str) -> None:
    """Save (or overwrite) the Custom Webhook block :data:`WEBHOOK_BLOCK_NAME`.

    Args:
        api_url: The Prefect API to save it on.
        webhook_url: Where its notices are POSTed, as JSON.
    """
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.settings import PREFECT_API_URL, temporary_settings

    block = CustomWebhookNotificationBlock(
        name=WEBHOOK_BLOCK_NAME,
        url=webhook_url,
        method="POST",
        json_data={"subject": "{{subject}}", "body": "{{body}}", "text": "{{subject}}\n{{body}}"},
        headers=None,
        cookies=None,
        timeout=WEBHOOK_TIMEOUT_S,
    )
    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        block.save(WEBHOOK_BLOCK_NAME, overwrite=True)


def block_document_id(client: Any, reference: str) -> str:
    """The id of a saved notification block, ``TYPE/NAME``.

    Raises:
        MsiError: No such block on the server.
    """
    block_type, name = reference.split("/", 1)
    what = f"looking up the block {reference}"
    found = request(
        client, "GET", f"/block_types/slug/{block_type}/block_documents/name/{name}", what
    )
    if found.status_code == HTTPStatus.NOT_FOUND:
        raise MsiError(
            f"no block {reference} on the Prefect server; save it first (in the UI: Blocks → "
            "Add, e.g. a Slack or Custom Webhook) or give --notify-url"
        )
    return str(checked(found, what).json()["id"])


def apply_automations(client: Any, specs: list[AutomationSpec], block_id: str | None) -> list[str]:
    """Create each automation, or update the one of the same name.

    Args:
        client: An ``httpx.Client`` on the Prefect API.
        specs: The automations to apply.
        block_id: The notification block their notices go through (None: they send none).

    Returns:
        The names of the automations created or updated.
    """
    what = "applying the automations"
    existing = checked(request(client, "POST", "/automations/filter", what, json={}), what).json()
    by_name = {automation["name"]: automation["id"] for automation in existing}
    applied = []
    for spec in specs:
        body = spec.with_block(block_id)
        if spec.name in by_name:
            checked(
                request(client, "PUT", f"/automations/{by_name[spec.name]}", what, json=body), what
            )
        else:
            checked(request(client, "POST", "/automations/", what, json=body), what)
        applied.append(spec.name)
    return applied


def set_up_notifications(
    api_url: str, project: Path, target: NotificationTarget, state_root: Path | None = None
) -> list[str]:
    """Save the webhook block if asked to and apply the project's automations with it.

    Args:
        api_url: The stack's Prefect API.
        project: The project folder holding ``deployments/automations``.
        target: Where the notices go.
        state_root: The stack's state dir: the block is remembered there
            (:data:`REMEMBERED_TARGET_FILE`) once the automations are applied.

    Returns:
        The names of the automations applied.

    Raises:
        MsiError: A spec is invalid, the block is missing, or the API refused.
    """
    import httpx

    specs = load_automation_specs(project)
    if target.webhook_url is not None:
        save_webhook_block(api_url, target.webhook_url)
    reference = target.block or f"{WEBHOOK_BLOCK_TYPE}/{WEBHOOK_BLOCK_NAME}"
    with httpx.Client(base_url=api_url) as client:
        applied = apply_automations(client, specs, block_document_id(client, reference))
    if state_root is not None:
        remember_block(state_root, reference)
    return applied
