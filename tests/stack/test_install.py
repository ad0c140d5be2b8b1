"""`pip install msi-prefect` works outside a checkout: a wheel, `up` in an empty folder, `init`.

The wheel is built from the repository as a user would (``pip wheel --no-deps``, in a
copy of the files a build reads, so the checkout stays clean) and installed into a new
virtual environment. Installing every dependency afresh would take minutes, so that
environment reuses the project's ``.venv`` for them: its site-packages is appended to
``sys.path`` by a ``.pth`` line (the ``.pth`` files in it, among them the editable install
of the checkout, are not run, so ``msi_prefect`` comes from the wheel alone; the test
checks that). ``weed`` (SeaweedFS) is found on ``PATH`` in ``.venv/bin``.

One stack serves the whole path: `up` in an empty folder (the package's own deployments,
deployed from the installed location, which `up` leaves unchanged), the Prefect CLI in a
new shell pointed at the stack by its profile, then `init` and `up` again in the lab
project (its prefect.yaml deployed), a file through every step (sent and rebuilt by the
transfers the first `up` started from the package, backed up, described and analysed by
the project's flows, with its own analysis), and `down`, which makes the user's profile
active again. Nothing of it runs from the checkout.

The wheel's project files are compared byte for byte with the repository's top-level
ones, the one source they are copied from.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from zipfile import ZipFile

import httpx
import pytest

from msi_prefect.cli.init import ANALYSIS_MODULE, ANALYSIS_SPEC
from msi_prefect.prefect_layer.events import EventName
from msi_prefect.stack.config import StateDir, free_port_map
from msi_prefect.stack.deploy import PROJECT_DIR
from msi_prefect.stack.manager import StackManager
from msi_prefect.stack.processes import flow_run_processes
from msi_prefect.stack.profile import PROFILE_PREFIX
from msi_prefect.stack.project import deployment_names
from tests.stack_helpers import API_TIMEOUT_S, file_events, kill_everything, wait_until_done

#: What a build of the wheel reads, relative to the repository.
BUILD_INPUTS = (
    "pyproject.toml",
    "setup.py",
    "MANIFEST.in",
    "README.md",
    "prefect.yaml",
    "msi_prefect",
    "flows",
    "deployments",
    "blocks",
)
#: The project files the wheel carries, under msi_prefect/project.
PROJECT_FILES = ("prefect.yaml", "flows", "deployments", "blocks")
PACKAGED_PREFIX = "msi_prefect/project/"
SKIPPED = shutil.ignore_patterns("__pycache__", "*.pyc", ".*")
BUILD_TIMEOUT_S = 300
CLI_TIMEOUT_S = 300
FILE_TIMEOUT_S = 240
# Two `up`s, two files through every step and a `down`, on a busy 2-core machine.
WHOLE_PATH_TIMEOUT_S = 900
USER_PROFILES = 'active = "work"\n\n[profiles.work]\nPREFECT_API_URL = "http://127.0.0.1:9/api"\n'
FILE_SIZE = 64 * 1024


@dataclass(frozen=True)
class Installed:
    """A virtual environment with the wheel installed.

    Attributes:
        wheel: The wheel built from the repository.
        venv: The environment.
    """

    wheel: Path
    venv: Path

    @property
    def bin(self) -> Path:
        """Its scripts (msi-prefect)."""
        return self.venv / "bin"


def _run(argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        argv, cwd=cwd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False
    )
    assert result.returncode == 0, f"{argv}:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """Build the wheel and install it into a new environment (times printed with -s)."""
    root = tmp_path_factory.mktemp("install")
    source = root / "source"
    source.mkdir()
    for name in BUILD_INPUTS:
        if (PROJECT_DIR / name).is_dir():
            shutil.copytree(PROJECT_DIR / name, source / name, ignore=SKIPPED)
        else:
            shutil.copy2(PROJECT_DIR / name, source / name)
    started = time.monotonic()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    _run([*pip, "wheel", "--no-deps", "-w", str(root / "dist"), str(source)])
    built = time.monotonic()
    (wheel,) = (root / "dist").glob("msi_prefect-*.whl")
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    install = ["install", "--no-deps", "--no-index", "--no-compile", str(wheel)]
    _run([*pip, "--python", str(python), *install])
    site_packages = _run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]
    ).stdout.strip()
    # The project's dependencies, after the environment's own packages on sys.path.
    (Path(site_packages) / "msi-test-dependencies.pth").write_text(
        sysconfig.get_path("purelib") + "\n"
    )
    print(f"wheel built in {built - started:.1f} s, installed in {time.monotonic() - built:.1f} s")
    return Installed(wheel=wheel, venv=venv)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# In the whole-stack tests' worker (it starts no stack): it shares the wheel built once.
@pytest.mark.own_stack
def test_the_wheel_carries_the_repositorys_project_files_unchanged(installed: Installed) -> None:
    repository = {
        str(path.relative_to(PROJECT_DIR)): _sha256(path.read_bytes())
        for name in PROJECT_FILES
        for path in ([PROJECT_DIR / name] if (PROJECT_DIR / name).is_file() else
                     sorted((PROJECT_DIR / name).rglob("*")))
        if path.is_file() and "__pycache__" not in path.parts
    }  # fmt: skip
    with ZipFile(installed.wheel) as wheel:
        packaged = {
            name.removeprefix(PACKAGED_PREFIX): _sha256(wheel.read(name))
            for name in wheel.namelist()
            if name.startswith(PACKAGED_PREFIX)
        }

    assert packaged == repository


def _new_shell(installed: Installed, profiles: Path) -> dict[str, str]:
    """What a new shell has: HOME, PATH (the install first) and the profiles file."""
    return {
        "HOME": os.environ["HOME"],
        "PATH": os.pathsep.join(
            (str(installed.bin), str(Path(sys.executable).parent), os.environ.get("PATH", ""))
        ),
        "PREFECT_PROFILES_PATH": str(profiles),
    }


def _msi(
    installed: Installed, cwd: Path, env: dict[str, str], *args: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(installed.bin / "msi-prefect"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        check=False,
    )


def _files(folder: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file below ``folder``."""
    return {
        str(path.relative_to(folder)): _sha256(path.read_bytes())
        for path in sorted(folder.rglob("*"))
        if path.is_file() and "__pycache__" not in path.parts
    }


