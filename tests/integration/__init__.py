"""Scenarios across layers: faults, the commit order of events, broker security, power cuts."""
