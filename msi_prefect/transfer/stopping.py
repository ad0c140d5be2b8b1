"""How long-running loops end: by signal, by count, or when idle."""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StopConditions:
    """When a run ends by itself (besides the stop event).

    Attributes:
        stop_after_files: End after this many files were finished (sent, rebuilt, or
            rejected). Only files count: a rejected message that names no file (no path,
            no file id: garbage, another application's message) is counted apart.
        idle_timeout_s: End after this long with nothing to do.
    """

    stop_after_files: int | None = None
    idle_timeout_s: float | None = None


class StopOnSignal:
    """While active, SIGTERM and SIGINT set an event instead of killing the process.

    The loops watch the event: they finish the batch in hand, flush, commit and return.
    Signal handlers can only be installed from the main thread; elsewhere (a Prefect flow
    run in a worker thread) this is a no-op and the caller's own cancellation applies.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, event: threading.Event | None = None) -> None:
        self.event = event or threading.Event()
        self._previous: dict[signal.Signals, Any] = {}

    def __enter__(self) -> threading.Event:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self.event

    def _handle(self, signum: int, _frame: Any) -> None:
        logger.info(
            "%s received: finishing the current batch, then stopping", signal.Signals(signum).name
        )
        self.event.set()

    def __exit__(self, *_exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
