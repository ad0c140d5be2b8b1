"""`msi-prefect init DIR`: the lab project it writes, and `up` choosing it (no server).

The whole path (`up` in such a project deploys it, and its analysis runs on a file) is
in tests/stack/test_install.py.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from msi_prefect.cli.init import ANALYSIS_MODULE, ANALYSIS_SPEC
from msi_prefect.cli.main import main
from msi_prefect.errors import MsiError
from msi_prefect.prefect_layer.analysis import load_callable
from msi_prefect.prefect_layer.project_steps import import_from_directory
from msi_prefect.stack.deploy import UP_DEPLOYMENTS
from msi_prefect.stack.project import bundled_project_dir, deployment_names, project_for_up
from msi_prefect.stack.roles import ROLE_DEPLOYMENTS, pool_env

ANALYSIS_DEPLOYMENTS = ("analyze-file", "process-batch")


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A lab project written by `msi-prefect init`."""
    folder = tmp_path / "lab"
    assert main(["init", str(folder)]) == 0
    return folder


@pytest.fixture
def clean_imports() -> Iterator[None]:
    """Undo what importing the project's analysis adds to sys.path and sys.modules."""
    path_before = list(sys.path)
    yield
    sys.path[:] = path_before
    sys.modules.pop(ANALYSIS_MODULE, None)


def _deployments(project: Path) -> dict[str, dict[str, Any]]:
    document = yaml.safe_load((project / "prefect.yaml").read_text())
    return {entry["name"]: entry for entry in document["deployments"]}


def test_init_writes_the_project_files(project: Path) -> None:
    bundled = bundled_project_dir()

    assert (project / "README.md").is_file()
    assert (project / f"{ANALYSIS_MODULE}.py").is_file()
    bundled_flows = sorted(path.name for path in (bundled / "flows").glob("*.py"))
    assert sorted(path.name for path in (project / "flows").glob("*.py")) == bundled_flows
    for name in bundled_flows:
        assert (project / "flows" / name).read_bytes() == (bundled / "flows" / name).read_bytes()


def test_the_projects_prefect_yaml_names_every_flow_the_package_deploys(project: Path) -> None:
    deployments = _deployments(project)

    assert set(deployments) == deployment_names(bundled_project_dir() / "prefect.yaml")
    role_of = {name: role for role, names in ROLE_DEPLOYMENTS.items() for name in names}
    for name, entry in deployments.items():
        script, _, function = entry["entrypoint"].partition(":")
        assert f"def {function}(" in (project / script).read_text(), name
        # The pool of the kind of host that runs it (`up` sets all three to its one pool).
        assert entry["work_pool"]["name"] == f"{{{{ ${pool_env(role_of[name])} }}}}", name


def test_the_analysis_stub_is_what_the_analyze_flows_call(
    project: Path, tmp_path: Path, clean_imports: None
) -> None:
    document = yaml.safe_load((project / "prefect.yaml").read_text())
    deployments = _deployments(project)
    sample = tmp_path / "sample.tif"
    sample.write_bytes(b"\0" * 123)

    for name in ANALYSIS_DEPLOYMENTS:
        assert deployments[name]["parameters"]["analysis"] == ANALYSIS_SPEC
    pull_steps = [next(iter(step)) for step in document["pull"]]
    assert pull_steps[-1] == f"{import_from_directory.__module__}.import_from_directory"
    # What a flow run does: the pull step, then the flow loads the analysis by its name.
    import_from_directory(str(project))
    analyze = load_callable(ANALYSIS_SPEC)
    result = analyze(sample, {"path": "run1/sample.tif"})

    assert Path(analyze.__code__.co_filename) == project / f"{ANALYSIS_MODULE}.py"
    assert json.loads(json.dumps(result)) == {
        "analysis": ANALYSIS_MODULE,
        "file": "run1/sample.tif",
        "size_bytes": 123,
    }


def test_up_deploys_the_project_of_the_folder_it_runs_in(project: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()

    assert project_for_up(project, UP_DEPLOYMENTS) == project
    assert project_for_up(empty, UP_DEPLOYMENTS) == bundled_project_dir()


def test_up_refuses_a_folder_with_a_prefect_yaml_of_something_else(tmp_path: Path) -> None:
    (tmp_path / "prefect.yaml").write_text(
        "name: other\ndeployments:\n  - name: etl\n    entrypoint: etl.py:main\n"
    )

    with pytest.raises(MsiError, match=r"not an msi-prefect project.*watch-directory"):
        project_for_up(tmp_path, UP_DEPLOYMENTS)


def test_init_never_writes_into_a_folder_with_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "notes.txt").write_text("mine")

    assert main(["init", str(tmp_path)]) == 1

    assert "not an empty folder" in capsys.readouterr().err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["notes.txt"]


def test_up_in_such_a_folder_fails_before_starting_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "prefect.yaml").write_text("name: other\ndeployments:\n  - name: etl\n")
    monkeypatch.chdir(tmp_path)

    assert main(["--state-dir", str(tmp_path / ".msi"), "up"]) == 1

    assert "not an msi-prefect project" in capsys.readouterr().err
    assert not (tmp_path / ".msi").exists()
