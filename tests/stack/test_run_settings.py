"""A forked run's Prefect settings: built once per distinct inputs, never stale (no server)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from msi_prefect.warm_start.run_settings import SettingsInputs

BASE_ENV = {"HOME": "/home/lab", "PATH": "/usr/bin", "PREFECT_API_URL": "http://127.0.0.1:1/api"}


def test_per_run_variables_are_not_inputs(tmp_path: Path) -> None:
    folder = str(tmp_path)
    first = SettingsInputs.of({**BASE_ENV, "PREFECT__FLOW_RUN_ID": "a", "PATH": "/a"}, folder)
    second = SettingsInputs.of(
        {**BASE_ENV, "PREFECT__FLOW_RUN_ID": "b", "PREFECT__CONTROL_TOKEN": "t"}, folder
    )
    assert first == second


def test_a_setting_in_any_case_the_folder_or_a_settings_file_changes_the_inputs(
    tmp_path: Path,
) -> None:
    folder = str(tmp_path)
    known = SettingsInputs.of(BASE_ENV, folder)
    assert SettingsInputs.of({**BASE_ENV, "PREFECT_API_URL": "http://x/api"}, folder) != known
    assert SettingsInputs.of({**BASE_ENV, "prefect_logging_level": "DEBUG"}, folder) != known
    assert SettingsInputs.of({**BASE_ENV, "HOME": "/elsewhere"}, folder) != known
    other = tmp_path / "other"
    other.mkdir()
    assert SettingsInputs.of(BASE_ENV, str(other)) != known
    (tmp_path / "prefect.toml").write_text("[logging]\nlevel = 'DEBUG'\n")
    with_file = SettingsInputs.of(BASE_ENV, str(tmp_path))
    assert with_file != known
    (tmp_path / "prefect.toml").write_text("[logging]\nlevel = 'WARNING'\n")
    assert SettingsInputs.of(BASE_ENV, str(tmp_path)) != with_file


# Learn as the server does, then apply as a child does, in a process of its own (applying
# replaces Prefect's global settings).
SERVER_THEN_CHILD = textwrap.dedent(
    """
    import json, os, sys
    import prefect.context
    from msi_prefect.warm_start.run_settings import RunSettings

    learned_env, child_env, directory, written = json.loads(sys.argv[1])
    settings = RunSettings()
    settings.learn(learned_env, directory)
    for name, text in written.items():  # files changed between the fork and the child's start
        with open(os.path.join(directory, name), "w") as file:
            file.write(text)
    os.environ.clear()
    os.environ.update(child_env)
    os.chdir(directory)
    taken = settings.apply()
    current = prefect.context.get_settings_context().settings
    print(json.dumps({"taken": taken, "api_url": current.api.url,
                      "level": current.logging.level}))
    """
)


def _server_then_child(
    learned: dict[str, str],
    child: dict[str, str],
    folder: Path,
    written: dict[str, str] | None = None,
) -> dict[str, object]:
    env = {**os.environ, **child}
    arguments = json.dumps([learned, child, str(folder), written or {}])
    completed = subprocess.run(
        [sys.executable, "-c", SERVER_THEN_CHILD, arguments],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return dict(json.loads(completed.stdout.strip().splitlines()[-1]))


def _env(home: Path, api_url: str) -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if not k.upper().startswith("PREFECT")},
        "HOME": str(home),
        "PREFECT_HOME": str(home / ".prefect"),
        "PREFECT_API_URL": api_url,
    }


def test_a_child_with_the_learned_inputs_takes_the_learned_settings(tmp_path: Path) -> None:
    env = _env(tmp_path, "http://127.0.0.1:4200/api")
    answer = _server_then_child(env, {**env, "PREFECT__FLOW_RUN_ID": "x"}, tmp_path)
    assert answer == {"taken": True, "api_url": "http://127.0.0.1:4200/api", "level": "INFO"}


def test_a_child_with_other_inputs_builds_its_own(tmp_path: Path) -> None:
    learned = _env(tmp_path, "http://127.0.0.1:4200/api")
    child = _env(tmp_path, "http://127.0.0.1:4300/api")
    answer = _server_then_child(learned, child, tmp_path)
    assert answer == {"taken": False, "api_url": "http://127.0.0.1:4300/api", "level": "INFO"}


def test_a_settings_file_written_after_learning_is_read_by_the_child(tmp_path: Path) -> None:
    env = _env(tmp_path, "http://127.0.0.1:4200/api")
    written = {"prefect.toml": "[logging]\nlevel = 'DEBUG'\n"}
    answer = _server_then_child(env, env, tmp_path, written)
    assert answer == {"taken": False, "api_url": "http://127.0.0.1:4200/api", "level": "DEBUG"}
