"""Reading events back from the Prefect API: ``POST /events/filter`` and its pages.

The server answers a filter with at most 50 events and a ``next_page`` link to the rest;
every reader (``msi-prefect files``, the benchmarks, the stack tests) walks the pages the
same way, here.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # only annotations: importing this module must stay cheap (upload CLI)
    import httpx

__all__ = ["EVENTS_FILTER_PATH", "RETRIED_STATUS_CODES", "event_pages"]

#: Answers of the Prefect API that say "not now" rather than "no": every caller that
#: retries its own API calls retries these.
RETRIED_STATUS_CODES = frozenset({429, 500, 502, 503, 504})

#: The filter endpoint, relative to the API URL.
EVENTS_FILTER_PATH = "/events/filter"


def event_pages(
    client: httpx.Client, body: dict[str, Any], api_url: str = ""
) -> Iterator[list[dict[str, Any]]]:
    """Each page of events the server returns for one filter, following ``next_page``.

    Args:
        client: A client on the Prefect API (with ``base_url``, or pass ``api_url``).
        body: The filter request (``filter``, ``limit``).
        api_url: The API URL, for a client without ``base_url``.

    Yields:
        The events of each page, in the filter's order. Stop iterating to stop reading.

    Raises:
        httpx.HTTPError: The server did not answer, or answered with an error.
    """
    response = client.post(f"{api_url}{EVENTS_FILTER_PATH}", json=body)
    while True:
        response.raise_for_status()
        page = response.json()
        yield page.get("events", [])
        next_page = page.get("next_page")
        if not next_page:
            return
        response = client.get(next_page)