def _active_profile(profiles: Path) -> str | None:
    return tomllib.loads(profiles.read_text()).get("active")


def _deployments(api: str) -> dict[str, dict[str, object]]:
    with httpx.Client(base_url=api, timeout=API_TIMEOUT_S) as client:
        response = client.post("/deployments/filter", json={})
        response.raise_for_status()
        return {deployment["name"]: deployment for deployment in response.json()}


def _pull_directory(deployment: dict[str, object]) -> Path:
    steps = deployment["pull_steps"]
    assert isinstance(steps, list)
    step = steps[0]["prefect.deployments.steps.set_working_directory"]
    return Path(step["directory"])


def _drop_and_wait(folder: Path, api: str, name: str) -> list[dict[str, object]]:
    """Drop a file into the watched folder; wait for all its steps; return its events."""
    since = time.time()
    data = os.urandom(FILE_SIZE)
    (folder / "inbox" / name).write_bytes(data)
    done, _ = wait_until_done(api, since, lambda: {name}, FILE_TIMEOUT_S)
    assert done, f"{name} did not go through every step in {FILE_TIMEOUT_S} s"
    assert (folder / "received" / name).read_bytes() == data
    return [
        event
        for event in file_events(api, since, (EventName.ANALYZED,))
        if (event.get("payload") or {}).get("path") == name
    ]


