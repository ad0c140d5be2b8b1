"""Fixtures of the fault-injection tests here: a private broker and S3 store, the processes
a test starts (stopped by PID), and a tiny tmpfs for full-disk faults (tests/chaos/harness.py).
"""

from tests.chaos.harness import private_stack, processes, tiny_tmpfs

__all__ = ["private_stack", "processes", "tiny_tmpfs"]  # fixtures
