"""The `msi-prefect` command line itself.

The tests marked ``stack`` run the CLI against the session's real broker: where the
transfer commands keep their state, and what ``--stop-after-files`` counts.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import msi_prefect
from msi_prefect.cli.transfer import REGISTRY_FILE, own_state_excludes
from msi_prefect.stack.config import STATE_DIR_ENV, StackConfig, StateDir
from msi_prefect.transfer.filters import FileFilter
from tests.conftest import TEST_SESSION_TIMEOUT_MS, RunningStack
from tests.transfer_helpers import make_tree, send, tree_digests

CLI_TIMEOUT_S = 120

# Modules `msi-prefect upload` never uses: starting the CLI must not import them (they cost
# the sender's start-up tenths of a second). Each also stands for its submodules.
NOT_FOR_UPLOAD = (
    "msi_prefect.prefect_layer.events",
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
        from msi_prefect.cli.main import build_parser
        from msi_prefect.cli.crypto import codec_from_args

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
    from msi_prefect.transfer import iter_upload_files

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


# ------------------------------------------------------------------ where state lives


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "msi_prefect.cli", *args]


def _user_env(home: Path, xdg_state: Path | None) -> dict[str, str]:
    """The environment of a user with no state dir chosen: HOME (and XDG) in tmp."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in (STATE_DIR_ENV, "XDG_STATE_HOME", "MSI_BOOTSTRAP_SERVERS")
    }
    env["HOME"] = str(home)
    if xdg_state is not None:
        env["XDG_STATE_HOME"] = str(xdg_state)
    return env


def _listing(root: Path) -> set[str]:
    return {path.relative_to(root).as_posix() for path in root.rglob("*")}


def _project(root: Path, config: StackConfig) -> StateDir:
    """A stack's project folder: ``.msi`` with the config file `msi-prefect up` saves."""
    state = StateDir(root / ".msi")
    state.ensure_writable()
    state.save_config(config)
    return state


