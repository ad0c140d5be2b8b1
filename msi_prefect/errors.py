"""The project's error types: the user-facing one, and the base of the transfer core's.

Every layer may import this module; it imports nothing of the project.
"""


class MsiError(Exception):
    """An error whose message is meant for the user: it says what is wrong and what to do.

    The CLI prints these without a traceback and exits with a non-zero status.
    """


class TransferError(Exception):
    """Base of the transfer core's own errors (a bad message, path, file or destination).

    Subclasses: ``WireFormatError`` and ``UnsafePathError`` (also ``ValueError``: a bad
    value from a message), ``VerificationError`` (a rebuilt file does not match), and
    ``SinkError`` (a destination failed). A caller that wants "anything the transfer core
    reports" catches this.
    """


class EventDeliveryError(TransferError, OSError):
    """A file's outcome could not be recorded by its event consumer (e.g. a full disk).

    Raised by the reassembler when its event callback fails on storage (``OSError`` or
    ``sqlite3.OperationalError``, such as SQLite's "database or disk is full" from the
    durable event outbox). It is an ``OSError`` on purpose: the consumer's local-error path
    treats it like a full destination disk. The batch is not committed; it is rewound and
    retried after a pause, so the file's event is durable before its offsets are committed.
    """
