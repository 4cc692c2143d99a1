"""Foundations every other package may import: settings, logging, progress bars,
child-process supervision and what the web servers share (`core.http`). This package
imports nothing else of Tally's (tests/unit/test_layers.py holds it to that)."""
