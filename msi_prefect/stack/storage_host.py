"""A storage host's own rebuilder: the ``reconstruct-files/<host>`` deployment its worker keeps.

A facility scales the storage side by adding storage hosts, each running one rebuilder in
the topic's consumer group. The ``reconstruct-files`` deployment of ``prefect.yaml`` has a
concurrency limit of 1 (``CANCEL_NEW``, so that ``msi-prefect up`` never starts a second
transfer), and one staging folder, so it cannot be run once per host. Instead,
``msi-prefect worker --role storage`` registers, through the Prefect API, a deployment of
the same flow for its host:

* named ``reconstruct-files/<host>``, copied from the deployment ``prefect deploy --all``
  made (``reconstruct-files/reconstruct-files``: its entrypoint, pull steps, parameter
  schema and parameters, the blocks and destination among them), so ``prefect.yaml`` stays
  the one description of the flow;
* with the host's own work folder (``WORK_DIR/rebuild``: progress store, staging files,
  outboxes) as ``work_dir`` and, if given, the host's destination;
* on a work queue of its own in the storage pool (named after the host), which only that
  host's worker polls, so the run lands on the host whose folder it names;
* with its own concurrency limit of 1, ``CANCEL_NEW``: one rebuilder per host, whatever
  starts it.

Each host's progress store holds what that host delivered, so the worker also copies
``audit-backups`` into ``audit-backups/<host>`` (the host's work folder as ``work_dir``, its
queue, the template's schedules) and pauses the template, which knows no host's work
folder. Registering is an upsert (``POST /deployments/`` replaces a deployment of the same
flow and name), so a worker that starts again changes nothing. The worker then marks crashed
the host's runs that Prefect still holds active but whose process is gone (a power cut,
``kill -9`` of the worker's machine), and starts a run unless one is active or about to
be. Two rebuilders that would share one work or staging folder anyway (two workers given
the same host name and folder) are stopped by the reassembler's folder lock
(``msi_prefect/transfer/work_lock.py``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any, Final

from msi_prefect.errors import MsiError
from msi_prefect.stack.prefect_api import RetryPolicy, checked, request
from msi_prefect.stack.processes import live_flow_runs
from msi_prefect.stack.runs import ACTIVE_STATES, RunState, runs_in_states

__all__ = [
    "AUDIT_TEMPLATE",
    "REBUILD_SUBDIR",
    "TEMPLATE_DEPLOYMENT",
    "HostDeployment",
    "HostSetup",
    "StorageHost",
    "TemplateMissingError",
    "check_host_name",
    "crash_orphaned_host_runs",
    "ensure_host_rebuilder",
    "host_audit_body",
    "host_deployment_body",
    "register_host_audit",
    "register_host_deployment",
    "start_host_run",
]

#: The deployment of prefect.yaml each host's copy is made from (``flow/deployment``).
TEMPLATE_DEPLOYMENT: Final = "reconstruct-files/reconstruct-files"
#: The audit each host also gets a copy of: it reads the host's own progress store.
AUDIT_TEMPLATE: Final = "audit-backups/audit-backups"
#: The host's rebuilder keeps its progress store, staging files and outboxes here.
REBUILD_SUBDIR: Final = "rebuild"
#: A host name: what Prefect accepts as a deployment and work-queue name, and a DNS label
#: or dotted name as most machines have (no ``/``, ``%``, spaces).
_HOST_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
#: One rebuilder per host.
HOST_CONCURRENCY_LIMIT: Final = 1
HOST_COLLISION_STRATEGY: Final = "CANCEL_NEW"
#: Tag of the host deployments (and so of their runs), for the UI's filters.
STORAGE_HOST_TAG: Final = "msi.storage-host"
# The template's fields the host's copy keeps as they are.
_COPIED_FIELDS: Final = (
    "entrypoint",
    "path",
    "pull_steps",
    "parameter_openapi_schema",
    "enforce_parameter_schema",
    "job_variables",
    "version",
)
_SCHEDULED_OR_ACTIVE: Final = (RunState.SCHEDULED, *ACTIVE_STATES)
#: A host has one rebuilder; more than this many active runs of it is not looked at.
MAX_HOST_RUNS_PER_QUERY: Final = 50
# The fields of a template's schedule its copy is created with.
_SCHEDULE_FIELDS: Final = ("schedule", "active", "max_scheduled_runs", "parameters", "slug")


class TemplateMissingError(MsiError):
    """The deployment a host's copy is made from is not on the server (not deployed yet).

    Attributes:
        template: That deployment (``flow/deployment``).
    """

    def __init__(self, template: str, api_url: str) -> None:
        super().__init__(
            f"the deployment {template} does not exist on {api_url}: deploy the flows first "
            "(prefect deploy --all from the project folder, with MSI_STORAGE_POOL and "
            "MSI_DESTINATION_DIR set; docs/deployment.md); each storage host's copy is made "
            "from it"
        )
        self.template = template


def check_host_name(name: str, template: str = TEMPLATE_DEPLOYMENT) -> str:
    """``name`` if it can name a storage host's deployment and work queue.

    Raises:
        MsiError: It is empty, too long, has other characters than letters, digits,
            ``.``, ``_`` and ``-`` (or does not start with a letter or digit), or is the
            template deployment's own name.
    """
    if not _HOST_NAME.fullmatch(name):
        raise MsiError(
            f"{name!r} cannot name a storage host: use 1 to 63 letters, digits, '.', '_' or "
            "'-', starting with a letter or digit (pass --host-name NAME)"
        )
    for taken in (template, AUDIT_TEMPLATE):
        if name == taken.split("/")[1]:
            raise MsiError(
                f"the host name {name!r} is the name of the deployment every host's copy is "
                f"made from ({taken}); pass another --host-name"
            )
    return name


@dataclass(frozen=True)
class StorageHost:
    """One storage host's rebuilder, as its worker registers it.

    Attributes:
        api_url: The facility's Prefect API.
        name: The host's name (:func:`check_host_name`): its deployment's and queue's name.
        pool: The storage work pool.
        work_dir: The host's working directory; the rebuilder's state is below it.
        destination: Where this host rebuilds to; None: the template's destination.
        template: The deployment the host's copy is made from (``flow/deployment``).
    """

    api_url: str
    name: str
    pool: str
    work_dir: Path
    destination: str | None = None
    template: str = TEMPLATE_DEPLOYMENT

    @property
    def rebuild_dir(self) -> Path:
        """The rebuilder's work folder: progress store, staging files, outboxes."""
        return self.work_dir / REBUILD_SUBDIR

    @property
    def deployment(self) -> str:
        """``flow/deployment`` of the host's copy."""
        return f"{self.template.split('/')[0]}/{self.name}"

    @property
    def audit_deployment(self) -> str:
        """``flow/deployment`` of the host's copy of the audit."""
        return f"{AUDIT_TEMPLATE.split('/')[0]}/{self.name}"


