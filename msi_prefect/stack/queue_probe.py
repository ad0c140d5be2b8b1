"""An opt-in look into the Prefect server's in-memory message queues, for benchmarks.

Prefect's server hands every event to each subscriber of the ``events`` topic (the event
persister, the reactive triggers, the task-run recorder, the event streams...) through a
queue of its own of at most 10,000 messages (30,000 on the stack's server:
``components.subscription_queues_deepened``); a message for a full queue is dropped with
"Subscription queue is full, dropping message for topic='events'", which does not say
whose queue it was. With ``MSI_SERVER_QUEUE_REPORT_S=N`` in the server's environment,
`install` names each subscription after the server module that made it and a thread logs
every queue's depth every N seconds::

    msi-queue-depths events/event_persister=9812 events/triggers=0 ...

so the slow subscriber is the one whose queue grows. Prefect 3.8/3.9's memory messaging
(``prefect.server.utilities.messaging.memory``); nothing changes when the variable is unset.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import weakref
from typing import Any

QUEUE_REPORT_ENV = "MSI_SERVER_QUEUE_REPORT_S"
REPORT_PREFIX = "msi-queue-depths"
MESSAGING_PACKAGE = "prefect.server.utilities.messaging"
SERVER_PACKAGE = "prefect.server."
UNKNOWN_SUBSCRIBER = "unknown"

logger = logging.getLogger(__name__)


def subscriber_name(frame: Any) -> str:
    """The last part of the first server module, outside the messaging package, on the stack.

    Args:
        frame: The frame to start from (the caller of ``Topic.subscribe``).
    """
    while frame is not None:
        module = str(frame.f_globals.get("__name__", ""))
        if module.startswith(SERVER_PACKAGE) and not module.startswith(MESSAGING_PACKAGE):
            return module.rsplit(".", 1)[-1]
        frame = frame.f_back
    return UNKNOWN_SUBSCRIBER


def install(environ: dict[str, str] | None = None) -> bool:
    """Name the server's subscriptions and start the reporting thread, if asked to.

    Args:
        environ: Where to read ``MSI_SERVER_QUEUE_REPORT_S`` (default: this process's).

    Returns:
        True if the probe was installed.
    """
    environ = dict(os.environ) if environ is None else environ
    period_text = environ.get(QUEUE_REPORT_ENV, "")
    if not period_text:
        return False
    period_s = float(period_text)
    if period_s <= 0:
        raise ValueError(f"{QUEUE_REPORT_ENV} must be a positive number of seconds")
    from prefect.server.utilities.messaging.memory import Subscription, Topic

    names: weakref.WeakKeyDictionary[Subscription, str] = weakref.WeakKeyDictionary()
    original_subscribe = Topic.subscribe

    def subscribe(self: Topic, **kwargs: Any) -> Subscription:
        subscription = original_subscribe(self, **kwargs)
        names[subscription] = f"{self.name}/{subscriber_name(sys._getframe(1))}"
        return subscription

    Topic.subscribe = subscribe  # type: ignore[method-assign]

    def report() -> None:
        while True:
            time.sleep(period_s)
            depths = [
                f"{name}={subscription._queue.qsize()}+{subscription._retry.qsize()}"
                for subscription, name in list(names.items())
            ]
            print(f"{REPORT_PREFIX} {time.time():.1f} {' '.join(depths)}", flush=True)

    threading.Thread(target=report, name="msi-queue-probe", daemon=True).start()
    return True