def test_transfer_state_goes_to_the_user_state_dir_or_the_stack_of_the_project(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home, data = tmp_path / "home", tmp_path / "data" / "run1"
    data.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv(STATE_DIR_ENV, raising=False)
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    user_default = home / ".local" / "state" / "msi-prefect"
    assert StateDir.for_transfers(cwd=data).root == user_default
    monkeypatch.setenv("XDG_STATE_HOME", "relative/ignored")  # the XDG spec: ignore it
    assert StateDir.for_transfers(cwd=data).root == user_default
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert StateDir.for_transfers(cwd=data).root == tmp_path / "xdg" / "msi-prefect"

    # A `.msi` without the stack's config file is not a stack (nor taken for one) ...
    (tmp_path / "data" / ".msi").mkdir()
    assert StateDir.for_transfers(cwd=data).root == tmp_path / "xdg" / "msi-prefect"
    # ... a project folder above the current one is.
    project = _project(tmp_path / "data", StackConfig())
    assert StateDir.for_transfers(cwd=data).root == project.root
    assert StateDir.find_stack(data / "deeper" / "still") is not None

    monkeypatch.setenv(STATE_DIR_ENV, str(tmp_path / "chosen"))
    assert StateDir.for_transfers(cwd=data).root == tmp_path / "chosen"
    assert StateDir.for_transfers(tmp_path / "flag", cwd=data).root == tmp_path / "flag"
    # The stack commands keep their default: ./.msi
    monkeypatch.delenv(STATE_DIR_ENV)
    monkeypatch.chdir(data)
    assert StateDir.from_env().root == data / ".msi"


def test_own_state_files_below_a_watched_folder_are_excluded(tmp_path: Path) -> None:
    root = tmp_path / "watched"
    state = root / ".msi"
    file_filter = FileFilter(exclude_regex=own_state_excludes(root, state / REGISTRY_FILE, state))
    for ours in (
        ".msi/producer-registry.sqlite",
        ".msi/producer-registry.sqlite-wal",
        ".msi/event-outbox.sqlite",
        ".msi/stack.json",
        ".msi/logs/broker.log",
    ):
        assert not file_filter.matches(ours), ours
    assert file_filter.matches("data/run.msi/x.tif")
    # A registry named with --registry, in a data sub-folder: that file only, not its folder.
    named = root / "sub[1]" / "reg.sqlite"
    file_filter = FileFilter(exclude_regex=own_state_excludes(root, named, None))
    assert not file_filter.matches("sub[1]/reg.sqlite")
    assert not file_filter.matches("sub[1]/reg.sqlite-shm")
    assert file_filter.matches("sub[1]/image.tif")
    assert own_state_excludes(root, tmp_path / "elsewhere" / "reg.sqlite", tmp_path) == ()


@pytest.mark.stack
@pytest.mark.parametrize("with_xdg", [True, False], ids=["xdg-state-home", "home-only"])
def test_upload_in_a_data_folder_leaves_it_as_it_was(
    kafka_stack: RunningStack, topic: str, tmp_path: Path, with_xdg: bool
) -> None:
    data = tmp_path / "data"
    make_tree(data, {"run1/image.tif": 5000, "run1/notes.txt": 10})
    before = _listing(data)
    home, xdg = tmp_path / "home", tmp_path / "xdg"
    result = subprocess.run(
        _cli("upload", "run1", "--topic", topic, "--bootstrap", kafka_stack.bootstrap_servers),
        cwd=data,
        env=_user_env(home, xdg if with_xdg else None),
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr
    assert "2 sent" in result.stdout
    assert _listing(data) == before
    user_state = xdg / "msi-prefect" if with_xdg else home / ".local" / "state" / "msi-prefect"
    assert (user_state / REGISTRY_FILE).is_file()
    assert not (user_state / "run").exists()  # not a stack: no stack layout


@pytest.mark.stack
def test_upload_from_inside_a_project_folder_uses_that_stacks_state_dir(
    kafka_stack: RunningStack, topic: str, tmp_path: Path
) -> None:
    """Found from a sub-folder: the registry goes there, and so does the broker address."""
    project = _project(tmp_path / "project", kafka_stack.config)
    inbox = project.root.parent / "inbox"
    make_tree(inbox, {"run2/a.bin": 100})
    before = _listing(inbox)
    result = subprocess.run(
        _cli("upload", "a.bin", "--topic", topic),  # no --bootstrap: the stack's broker
        cwd=inbox / "run2",
        env=_user_env(tmp_path / "home", tmp_path / "xdg"),
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr
    assert "1 sent" in result.stdout
    assert (project.root / REGISTRY_FILE).is_file()
    assert _listing(inbox) == before
    assert not (tmp_path / "xdg").exists() and not (tmp_path / "home").exists()


@pytest.mark.stack
def test_watch_of_a_project_folder_never_sends_its_own_state(
    kafka_stack: RunningStack, topic: str, tmp_path: Path
) -> None:
    project = _project(tmp_path / "project", kafka_stack.config)
    (project.log_dir / "broker.log").write_text("a log of the stack\n")
    folder = project.root.parent
    make_tree(folder, {"a.txt": 10, "sub/b.txt": 20})
    summary = tmp_path / "summary.json"
    watch = _cli(
        "watch", ".", "--topic", topic, "--upload-existing", "--stability-window", "0.3",
        "--idle-timeout", "3", "--summary-json", str(summary),
    )  # fmt: skip
    result = subprocess.run(
        watch,
        cwd=folder,
        env=_user_env(tmp_path / "home", tmp_path / "xdg"),
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    sent = sorted(line.split()[1] for line in lines if line.startswith("sent "))
    assert sent == ["a.txt", "sub/b.txt"]
    assert json.loads(summary.read_text())["outcomes"] == {"sent": 2}
    assert (project.root / REGISTRY_FILE).is_file()  # the registry was below the folder


# ------------------------------------------------------------------ --stop-after-files


@pytest.mark.stack
def test_stop_after_files_counts_files_not_messages_that_name_no_file(
    kafka_stack: RunningStack, topic: str, tmp_path: Path
) -> None:
    """20 messages of another application, then 9 files: it stops after the 9 files.

    The other messages come first and are read before any file is sent, so a reassembler
    that counted them as files would stop before the first file.
    """
    from confluent_kafka import Producer

    garbage = 20
    producer = Producer({"bootstrap.servers": kafka_stack.bootstrap_servers})
    for i in range(garbage):
        producer.produce(topic, value=f"another application's message {i}".encode())
    assert producer.flush(30) == 0
    dest, summary, errors = tmp_path / "dest", tmp_path / "summary.json", tmp_path / "stderr"
    reconstruct = _cli(
        "reconstruct", str(dest), "--topic", topic,
        "--bootstrap", kafka_stack.bootstrap_servers, "--group", f"cli-{topic}",
        "--session-timeout-ms", str(TEST_SESSION_TIMEOUT_MS),
        "--stop-after-files", "9", "--idle-timeout", "60", "--summary-json", str(summary),
    )  # fmt: skip
    with errors.open("w") as stderr:
        rebuild = subprocess.Popen(
            reconstruct,
            cwd=tmp_path,
            env=_user_env(tmp_path / "home", tmp_path / "xdg"),
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
        try:
            deadline = time.monotonic() + CLI_TIMEOUT_S
            while errors.read_text().count("rejected message at partition") < garbage:
                assert rebuild.poll() is None, "it stopped before any file was sent"
                assert time.monotonic() < deadline, "the other messages were not read"
                time.sleep(0.1)
            sizes = {f"real/file-{i}.txt": 100 + i for i in range(9)}
            expected = make_tree(tmp_path / "src", sizes)
            send(kafka_stack, topic, tmp_path / "src", tmp_path / "reg.sqlite", sorted(sizes))
            stdout, _ = rebuild.communicate(timeout=CLI_TIMEOUT_S)
        finally:
            if rebuild.poll() is None:
                rebuild.kill()
                rebuild.wait()
    assert rebuild.returncode == 0, errors.read_text()
    assert tree_digests(dest) == expected
    output = stdout + errors.read_text()
    assert len([line for line in stdout.splitlines() if line.startswith("reconstructed ")]) == 9
    # Each other message reported once, by partition and offset, never as a None path.
    positions = re.findall(r"rejected message at partition (\d+) offset (\d+)", output)
    assert len(positions) == len(set(positions)) == garbage
    assert "rejected None" not in output and "rejected 'None'" not in output
    assert stdout.splitlines()[-1].startswith(
        f"9 reconstructed, 0 rejected, {garbage} rejected messages, "
    )
    counts = json.loads(summary.read_text())
    assert (counts["reconstructed"], counts["rejected"], counts["rejected_messages"]) == (
        9,
        0,
        garbage,
    )
    assert counts["rejected_by_reason"] == {"not-msi": garbage}
