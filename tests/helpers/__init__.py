"""Test helpers: not tests themselves (pytest collects only test_*.py)."""
