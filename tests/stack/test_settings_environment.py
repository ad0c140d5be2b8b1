"""The worker's settings as environment variables, computed once per settings object."""

from __future__ import annotations

from typing import Any

import pytest
from prefect.settings import Settings, get_current_settings

from msi_prefect.warm_start.settings_environment import remember_settings_environment


@pytest.fixture
def counted_compute(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """Prefect's computation, counted; restored after the test."""
    compute = Settings.to_environment_variables
    calls: list[tuple[Any, ...]] = []

    def counted(self: Any, *arguments: Any, **named: Any) -> dict[str, str]:
        calls.append((id(self), arguments, named))
        return compute(self, *arguments, **named)

    monkeypatch.setattr(Settings, "to_environment_variables", counted)
    return calls


def test_the_same_settings_are_turned_into_an_environment_once(
    counted_compute: list[tuple[Any, ...]],
) -> None:
    settings = get_current_settings()
    expected = settings.to_environment_variables(exclude_unset=True)
    counted_compute.clear()
    assert remember_settings_environment()

    first = settings.to_environment_variables(exclude_unset=True)
    first["PREFECT_CHANGED_BY_A_CALLER"] = "1"  # a caller's copy is its own
    second = settings.to_environment_variables(exclude_unset=True)
    assert first != second and second == expected
    assert len(counted_compute) == 1


def test_other_settings_or_other_arguments_are_computed_anew(
    counted_compute: list[tuple[Any, ...]],
) -> None:
    settings = get_current_settings()
    assert remember_settings_environment()
    settings.to_environment_variables(exclude_unset=True)
    everything = settings.to_environment_variables(exclude_unset=False)
    assert len(everything) > len(settings.to_environment_variables(exclude_unset=True))

    changed = settings.model_copy(
        update={"client": settings.client.model_copy(update={"max_retries": 0})}
    )
    assert changed.to_environment_variables(exclude_unset=True)["PREFECT_CLIENT_MAX_RETRIES"] == "0"
    assert len(counted_compute) == 4  # unset-only, everything, unset-only again, the copy