@dataclass(frozen=True)
class HostDeployment:
    """A host's copy of a deployment, as the server saved it.

    Attributes:
        id: The deployment's id.
        destination: Its ``destination`` parameter.
    """

    id: str
    destination: str


@dataclass(frozen=True)
class HostSetup:
    """What a storage worker found or did at its start.

    Attributes:
        rebuilder: The host's ``reconstruct-files`` copy.
        started_run: The run started, or None when one was scheduled or running already.
        crashed_runs: Runs marked crashed because their process was gone.
        audit: The host's ``audit-backups`` copy, or None when that is not deployed.
    """

    rebuilder: HostDeployment
    started_run: str | None
    crashed_runs: list[str]
    audit: HostDeployment | None


def host_deployment_body(template: dict[str, Any], host: StorageHost) -> dict[str, Any]:
    """The ``POST /deployments/`` body of ``host``'s copy of the ``template`` deployment.

    Args:
        template: The template deployment as ``GET /deployments/name/...`` returns it.
        host: The storage host.

    Raises:
        MsiError: The template has no ``destination`` and the host gives none.
    """
    parameters = dict(template.get("parameters") or {})
    parameters["work_dir"] = str(host.rebuild_dir)
    if host.destination is not None:
        parameters["destination"] = host.destination
    if not str(parameters.get("destination") or "").strip():
        raise MsiError(
            f"{host.template} has no destination parameter: deploy it with "
            "MSI_DESTINATION_DIR set, or give this host one (--destination)"
        )
    return {
        **_copy_body(template, host, parameters, "rebuilder"),
        "concurrency_limit": HOST_CONCURRENCY_LIMIT,
        "concurrency_options": {"collision_strategy": HOST_COLLISION_STRATEGY},
    }


