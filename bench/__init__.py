"""Benchmarks: they print figures and write JSON; tests never time anything."""
