"""A multi-region, active-active payment clearing switch.

The public surface of this package is small on purpose; subsystems live in their own
modules (``topology``, ``localcluster``, ``cli``) and import what they need from each
other explicitly.
"""

from clearinghouse._invariant import InvariantViolation, invariant

__all__ = ["InvariantViolation", "invariant"]
__version__ = "0.1.0"
