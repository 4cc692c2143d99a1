"""Foundations every other package may import: settings, logging, progress bars and
child-process supervision. This package imports nothing else of Tally's
(tests/unit/test_layers.py holds it to that)."""
