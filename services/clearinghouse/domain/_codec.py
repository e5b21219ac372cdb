"""Length-prefixed binary encoding shared by fingerprints and the ledger hash chain.

All integers are big-endian. A byte string is written as its length in a 4-byte
unsigned integer followed by the bytes; a text string is its UTF-8 bytes written the
same way. Fixed-width integers need no prefix. The encoding never depends on a dict's
order, on the platform, or on the Python version.
"""

from __future__ import annotations

import struct
from typing import Final

from clearinghouse._invariant import InvariantViolation, invariant

U32_MAX: Final = 2**32 - 1
U64_MAX: Final = 2**64 - 1
I64_MIN: Final = -(2**63)
I64_MAX: Final = 2**63 - 1
_U32: Final = struct.Struct(">I")
_I64: Final = struct.Struct(">q")
_ENDS_EARLY: Final = "encoded value ends early"


def u64(value: int) -> bytes:
    invariant(0 <= value <= U64_MAX, f"{value} does not fit in an unsigned 64-bit integer")
    return value.to_bytes(8, "big", signed=False)


def i64(value: int) -> bytes:
    invariant(I64_MIN <= value <= I64_MAX, f"{value} does not fit in a signed 64-bit integer")
    return value.to_bytes(8, "big", signed=True)


def blob(value: bytes) -> bytes:
    invariant(len(value) <= U32_MAX, "a length-prefixed field must be shorter than 4 GiB")
    return len(value).to_bytes(4, "big", signed=False) + value


def text(value: str) -> bytes:
    # Strict UTF-8: a string with lone surrogates has no canonical bytes, so it is a
    # programming error to encode one (validation rejects them first).
    return blob(value.encode("utf-8", errors="strict"))


class Reader:
    """Reads back what the functions above wrote, in order; checks every length.

    Takeover replays every entry of a shard's chain through here, so each read is one
    bounds check and one ``struct`` unpack or slice, without helper calls."""

    __slots__ = ("data", "end", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.end = len(data)
        self.pos = 0

    def i64(self) -> int:
        pos = self.pos
        if pos + 8 > self.end:
            raise InvariantViolation(_ENDS_EARLY)
        self.pos = pos + 8
        value: int = _I64.unpack_from(self.data, pos)[0]
        return value

    def blob(self) -> bytes:
        pos = self.pos
        if pos + 4 > self.end:
            raise InvariantViolation(_ENDS_EARLY)
        start = pos + 4
        stop = start + _U32.unpack_from(self.data, pos)[0]
        if stop > self.end:
            raise InvariantViolation(_ENDS_EARLY)
        self.pos = stop
        return self.data[start:stop]

    def text(self) -> str:
        return self.blob().decode("utf-8", errors="strict")

    def done(self) -> None:
        invariant(self.pos == self.end, "trailing bytes after an encoded value")