@pytest.fixture
def empty_folder(tmp_path: Path, installed: Installed) -> Iterator[tuple[Path, dict[str, str]]]:
    """An empty folder to run `up` in, a user's profiles file; `down` (by PID if need be) after."""
    folder = tmp_path / "lab-site"
    folder.mkdir()
    profiles = tmp_path / "home" / "profiles.toml"
    profiles.parent.mkdir()
    profiles.write_text(USER_PROFILES)
    env = _new_shell(installed, profiles)
    yield folder, env
    state = StateDir(folder / ".msi")
    if state.load_config() is not None:
        api = StackManager.open(state).config.prefect_api_url
        down = _msi(installed, folder, env, "down")
        if down.returncode != 0 or flow_run_processes(api):
            kill_everything(state.root, api)


@pytest.mark.stack
@pytest.mark.own_stack
@pytest.mark.timeout(WHOLE_PATH_TIMEOUT_S)
def test_up_from_an_install_in_an_empty_folder_then_in_a_lab_project(
    installed: Installed, empty_folder: tuple[Path, dict[str, str]]
) -> None:
    folder, env = empty_folder
    profiles = Path(env["PREFECT_PROFILES_PATH"])
    where = _run(
        [str(installed.bin / "python"), "-c", "import msi_prefect as m; print(m.__file__)"],
        cwd=folder,  # as `up` runs: `python -c` imports from the folder it runs in first
    )
    assert Path(where.stdout.strip()).is_relative_to(installed.venv)
    ports = free_port_map()
    api = f"http://127.0.0.1:{ports['prefect']}/api"
    port_args = [arg for name, port in ports.items() for arg in ("--port", f"{name}={port}")]

    packaged = installed.venv.glob("lib/python*/site-packages/msi_prefect/project")
    (packaged_project,) = list(packaged)
    packaged_files = _files(packaged_project)
    started = time.monotonic()

    up = _msi(installed, folder, env, "up", *port_args)
    assert up.returncode == 0, up.stdout + up.stderr
    first_up = time.monotonic()

    # The package's deployments, deployed from where it is installed, which stays as it was.
    deployments = _deployments(api)
    assert set(deployments) == deployment_names(packaged_project / "prefect.yaml")
    assert _pull_directory(deployments["watch-directory"]) == packaged_project
    assert _files(packaged_project) == packaged_files
    # The Prefect CLI of a new shell talks to the stack.
    view = subprocess.run(
        ["prefect", "config", "view"], env=env, capture_output=True, text=True,
        timeout=CLI_TIMEOUT_S, check=False,
    )  # fmt: skip
    assert f"PREFECT_API_URL='{api}'" in view.stdout, view.stdout + view.stderr
    assert (_active_profile(profiles) or "").startswith(PROFILE_PREFIX)

    # A lab project: `up` in it deploys its prefect.yaml (the transfers started by the
    # first `up` keep running from the package), and a file goes through every step,
    # analysed by the project's own analysis.
    init = _msi(installed, folder, env, "init", "lab")
    assert init.returncode == 0, init.stdout + init.stderr
    again = _msi(installed, folder / "lab", env, "--state-dir", str(folder / ".msi"), "up")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "flows deployed" in again.stdout  # another project: deployed, not skipped
    second_up = time.monotonic()
    assert _pull_directory(_deployments(api)["analyze-file"]) == folder / "lab"
    (analyzed,) = _drop_and_wait(folder, api, "first.bin")
    assert analyzed["payload"]["analysis"] == ANALYSIS_SPEC
    assert analyzed["payload"]["result"] == {
        "analysis": ANALYSIS_MODULE,
        "file": "first.bin",
        "size_bytes": FILE_SIZE,
    }
    through = time.monotonic()

    down = _msi(installed, folder, env, "down")
    assert down.returncode == 0, down.stdout + down.stderr
    assert _active_profile(profiles) == "work"
    assert tomllib.loads(profiles.read_text()) == tomllib.loads(USER_PROFILES)
    print(
        f"up {first_up - started:.0f} s, init and up in the project {second_up - first_up:.0f} s, "
        f"a file through {through - second_up:.0f} s, down {time.monotonic() - through:.0f} s"
    )
