"""Shared by the tests of exact error messages (no tests here)."""

import re


def exact(message: str) -> str:
    """A `pytest.raises(match=...)` pattern that accepts `message` and nothing else."""
    return "^" + re.escape(message) + "$"