def host_audit_body(
    template: dict[str, Any], host: StorageHost, destination: str
) -> dict[str, Any]:
    """The ``POST /deployments/`` body of ``host``'s copy of the ``audit-backups`` template.

    It audits what this host's rebuilder delivered (its progress store is in the
    rebuilder's work folder), on the host's queue, on the template's schedules.

    Args:
        template: The audit deployment as ``GET /deployments/name/...`` returns it.
        host: The storage host.
        destination: The destination of the host's rebuilder.
    """
    parameters = {
        **(template.get("parameters") or {}),
        "destination": destination,
        "work_dir": str(host.rebuild_dir),
    }
    schedules = [
        {key: schedule[key] for key in _SCHEDULE_FIELDS if schedule.get(key) is not None}
        for schedule in template.get("schedules") or []
    ]
    return {**_copy_body(template, host, parameters, "files"), "schedules": schedules}


def _copy_body(
    template: dict[str, Any], host: StorageHost, parameters: dict[str, Any], what: str
) -> dict[str, Any]:
    description = template.get("description") or ""
    return {
        **{key: template[key] for key in _COPIED_FIELDS if key in template},
        "name": host.name,
        "flow_id": template["flow_id"],
        "description": f"{description} Storage host {host.name}'s {what}.".strip(),
        "parameters": parameters,
        "tags": sorted({*template.get("tags", []), STORAGE_HOST_TAG}),
        "work_pool_name": host.pool,
        "work_queue_name": host.name,
        "paused": False,
    }


def register_host_deployment(host: StorageHost, policy: RetryPolicy) -> HostDeployment:
    """Create or update ``host``'s rebuilder deployment (and its pool and queue).

    Raises:
        TemplateMissingError: The template deployment does not exist (the flows are not
            deployed yet).
        MsiError: The template has no destination and the host gives none.
        PrefectApiError: The API did not answer within the policy's deadline, or refused.
    """
    import httpx

    what = f"registering {host.deployment}"
    with httpx.Client(base_url=host.api_url) as client:
        created = request(client, "POST", "/work_pools/", what, policy,
                          json={"name": host.pool, "type": "process"})  # fmt: skip
        if created.status_code != HTTPStatus.CONFLICT:  # 409: it exists already
            checked(created, what)
        found = request(client, "GET", f"/deployments/name/{host.template}", what, policy)
        if found.status_code == HTTPStatus.NOT_FOUND:
            raise TemplateMissingError(host.template, host.api_url)
        body = host_deployment_body(checked(found, what).json(), host)
        saved = request(client, "POST", "/deployments/", what, policy, json=body)
        return HostDeployment(str(checked(saved, what).json()["id"]),
                              body["parameters"]["destination"])  # fmt: skip


