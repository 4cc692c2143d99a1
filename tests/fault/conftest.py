"""Fault tests kill real processes; they need the same real stack as integration tests."""

from tests.integration.conftest import stack

__all__ = ["stack"]
