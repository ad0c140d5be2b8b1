"""`msi-prefect files`: grouping a file's events into its history, without a server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from msi_prefect.cli.files import (
    build_histories,
    literal_prefix,
    not_sent_files,
)


def _event(
    name: str, at: str, path: str, generation: int, run: str | None = None, **payload: Any
) -> dict[str, Any]:
    related = (
        [
            {
                "prefect.resource.id": f"prefect.flow-run.{run}",
                "prefect.resource.role": "flow-run",
                "prefect.resource.name": f"run {run}",
            }
        ]
        if run
        else []
    )
    return {
        "id": f"{name}-{path}-{generation}",
        "event": name,
        "occurred": at,
        "resource": {"prefect.resource.id": "msi.file.lab.f", "msi.path": path},
        "related": related,
        "payload": {
            "topic": "lab",
            "file_id": "f" * 32,
            "path": path,
            "generation": generation,
            **payload,
        },
    }


def test_literal_prefix_is_what_comes_before_the_first_wildcard() -> None:
    assert literal_prefix("run1/*.tif") == "run1/"
    assert literal_prefix("*.tif") == ""
    assert literal_prefix("a/b.tif") == "a/b.tif"
    assert literal_prefix("a/[xy].tif") == "a/"


def test_generations_in_flight_done_and_rejected() -> None:
    events = [
        _event("msi.file.analyzed", "2026-01-01T00:00:05Z", "a.tif", 1, "r3", analysis="x:y"),
        _event("msi.file.uploaded", "2026-01-01T00:00:01Z", "a.tif", 1, "w", sha256="ab"),
        _event("msi.file.reconstructed", "2026-01-01T00:00:02Z", "a.tif", 1, "c", url="file:///a"),
        _event(
            "msi.file.backed-up", "2026-01-01T00:00:03Z", "a.tif", 1, "r1", backup_url="s3://b/a"
        ),
        _event("msi.file.metadata-extracted", "2026-01-01T00:00:04Z", "a.tif", 1, "r2"),
        _event("msi.file.uploaded", "2026-01-01T00:01:00Z", "a.tif", 2, "w"),
        _event("msi.file.reconstructed", "2026-01-01T00:01:01Z", "a.tif", 2, "c"),
        _event("msi.file.rejected", "2026-01-01T00:02:00Z", "b.tif", 1, "c", reason="bad"),
        _event("msi.file.uploaded", "2026-01-01T00:00:01Z", "other.txt", 1, "w"),
    ]
    files = build_histories(events, "*.tif")
    assert [f.path for f in files] == ["a.tif", "b.tif"]
    first, second = files[0].generations
    assert (first.generation, first.reached, first.waiting_for) == (1, "analysis", [])
    assert list(first.steps) == ["sent", "rebuilt", "backup", "metadata", "analysis"]
    assert first.steps["backup"].details == {"backup_url": "s3://b/a"}
    assert first.steps["sent"].run is not None and first.steps["sent"].run.name == "run w"
    assert (second.reached, second.waiting_for) == ("rebuilt", ["backup", "metadata", "analysis"])
    rejected = files[1].generations[0]
    assert rejected.reached == "rejected" and rejected.waiting_for == []
    assert rejected.steps["rejected"].details == {"reason": "bad"}


def test_files_claimed_but_not_sent_come_from_the_registry_with_their_reason(
    tmp_path: Path,
) -> None:
    from msi_prefect.transfer import REGISTRY_FILE, Registry

    path = tmp_path / REGISTRY_FILE
    with Registry(path) as registry:
        for name in ("run1/a.tif", "run1/b.tif", "run1/c.tif", "notes.txt"):
            assert registry.begin("lab", name, size=10, mtime_ns=1, inode=7) is not None
        registry.mark_sent("lab", "run1/a.tif", 1, "a" * 64)
        registry.mark_failed("lab", "run1/b.tif", 1, "the broker refused the message")
        registry.mark_aborted("lab", "run1/c.tif", 1)
    missing = not_sent_files(path, "run1/*")
    assert [(e.path, e.state, e.generation) for e in missing] == [
        ("run1/b.tif", "failed", 1),
        ("run1/c.tif", "pending", 1),
    ]
    assert missing[0].reason == "the broker refused the message"
    assert missing[1].reason == "the file changed while it was being read"
