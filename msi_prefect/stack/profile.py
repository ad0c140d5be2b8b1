"""The stack's Prefect CLI profile: `up` makes it the active one, `down` restores the one before.

Without it, ``prefect flow-run ls`` in a new shell knows no API URL and starts a temporary
server of its own, which shows nothing. `up` saves a profile of Prefect's own
(:func:`profile_name`) whose ``PREFECT_API_URL`` is the stack's API, in the profiles file
the Prefect CLI reads in the shell `up` runs in (Prefect's rule: ``PREFECT_PROFILES_PATH``,
else ``PREFECT_HOME/profiles.toml``, else ``~/.prefect/profiles.toml``), and makes it the
active one, as ``prefect profile create`` and ``prefect profile use`` would.

Which profile was active before, and which file was changed, are kept in the state dir
(:data:`PROFILE_RECORD`). `down` removes the stack's profile and makes the earlier one
active again, but only while the stack's is still the active one: a user who switched
profiles since keeps the choice. `up` run again on a running stack keeps the first record,
so ``down`` still goes back to the profile of before the first `up`.

A shell with ``PREFECT_PROFILE`` or ``PREFECT_API_URL`` set goes by those instead (Prefect
lets the environment win over the profiles file).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from msi_prefect.errors import MsiError
from msi_prefect.stack.config import StackConfig, StateDir

logger = logging.getLogger(__name__)

#: In the state dir: the profile `up` activated and the one active before it.
PROFILE_RECORD = "prefect-profile.json"
#: Every stack profile's name starts with this.
PROFILE_PREFIX = "msi-"
#: Characters of the state dir's hash in a profile name (tells stacks of one folder name apart).
PROFILE_HASH_CHARS = 6
#: Longest part of a profile name taken from the project folder's name.
PROFILE_FOLDER_CHARS = 40
API_URL_SETTING = "PREFECT_API_URL"
ACTIVE_KEY = "active"
PROFILES_KEY = "profiles"
# A new profiles file is the user's alone, as Prefect creates it.
PROFILES_FILE_MODE = 0o600
_NOT_IN_NAME = re.compile(r"[^A-Za-z0-9_-]+")


@dataclass(frozen=True)
class ProfileRecord:
    """What `up` changed in a profiles file, so `down` can undo it.

    Attributes:
        profile: The stack's profile.
        profiles_path: The profiles file it is in.
        previous_active: The profile active in that file before `up` (None: the file
            named none, so Prefect's default applied).
    """

    profile: str
    profiles_path: str
    previous_active: str | None


def profile_name(state: StateDir) -> str:
    """The stack's profile: ``msi-<project folder>-<hash of the state dir>``.

    The folder holding the state dir names the stack for a person; the hash tells two
    stacks apart whose folders have the same name.
    """
    folder = _NOT_IN_NAME.sub("-", state.root.parent.name).strip("-")[:PROFILE_FOLDER_CHARS]
    digest = hashlib.sha256(str(state.root).encode()).hexdigest()[:PROFILE_HASH_CHARS]
    return f"{PROFILE_PREFIX}{folder or 'stack'}-{digest}"


def user_profiles_path() -> Path:
    """The profiles file the Prefect CLI reads in this process's environment."""
    from prefect.settings import get_current_settings

    return Path(get_current_settings().profiles_path).expanduser()


def activate_stack_profile(state: StateDir, config: StackConfig) -> ProfileRecord:
    """Save the stack's profile (its API URL) and make it the active one.

    Args:
        state: The stack's state dir (the profile's name and the record live there).
        config: The stack's settings (its API URL).

    Returns:
        What was changed, as saved in the state dir.

    Raises:
        MsiError: The profiles file cannot be read (not TOML) or written.
    """
    name = profile_name(state)
    earlier = load_record(state)
    path = Path(earlier.profiles_path) if earlier else user_profiles_path()
    document = _read_profiles(path)
    previous = document.get(ACTIVE_KEY)
    if previous == name:  # `up` again on a running stack: keep what was active before it
        previous = earlier.previous_active if earlier else None
    profiles = document.setdefault(PROFILES_KEY, {})
    profiles[name] = {API_URL_SETTING: config.prefect_api_url}
    document[ACTIVE_KEY] = name
    record = ProfileRecord(profile=name, profiles_path=str(path), previous_active=previous)
    _save_record(state, record)  # first: a `down` after a failed write still restores
    _write_profiles(path, document)
    return record


def restore_previous_profile(state: StateDir) -> str | None:
    """Remove the stack's profile and make the one active before `up` active again.

    The active profile changes only while it is the stack's (the user may have chosen
    another since). A previous profile that is gone by now is not made active: the file
    then names none, so Prefect's default applies.

    Returns:
        The profile made active again (None: Prefect's default, or nothing to restore).

    Raises:
        MsiError: The profiles file cannot be read (not TOML) or written.
    """
    record = load_record(state)
    if record is None:
        return None
    path = Path(record.profiles_path)
    document = _read_profiles(path)
    profiles = document.setdefault(PROFILES_KEY, {})
    restored = None
    if document.get(ACTIVE_KEY) == record.profile:
        previous = record.previous_active
        if previous is not None and (previous in profiles or previous in _default_profiles()):
            document[ACTIVE_KEY] = restored = previous
        else:
            document.pop(ACTIVE_KEY, None)
    profiles.pop(record.profile, None)
    _write_profiles(path, document)
    (state.root / PROFILE_RECORD).unlink(missing_ok=True)
    return restored


def load_record(state: StateDir) -> ProfileRecord | None:
    """The record an earlier `up` saved, or None.

    Raises:
        MsiError: The record is damaged.
    """
    path = state.root / PROFILE_RECORD
    if not path.is_file():
        return None
    try:
        return ProfileRecord(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError) as exc:
        raise MsiError(f"{path} is damaged ({exc}); remove it.") from exc


def _save_record(state: StateDir, record: ProfileRecord) -> None:
    state.root.mkdir(parents=True, exist_ok=True)
    tmp = state.root / f"{PROFILE_RECORD}.tmp"
    tmp.write_text(json.dumps(asdict(record), indent=2))
    tmp.replace(state.root / PROFILE_RECORD)


def _default_profiles() -> set[str]:
    """The profiles Prefect ships (they need no entry in the user's file)."""
    from prefect.settings.profiles import DEFAULT_PROFILES_PATH

    return set(tomllib.loads(Path(DEFAULT_PROFILES_PATH).read_text()).get(PROFILES_KEY, {}))


def _read_profiles(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        document = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise MsiError(f"cannot read the Prefect profiles file {path}: {exc}") from exc
    if not isinstance(document.get(PROFILES_KEY, {}), dict):
        raise MsiError(f"the Prefect profiles file {path} has no [profiles] tables")
    return document


def _write_profiles(path: Path, document: dict[str, Any]) -> None:
    """Write the file atomically, in the TOML form Prefect itself writes (``toml.dumps``)."""
    import toml

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        mode = path.stat().st_mode & 0o777 if path.exists() else PROFILES_FILE_MODE
        tmp = path.with_name(f".{path.name}.msi-tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "w") as handle:
            handle.write(toml.dumps(document))
        tmp.replace(path)
    except OSError as exc:
        raise MsiError(f"cannot write the Prefect profiles file {path}: {exc}") from exc
