"""Checks that must hold whatever the input, and that survive ``python -O``.

``assert`` statements disappear under ``-O``; a clearing system must not lose its
safety checks because of an interpreter flag. ``invariant()`` is for programmer errors
and broken invariants (debits equal credits, positions within caps, sequences without
gaps). Operating errors (bad input, a server down) are handled, never asserted.
"""

from __future__ import annotations


class InvariantViolation(AssertionError):
    """An invariant of the system did not hold. Never caught to continue quietly."""


def invariant(condition: object, message: str) -> None:
    """Raise :class:`InvariantViolation` with ``message`` unless ``condition`` is truthy."""
    if not condition:
        raise InvariantViolation(message)
