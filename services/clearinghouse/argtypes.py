"""Argument types shared by ``clearingctl``'s commands (no gRPC code: the CLI loads it
before it knows which command runs)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1
TCP_PORT_MAX = 65_535


def bounded_int(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: an integer from ``low`` to ``high`` (for a number that goes into
    a proto field, that field's range: a larger one is a one-line usage error, not a
    traceback from protobuf)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is not from {low} to {high}")
        return value

    parse.__name__ = "integer"  # what argparse names in its messages
    return parse


__all__ = ["INT32_MAX", "INT64_MAX", "TCP_PORT_MAX", "bounded_int"]
