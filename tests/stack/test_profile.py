"""The stack's Prefect CLI profile: `up` activates it, `down` restores the one before.

The unit tests work on a profiles file of their own (never the user's: tests/conftest.py
points ``PREFECT_PROFILES_PATH`` at a temporary file for the whole session). The stack
test asks the real Prefect CLI, in the environment a new shell has, which API it uses
while the session's stack (started with ``StackManager.up``, as `msi-prefect up` does)
is up. `down` restoring the profile is checked on a whole stack of its own in
``tests/stack/test_install.py``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from msi_prefect.errors import MsiError
from msi_prefect.stack.config import StackConfig, StateDir, free_port_map
from msi_prefect.stack.profile import (
    activate_stack_profile,
    load_record,
    profile_name,
    restore_previous_profile,
)
from tests.conftest import RunningStack

USER_PROFILES = """\
active = "work"

[profiles.work]
PREFECT_API_URL = "http://127.0.0.1:1/api"

[profiles.other]
PREFECT_LOGGING_LEVEL = "DEBUG"
"""
CLI_TIMEOUT_S = 120


@pytest.fixture
def profiles_file(tmp_path: Path) -> Iterator[Path]:
    """A profiles file of the test's own, as Prefect's settings in this process name it."""
    from prefect.settings import PREFECT_PROFILES_PATH, temporary_settings

    path = tmp_path / "home" / "profiles.toml"
    with temporary_settings(updates={PREFECT_PROFILES_PATH: path}):
        yield path


def _read(path: Path) -> dict:
    return tomllib.loads(path.read_text())


def _stack(tmp_path: Path) -> tuple[StateDir, StackConfig]:
    return StateDir(tmp_path / "lab" / ".msi"), StackConfig(ports=free_port_map())


def test_up_activates_the_stack_profile_and_down_restores_the_users(
    tmp_path: Path, profiles_file: Path
) -> None:
    profiles_file.parent.mkdir(parents=True)
    profiles_file.write_text(USER_PROFILES)
    state, config = _stack(tmp_path)

    record = activate_stack_profile(state, config)

    saved = _read(profiles_file)
    assert record.profile == profile_name(state) == saved["active"]
    assert record.previous_active == "work"
    assert saved["profiles"][record.profile] == {"PREFECT_API_URL": config.prefect_api_url}
    assert saved["profiles"]["other"] == {"PREFECT_LOGGING_LEVEL": "DEBUG"}

    assert restore_previous_profile(state) == "work"
    assert _read(profiles_file) == tomllib.loads(USER_PROFILES)
    assert load_record(state) is None


def test_up_twice_still_restores_the_profile_of_before_the_first(
    tmp_path: Path, profiles_file: Path
) -> None:
    profiles_file.parent.mkdir(parents=True)
    profiles_file.write_text(USER_PROFILES)
    state, config = _stack(tmp_path)

    activate_stack_profile(state, config)
    again = activate_stack_profile(state, config)

    assert again.previous_active == "work"
    assert restore_previous_profile(state) == "work"


def test_down_keeps_a_profile_the_user_chose_after_up(tmp_path: Path, profiles_file: Path) -> None:
    profiles_file.parent.mkdir(parents=True)
    profiles_file.write_text(USER_PROFILES)
    state, config = _stack(tmp_path)
    record = activate_stack_profile(state, config)
    chosen = _read(profiles_file)
    chosen["active"] = "other"
    import toml

    profiles_file.write_text(toml.dumps(chosen))

    assert restore_previous_profile(state) is None
    saved = _read(profiles_file)
    assert saved["active"] == "other"
    assert record.profile not in saved["profiles"]


def test_without_a_profiles_file_down_leaves_prefects_default_active(
    tmp_path: Path, profiles_file: Path
) -> None:
    from prefect.settings.profiles import load_profiles

    default = load_profiles().active_name
    state, config = _stack(tmp_path)

    activate_stack_profile(state, config)
    assert load_profiles().active_name == profile_name(state)
    assert profiles_file.stat().st_mode & 0o777 == 0o600

    assert restore_previous_profile(state) is None
    assert "active" not in _read(profiles_file)
    assert load_profiles().active_name == default


def test_two_stacks_of_one_folder_name_get_two_profiles(tmp_path: Path) -> None:
    first = StateDir(tmp_path / "a" / "lab" / ".msi")
    second = StateDir(tmp_path / "b" / "lab" / ".msi")

    assert profile_name(first) != profile_name(second)
    assert profile_name(first).startswith("msi-lab-")


def test_a_profiles_file_that_is_not_toml_is_named_in_the_error(
    tmp_path: Path, profiles_file: Path
) -> None:
    profiles_file.parent.mkdir(parents=True)
    profiles_file.write_text("active = [unclosed\n")
    state, config = _stack(tmp_path)

    with pytest.raises(MsiError, match="profiles file"):
        activate_stack_profile(state, config)
    assert profiles_file.read_text() == "active = [unclosed\n"


def new_shell_env() -> dict[str, str]:
    """What a new login shell has: HOME, PATH and the (test's) profiles file, no PREFECT_*."""
    return {
        "HOME": os.environ["HOME"],
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PREFECT_PROFILES_PATH": os.environ["PREFECT_PROFILES_PATH"],
    }


def prefect_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    prefect = shutil.which("prefect", path=env["PATH"])
    assert prefect is not None
    return subprocess.run(
        [prefect, *args], env=env, capture_output=True, text=True, timeout=CLI_TIMEOUT_S
    )


@pytest.mark.stack
def test_the_prefect_cli_in_a_new_shell_talks_to_the_stack(prefect_stack: RunningStack) -> None:
    env = new_shell_env()

    view = prefect_cli("config", "view", env=env)
    runs = prefect_cli("flow-run", "ls", "--limit", "1", env=env)

    assert view.returncode == 0, view.stdout + view.stderr
    assert f"PREFECT_API_URL='{prefect_stack.config.prefect_api_url}'" in view.stdout
    assert profile_name(prefect_stack.manager.state) in view.stdout
    # Without the profile the CLI would refuse (the suite forbids a temporary server).
    assert runs.returncode == 0, runs.stdout + runs.stderr
