"""Sinks: the events topic projected into PostgreSQL and Redis (issue #4)."""
