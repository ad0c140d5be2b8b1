"""How the warm start puts its versions of library functions in place, in one way.

Each patch replaces one attribute of a library (Prefect, botocore, aiobotocore) with a
function that calls the library's own. :func:`library_original` finds the library's own
even when a patch of ours is in place already (a second call patches it once, not twice)
and says so when a library has changed and has no such attribute; :func:`put_in_place`
installs a patch and remembers the original on it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("msi_prefect.warm_start")

#: Where a patch keeps the library's own function.
ORIGINAL_ATTRIBUTE = "__msi_warm_start_original__"


def library_original(owner: Any, name: str) -> Callable[..., Any] | None:
    """``owner.name`` as the library made it, or None (logged) when ``owner`` has none."""
    found = getattr(owner, name, None)
    if found is None:
        logger.warning(
            "warm start: %s has no %s (its library changed); that work is left to each run",
            getattr(owner, "__name__", owner),
            name,
        )
        return None
    original: Callable[..., Any] = getattr(found, ORIGINAL_ATTRIBUTE, found)
    return original


def put_in_place(
    owner: Any, name: str, patch: Callable[..., Any], original: Callable[..., Any]
) -> None:
    """Make ``patch`` ``owner.name``, remembering the library's ``original`` on it."""
    setattr(patch, ORIGINAL_ATTRIBUTE, original)
    patch.__doc__ = original.__doc__
    setattr(owner, name, patch)
