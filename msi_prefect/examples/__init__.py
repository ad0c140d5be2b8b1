"""Small examples of user code the flows can run (e.g. analyses for ``analyze-file``)."""
