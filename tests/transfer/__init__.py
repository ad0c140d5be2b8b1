"""Transfer core tests (msi_prefect/transfer): units, and round trips on the session broker."""
