"""Shared pieces of the ``prism`` commands' ``--help`` texts."""

from __future__ import annotations


def examples(*lines: str) -> str:
    """A command's ``--help`` epilog: example command lines, one paragraph each.

    tests/platform/test_runnable_examples.py parses every line with the real command and runs
    those that need nothing but the repository."""
    return "Examples:\n\n" + "\n\n".join(f"  {line}" for line in lines)
