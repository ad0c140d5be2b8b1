"""Calls to the stack's Prefect API while `msi-prefect up` runs, retried until a deadline.

A Prefect server that has just been started answers its health check before it keeps up
with everything else: after a crash the worker, both transfers, the downstream runs and
their event outboxes reconnect at once, the server catches up on a SQLite database, and
one request can take far longer than usual or be answered 503 ("database is locked").
Measured: `POST /work_pools/` timed out after 10 s on such a server, and `up` failed. So
each API call of `up` is retried (transport errors, timeouts, 429 and 5xx answers) with a
growing pause until an overall deadline, and only then fails, with an error that names
the step, the last answer and what to do.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from msi_prefect.errors import MsiError
from msi_prefect.prefect_layer.event_queries import RETRIED_STATUS_CODES

if TYPE_CHECKING:
    import httpx

#: How long `up` keeps trying one API call before it gives up on it.
UP_CALL_DEADLINE_S = 180.0
#: How long one attempt may take (a busy server answers slowly, but it answers).
ATTEMPT_TIMEOUT_S = 30.0
#: The shortest time one attempt is given, even when the deadline is nearer.
MIN_ATTEMPT_TIMEOUT_S = 1.0
FIRST_PAUSE_S = 1.0
MAX_PAUSE_S = 10.0


@dataclass(frozen=True)
class RetryPolicy:
    """How one API call is retried.

    Attributes:
        deadline_s: Overall time for every attempt and pause together.
        attempt_timeout_s: Time one attempt may take.
        first_pause_s: Pause after the first failed attempt; it doubles up to
            ``max_pause_s``.
        max_pause_s: Longest pause between attempts.
    """

    deadline_s: float = UP_CALL_DEADLINE_S
    attempt_timeout_s: float = ATTEMPT_TIMEOUT_S
    first_pause_s: float = FIRST_PAUSE_S
    max_pause_s: float = MAX_PAUSE_S


#: The policy of every API call `up` makes.
UP_RETRY = RetryPolicy()


class PrefectApiError(MsiError):
    """A call to the stack's Prefect API did not succeed within its deadline."""


def request(
    client: httpx.Client,
    method: str,
    path: str,
    what: str,
    policy: RetryPolicy | None = UP_RETRY,
    **kwargs: Any,
) -> httpx.Response:
    """Send one request, retrying until it gets a final answer or the deadline passes.

    Args:
        client: The HTTP client (its base URL is the Prefect API).
        method: HTTP method.
        path: Path below the API URL.
        what: The step, for the error message (e.g. "creating the work pool").
        policy: How to retry; None: one attempt with the client's own timeout.
        **kwargs: Passed to ``client.request`` (``json``, ...).

    Returns:
        The first answer whose status is not retried (the caller judges it: a 409 can be
        what it expects).

    Raises:
        PrefectApiError: Every attempt failed or was answered with a retried status.
    """
    import httpx

    if policy is None:
        try:
            return client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise PrefectApiError(
                f"{what} failed: the Prefect API did not answer ({exc!r})"
            ) from exc
    deadline = time.monotonic() + policy.deadline_s
    pause = policy.first_pause_s
    attempts = 0
    while True:
        attempts += 1
        remaining = deadline - time.monotonic()
        timeout = max(MIN_ATTEMPT_TIMEOUT_S, min(policy.attempt_timeout_s, remaining))
        try:
            response = client.request(method, path, timeout=timeout, **kwargs)
        except httpx.TransportError as exc:
            last = repr(exc)
        else:
            if response.status_code not in RETRIED_STATUS_CODES:
                return response
            last = f"HTTP {response.status_code}: {response.text[:200]}"
        if time.monotonic() + pause >= deadline:
            raise PrefectApiError(
                f"{what} failed: the Prefect API at {client.base_url} did not answer within "
                f"{policy.deadline_s:.0f} s ({attempts} attempts; last: {last})"
            )
        time.sleep(pause)
        pause = min(policy.max_pause_s, pause * 2)


def checked(response: httpx.Response, what: str) -> httpx.Response:
    """``response`` if it is a success; else a :class:`PrefectApiError` naming the step."""
    if not response.is_success:
        raise PrefectApiError(
            f"{what} failed: HTTP {response.status_code} from {response.request.url}: "
            f"{response.text[:300]}"
        )
    return response
