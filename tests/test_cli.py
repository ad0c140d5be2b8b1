"""The `msi-prefect` command line itself (no servers)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import msi_prefect

# Modules `msi-prefect upload` never uses: starting the CLI must not import them (they cost
# the sender's start-up tenths of a second). Each also stands for its submodules.
NOT_FOR_UPLOAD = (
    "msi_prefect.events",
    "msi_prefect.transfer.reassembler",
    "msi_prefect.transfer.sinks",
    "msi_prefect.transfer.watcher",
    "msi_prefect.transfer.watch_loop",
    "msi_prefect.transfer.crypto",
    "msi_prefect.stack.components",
    "msi_prefect.stack.manager",
    "msi_prefect.stack.deploy",
    "msi_prefect.stack.crypto",
    "fsspec",
    "watchdog",
    "kafkacrypto",
    "httpx",
    "prefect",
)


def test_upload_start_up_imports_nothing_it_does_not_use() -> None:
    # A fresh interpreter: this test process has imported everything already. It builds
    # the parser (every command, with its choices) and opens the absent --crypto-config.
    probe = textwrap.dedent(
        """
        import sys
        from msi_prefect.cli import build_parser
        from msi_prefect.crypto_commands import codec_from_args

        args = build_parser().parse_args(["upload", "data", "--topic", "t"])
        with codec_from_args(args, None, [args.topic]) as codec:
            assert codec is None
        print("\\n".join(sorted(sys.modules)))
        """
    )
    # The interpreter imports the same copy of msi_prefect as this test run.
    source_root = str(Path(msi_prefect.__file__).resolve().parents[1])
    path = [source_root, *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    result = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    )
    loaded = set(result.stdout.split())
    assert "msi_prefect.transfer.producer" in loaded  # the probe saw the upload path
    unwanted = sorted(
        name
        for name in loaded
        if any(name == heavy or name.startswith(heavy + ".") for heavy in NOT_FOR_UPLOAD)
    )
    assert unwanted == []


def test_upload_lists_files_like_rglob_without_entering_linked_folders(tmp_path: Path) -> None:
    from msi_prefect.transfer.commands import iter_upload_files

    src = tmp_path / "run"
    (src / "a").mkdir(parents=True)
    (src / "a-b").mkdir()
    (src / "a" / "z.tif").write_bytes(b"1")
    (src / "a-b" / "y.tif").write_bytes(b"2")
    (src / ".hidden.csv").write_bytes(b"3")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(b"4")
    (src / "linked-folder").symlink_to(outside, target_is_directory=True)
    (src / "linked-file.txt").symlink_to(outside / "secret.txt")
    (src / "dangling").symlink_to(tmp_path / "missing")

    listed = [relpath for _, relpath in iter_upload_files([src], None)]

    expected = sorted(
        (p for p in src.rglob("*") if p.is_file()), key=lambda p: p.relative_to(src).parts
    )
    assert listed == [f"run/{p.relative_to(src).as_posix()}" for p in expected]
    # Sorted by components: "a/z.tif" before "a-b/y.tif" although "-" < "/" as characters.
    assert listed == [
        "run/.hidden.csv",
        "run/a/z.tif",
        "run/a-b/y.tif",
        "run/linked-file.txt",
    ]
