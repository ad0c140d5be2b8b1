"""Tests of the Prefect layer: blocks, events, dispatch, and the per-file and long-running flows."""
