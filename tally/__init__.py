"""Tally: the command-line entry point, settings and jobs that tie the packages together."""