def register_host_audit(
    host: StorageHost, destination: str, policy: RetryPolicy, required: bool = True
) -> HostDeployment | None:
    """Create or update ``host``'s copy of ``audit-backups``; pause the template's schedule.

    Each host's progress store holds what that host delivered, so each host audits its
    own files, on its own queue; the template, which knows no host's work folder, would
    run on any storage worker and find no progress store, so it is paused (a
    ``prefect deploy --all`` activates it again, until a storage worker starts).

    Args:
        host: The storage host.
        destination: The destination of the host's rebuilder.
        policy: How each API call is retried.
        required: Whether a missing template is an error (else: no copy, None).

    Returns:
        The copy, or None when the template is not deployed and not required.

    Raises:
        TemplateMissingError: The template is not deployed and ``required``.
    """
    import httpx

    what = f"registering {host.audit_deployment}"
    with httpx.Client(base_url=host.api_url) as client:
        found = request(client, "GET", f"/deployments/name/{AUDIT_TEMPLATE}", what, policy)
        if found.status_code == HTTPStatus.NOT_FOUND:
            if required:
                raise TemplateMissingError(AUDIT_TEMPLATE, host.api_url)
            return None
        template = checked(found, what).json()
        body = host_audit_body(template, host, destination)
        saved = request(client, "POST", "/deployments/", what, policy, json=body)
        copy = HostDeployment(str(checked(saved, what).json()["id"]), destination)
        if not template.get("paused"):
            paused = request(client, "PATCH", f"/deployments/{template['id']}", what, policy,
                             json={"paused": True})  # fmt: skip
            checked(paused, what)
        return copy


def _host_runs(
    client: Any, deployment_id: str, states: tuple[RunState, ...], policy: RetryPolicy, what: str
) -> list[dict[str, Any]]:
    scope = {"deployments": {"id": {"any_": [deployment_id]}}}
    return runs_in_states(client, scope, states, policy, what, MAX_HOST_RUNS_PER_QUERY)


def crash_orphaned_host_runs(
    host: StorageHost, deployment_id: str, policy: RetryPolicy
) -> list[str]:
    """Mark ``CRASHED`` the host's runs Prefect holds active whose process is gone.

    Only this host runs its deployment's runs (its queue is its own), and its worker is
    not running yet: a Pending, Running or Cancelling run without a process on this
    machine was cut off (a power cut, a reboot) and holds the concurrency slot for ever.

    Returns:
        The ids of the runs marked crashed.
    """
    import httpx

    what = f"looking for orphaned runs of {host.deployment}"
    alive = {process.flow_run_id for process in live_flow_runs(host.api_url)}
    crashed = []
    with httpx.Client(base_url=host.api_url) as client:
        for run in _host_runs(client, deployment_id, ACTIVE_STATES, policy, what):
            if run["id"] in alive:
                continue
            marked = request(
                client,
                "POST",
                f"/flow_runs/{run['id']}/set_state",
                what,
                policy,
                json={
                    "state": {
                        "type": RunState.CRASHED.value,
                        "message": "its process was gone when the storage worker started",
                    },
                    "force": True,
                },
            )
            checked(marked, what)
            crashed.append(str(run["id"]))
    return crashed


def start_host_run(host: StorageHost, deployment_id: str, policy: RetryPolicy) -> str | None:
    """Start the host's rebuilder unless a run is scheduled or active; return its id."""
    import httpx

    what = f"starting {host.deployment}"
    with httpx.Client(base_url=host.api_url) as client:
        if _host_runs(client, deployment_id, _SCHEDULED_OR_ACTIVE, policy, what):
            return None
        created = request(client, "POST", f"/deployments/{deployment_id}/create_flow_run",
                          what, policy, json={"parameters": {}})  # fmt: skip
        return str(checked(created, what).json()["id"])


def ensure_host_rebuilder(
    host: StorageHost, policy: RetryPolicy, audit_required: bool = True
) -> HostSetup:
    """Register the host's deployments, clear its orphaned runs and start its rebuilder.

    Args:
        host: The storage host.
        policy: How each API call is retried.
        audit_required: Whether a missing ``audit-backups`` template is an error (else
            the host gets no audit).

    Raises:
        TemplateMissingError: A template is not deployed yet (the rebuilder's, or the
            audit's when required); its ``template`` says which. Registering again later
            is safe.
    """
    rebuilder = register_host_deployment(host, policy)
    audit = register_host_audit(host, rebuilder.destination, policy, audit_required)
    crashed = crash_orphaned_host_runs(host, rebuilder.id, policy)
    return HostSetup(rebuilder, start_host_run(host, rebuilder.id, policy), crashed, audit)
