"""Helpers of the downstream-flow tests: rebuilt files, blocks, flows, events, artifacts."""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from msi_prefect.prefect_layer.events import FileFacts
from msi_prefect.transfer.wire import file_id_for

REPO = Path(__file__).resolve().parent.parent
BUCKET = "msi-backup"
#: Events reach the server's database a little after they are emitted.
EVENT_TIMEOUT_S = 20.0
POLL_INTERVAL_S = 0.5
#: The server returns at most 50 events per page.
MAX_EVENTS = 50


def file_params(
    destination: Path, relpath: str, data: bytes, topic: str, generation: int = 1
) -> dict[str, Any]:
    """Write ``destination/relpath`` and return the reconstructed event's parameters."""
    path = destination.joinpath(*relpath.split("/"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return FileFacts(
        topic=topic,
        file_id=file_id_for(relpath),
        generation=generation,
        path=relpath,
        url=path.as_uri(),
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
    ).parameters()


def load_flow(entrypoint: str) -> Any:
    """Load a flow the way a deployment does, from ``flows/<file>.py:<function>``."""
    from prefect.flows import load_flow_from_entrypoint

    path, _, name = entrypoint.rpartition(":")
    return load_flow_from_entrypoint(f"{REPO / path}:{name}", use_placeholder_flow=False)


def unique_name(prefix: str) -> str:
    """A block document name no other test uses."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@dataclass(frozen=True)
class SavedBackupStorage:
    """A backup storage block saved for one test."""

    name: str
    prefix: str
    s3_client: Any

    def key(self, relpath: str) -> str:
        """The S3 key of a file's backup."""
        return f"{self.prefix}/{relpath}"

    def object(self, relpath: str) -> bytes | None:
        """A backup's content, or None when there is no such object."""
        from botocore.exceptions import ClientError

        try:
            body: bytes = self.s3_client.get_object(Bucket=BUCKET, Key=self.key(relpath))[
                "Body"
            ].read()
        except ClientError as exc:
            if exc.response["Error"]["Code"] in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        return body


def s3_client(s3_env: dict[str, str]) -> Any:
    """A boto3 client of the stack's S3 store."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=s3_env["AWS_ENDPOINT_URL"],
        aws_access_key_id=s3_env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=s3_env["AWS_SECRET_ACCESS_KEY"],
        region_name=s3_env["AWS_DEFAULT_REGION"],
    )


def saved_backup_storage(s3_env: dict[str, str]) -> Iterator[SavedBackupStorage]:
    """Save a BackupStorage block on a private prefix; remove objects and block after."""
    from pydantic import SecretStr

    from msi_prefect.prefect_layer.backup.storage import BackupStorage

    prefix = f"flow-tests/{uuid.uuid4().hex}"
    name = unique_name("backup")
    BackupStorage(
        url=f"s3://{BUCKET}/{prefix}",
        endpoint_url=s3_env["AWS_ENDPOINT_URL"],
        access_key_id=s3_env["AWS_ACCESS_KEY_ID"],
        secret_access_key=SecretStr(s3_env["AWS_SECRET_ACCESS_KEY"]),
        region=s3_env["AWS_DEFAULT_REGION"],
    ).save(name)
    client = s3_client(s3_env)
    try:
        yield SavedBackupStorage(name, prefix, client)
    finally:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        for page in pages:
            for obj in page.get("Contents", []):
                client.delete_object(Bucket=BUCKET, Key=obj["Key"])
        delete_block(BackupStorage, name)


def delete_block(block_type: Any, name: str) -> None:
    """Delete a saved block document."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        client.delete_block_document(block_type.load(name)._block_document_id)


def read_events(
    name: str,
    resource_id: str,
    count: int = 1,
    since: datetime | None = None,
    until_found: Callable[[list[Any]], bool] | None = None,
    timeout_s: float = EVENT_TIMEOUT_S,
) -> list[Any]:
    """Events ``name`` about ``resource_id`` from the server, polled until ``count`` arrived
    (or ``timeout_s`` passed).

    A ``resource_id`` ending in ``*`` matches every resource id with that prefix.
    """
    from prefect.client.orchestration import get_client
    from prefect.events.filters import (
        EventFilter,
        EventNameFilter,
        EventOccurredFilter,
        EventResourceFilter,
    )

    start = since or datetime.now(UTC) - timedelta(hours=1)
    deadline = time.monotonic() + timeout_s
    events: list[Any] = []
    while True:
        event_filter = EventFilter(
            occurred=EventOccurredFilter.model_validate(
                {"since": start, "until": datetime.now(UTC) + timedelta(days=1)}
            ),
            event=EventNameFilter(name=[name]),
            resource=(
                EventResourceFilter(id_prefix=[resource_id.removesuffix("*")])
                if resource_id.endswith("*")
                else EventResourceFilter(id=[resource_id])
            ),
        )
        with get_client(sync_client=True) as client:
            events = list(client.read_events(filter=event_filter, limit=MAX_EVENTS).events)
        done = until_found(events) if until_found else len(events) >= count
        if done or time.monotonic() > deadline:
            return events
        time.sleep(POLL_INTERVAL_S)


def read_artifacts(key: str, flow_run_id: uuid.UUID) -> list[Any]:
    """The artifacts with ``key`` that one flow run created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterKey,
        FlowRunFilter,
        FlowRunFilterId,
    )

    with get_client(sync_client=True) as client:
        return list(
            client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
            )
        )


def flow_run_name(flow_run_id: uuid.UUID) -> str:
    """The name the server gave a flow run."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return str(client.read_flow_run(flow_run_id).name)
