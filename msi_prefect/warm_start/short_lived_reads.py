"""The worker's reads of a deployment and a flow, shared for a few seconds.

Prefect's worker reads a run's deployment twice before it starts the run (once to see that
it still exists, once to build the run's job configuration) and then its flow, one request
after the other. :class:`ShortLivedReads` lets the second read of the same deployment take
the first one's answer, and lets a read already under way serve every caller that asks
meanwhile (a burst of runs of one deployment makes one read). An answer is kept for
``ttl_s`` seconds only: a deployment changed (``prefect deploy``) is seen by the runs
submitted from ``ttl_s`` seconds later on. A failed read is never kept.
"""

from __future__ import annotations

import copy
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar
from uuid import UUID

import anyio

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

#: How long an answer serves later reads: long enough for the reads of one submission and
#: of a burst, short enough that a redeployed deployment is seen at once in practice.
DEFAULT_TTL_S = 2.0
DEFAULT_CAPACITY = 256


@dataclass
class _Entry(Generic[V]):
    done: anyio.Event = field(default_factory=anyio.Event)
    at: float = 0.0
    value: V | None = None
    ok: bool = False
    error: Exception | None = None


class ShortLivedReads(Generic[K, V]):
    """One read per key per ``ttl_s`` seconds; every caller gets its own deep copy.

    Args:
        read: The read to share (an API call).
        ttl_s: Seconds an answer is reused.
        capacity: Keys kept at most (the oldest go first).
        clock: Monotonic seconds (tests pass their own).
    """

    def __init__(
        self,
        read: Callable[[K], Awaitable[V]],
        ttl_s: float = DEFAULT_TTL_S,
        capacity: int = DEFAULT_CAPACITY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl_s < 0 or capacity < 1:
            raise ValueError("ttl_s must be >= 0 and capacity >= 1")
        self._read = read
        self._ttl_s = ttl_s
        self._capacity = capacity
        self._clock = clock
        self._entries: OrderedDict[K, _Entry[V]] = OrderedDict()
        self.reads = 0

    def _fresh(self, entry: _Entry[V]) -> bool:
        if not entry.done.is_set():
            return True  # under way: wait for it
        return entry.ok and self._clock() - entry.at <= self._ttl_s

    async def get(self, key: K) -> V:
        """The answer for ``key``: a read under way or younger than ``ttl_s``, or a new read.

        Raises:
            Exception: What the read raised (to every caller that waited for it).
        """
        while True:
            entry = self._entries.get(key)
            if entry is None or not self._fresh(entry):
                return await self._read_into(key)
            await entry.done.wait()
            if entry.ok:
                # Prefect changes what it reads (a deployment's job variables): a copy each.
                return copy.deepcopy(entry.value)  # type: ignore[return-value]
            if entry.error is not None:
                raise entry.error
            # The reader was cancelled: read again.

    async def _read_into(self, key: K) -> V:
        entry: _Entry[V] = _Entry()
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self._capacity:
            self._entries.popitem(last=False)
        self.reads += 1
        try:
            value = await self._read(key)
        except Exception as exc:
            entry.error = exc
            raise
        else:
            entry.value, entry.ok = value, True
            return copy.deepcopy(value)
        finally:
            entry.at = self._clock()
            entry.done.set()


def _as_uuid(value: UUID | str) -> UUID:
    return value if isinstance(value, UUID) else UUID(str(value))


def share_deployment_and_flow_reads(client: Any, ttl_s: float = DEFAULT_TTL_S) -> None:
    """Make ``client`` (a worker's ``PrefectClient``) share its deployment and flow reads.

    Only this client instance changes: its ``read_deployment`` and ``read_flow`` go through
    a :class:`ShortLivedReads` each; everything else is the client's own.
    """
    deployments: ShortLivedReads[UUID, Any] = ShortLivedReads(client.read_deployment, ttl_s)
    flows: ShortLivedReads[UUID, Any] = ShortLivedReads(client.read_flow, ttl_s)

    async def read_deployment(deployment_id: UUID | str) -> Any:
        return await deployments.get(_as_uuid(deployment_id))

    async def read_flow(flow_id: UUID | str) -> Any:
        return await flows.get(_as_uuid(flow_id))

    client.read_deployment = read_deployment
    client.read_flow = read_flow
