"""Tests of the embedded stack: its settings, its processes, the warm-start worker, `up`/`down`."""
