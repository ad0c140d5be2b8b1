"""Fault-injection ("chaos") runs of the transfer path; opt in with ``-m chaos``."""
