"""Tests of the `msi-prefect` command line: its subcommands, as a user runs them."""
