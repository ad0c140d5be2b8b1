"""Whether `msi-prefect up` must run ``prefect deploy --all`` again, or nothing changed.

``prefect deploy --all`` is the slowest step of `up` after the server's start: a Python
process that imports Prefect, loads every deployment's flow to read its parameters and
sends each deployment and its triggers to the server (20-30 s on 2 cores). What it
writes depends only on what it reads: the project's ``prefect.yaml`` and flow files, the
code they import from msi_prefect, the Prefect version and the environment variables the
``prefect.yaml`` names (``{{ $MSI_WATCH_DIR }}``...). And it writes to the stack's own
Prefect database, which outlives `down` and a power cut.

So after a deploy, `up` keeps a record in the state dir (:data:`RECORD_FILE`): a
fingerprint of those inputs and the ids the server gave the deployments. The next `up`
of that state dir (after `down`, a power cut, or while the stack runs) deploys again only
when the fingerprint differs, or when the server does not hold exactly those deployments
any more (its database was replaced, or someone deleted or re-created one). The record
is a cache: a damaged one means "deploy".
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

from msi_prefect.stack.prefect_api import checked, request
from msi_prefect.stack.project import PROJECT_FILE

logger = logging.getLogger(__name__)

#: The record of the last deploy, in the stack's state dir.
RECORD_FILE = "deployed.json"
#: The msi_prefect package (its code is what the thin flow scripts run).
PACKAGE_DIR = Path(__file__).resolve().parents[1]
#: The flow scripts a deployment's entrypoint names live here, in a project.
FLOWS_SUBDIR = "flows"
#: ``{{ $NAME }}`` in a prefect.yaml: a value `prefect deploy` takes from the environment.
ENV_REFERENCE = re.compile(r"\{\{\s*\$([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
#: The most deployments one filter request returns (Prefect's limit per page).
FILTER_LIMIT = 200


@dataclass(frozen=True)
class DeployRecord:
    """What the last ``prefect deploy --all`` of a stack read and made.

    Attributes:
        fingerprint: :func:`deploy_fingerprint` of its inputs.
        deployments: ``flow id/deployment name`` -> deployment id, as the server held them
            right after it.
    """

    fingerprint: str
    deployments: dict[str, str]


def referenced_env(prefect_yaml_text: str) -> list[str]:
    """The environment variables a prefect.yaml takes values from, sorted."""
    return sorted(set(ENV_REFERENCE.findall(prefect_yaml_text)))


def _source_files(project: Path) -> Iterable[tuple[str, Path]]:
    """Every file whose content a deploy reads, with a stable name, sorted."""
    package = PACKAGE_DIR
    found = [(f"project/{PROJECT_FILE}", project / PROJECT_FILE)]
    # The project's own modules (a lab project's analysis) and its flow scripts.
    found += [(f"project/{path.name}", path) for path in project.glob("*.py")]
    flows = project / FLOWS_SUBDIR
    found += [(f"project/{path.relative_to(project)}", path) for path in flows.rglob("*.py")]
    # The flows are thin: their parameters are msi_prefect's functions'.
    found += [(f"package/{path.relative_to(package)}", path) for path in package.rglob("*.py")]
    return sorted(found)


def deploy_fingerprint(project: Path, environ: Mapping[str, str]) -> str:
    """A hash of everything ``prefect deploy --all`` in ``project`` reads.

    Args:
        project: The folder of the prefect.yaml deployed.
        environ: The environment the deploy runs in.

    Raises:
        OSError: A project file cannot be read.
    """
    digest = hashlib.sha256()

    def add(name: str, value: bytes) -> None:
        digest.update(f"{name}\0{len(value)}\0".encode())
        digest.update(value)

    add("project dir", str(project.resolve()).encode())
    add("prefect version", metadata.version("prefect").encode())
    for name, path in _source_files(project):
        add(name, path.read_bytes())
    prefect_yaml = (project / PROJECT_FILE).read_text()
    for variable in [*referenced_env(prefect_yaml), "PREFECT_API_URL"]:
        add(f"env {variable}", environ.get(variable, "\0unset").encode())
    return digest.hexdigest()


def load_record(state_root: Path) -> DeployRecord | None:
    """The record of the last deploy of this stack, or None (none, or damaged)."""
    path = state_root / RECORD_FILE
    try:
        raw = json.loads(path.read_text())
        record = DeployRecord(fingerprint=raw["fingerprint"], deployments=raw["deployments"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("ignoring the damaged deploy record %s (%s): deploying again", path, exc)
        return None
    if not isinstance(record.fingerprint, str) or not isinstance(record.deployments, dict):
        logger.warning("ignoring the damaged deploy record %s: deploying again", path)
        return None
    return record


def save_record(state_root: Path, record: DeployRecord) -> None:
    """Keep ``record`` for the next `up` (written whole or not at all)."""
    tmp = state_root / f"{RECORD_FILE}.tmp"
    tmp.write_text(json.dumps(asdict(record), indent=2, sort_keys=True) + "\n")
    tmp.replace(state_root / RECORD_FILE)


def forget_record(state_root: Path) -> None:
    """Remove the record: the next `up` deploys (a deploy is under way, or failed)."""
    (state_root / RECORD_FILE).unlink(missing_ok=True)


def server_deployments(api_url: str, names: Iterable[str]) -> dict[str, str]:
    """The deployments of these names the server holds: ``flow id/name`` -> id.

    Raises:
        PrefectApiError: The API did not answer within `up`'s deadline, or refused.
    """
    import httpx

    wanted = sorted(set(names))
    what = "reading the deployed deployments"
    found: dict[str, str] = {}
    with httpx.Client(base_url=api_url) as client:
        offset = 0
        while True:
            response = request(
                client,
                "POST",
                "/deployments/filter",
                what,
                json={
                    "deployments": {"name": {"any_": wanted}},
                    "limit": FILTER_LIMIT,
                    "offset": offset,
                },
            )
            page = checked(response, what).json()
            found.update({f"{row['flow_id']}/{row['name']}": str(row["id"]) for row in page})
            if len(page) < FILTER_LIMIT:
                return found
            offset += FILTER_LIMIT


def deploy_is_current(
    record: DeployRecord | None, fingerprint: str, api_url: str, names: Iterable[str]
) -> bool:
    """Whether the last deploy read the same inputs and its deployments are all still there.

    Raises:
        PrefectApiError: The API did not answer within `up`'s deadline, or refused.
    """
    if record is None or record.fingerprint != fingerprint:
        return False
    return server_deployments(api_url, names) == record.deployments
