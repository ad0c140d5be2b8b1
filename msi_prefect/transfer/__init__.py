"""Transfer core: wire format, path safety and the persisted state of producers and consumers."""
