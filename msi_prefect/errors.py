"""The project's user-facing error type."""


class MsiError(Exception):
    """An error whose message is meant for the user: it says what is wrong and what to do.

    The CLI prints these without a traceback and exits with a non-zero status.
    """
