"""Benchmarks: measurement scripts run by hand from the repository root (``python -m bench``
for all of them, ``python -m bench.<name>`` for one), never by the tests."""
