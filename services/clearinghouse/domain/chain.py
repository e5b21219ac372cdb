"""The per-shard hash chain of ledger entries.

Each shard of the ledger is one chain: entry ``seq`` carries the hash of entry
``seq - 1`` (``prev_hash``) and its own hash (``entry_hash``), so that changing,
removing or reordering any stored entry breaks every later link. The first entry of a
shard has ``seq == FIRST_SEQ`` and ``prev_hash == GENESIS_HASH``. ``epoch`` is the
shard-ownership epoch of the node that wrote the entry; it never decreases along a
chain, because a new owner continues its predecessor's chain with a higher epoch.

Entry hash, version 1, for auditors who re-implement it. All integers are unsigned
big-endian; ``lp(b)`` is ``len(b)`` as a 4-byte integer followed by the bytes ``b``;
strings are their UTF-8 bytes without normalisation::

    entry_hash = SHA-256(
        lp(b"clearing.LedgerEntry.v1")    # 4 + 23 bytes: 00 00 00 17 "clearing..."
        || u64(shard) || u64(epoch) || u64(seq)          # 8 bytes each
        || lp(utf8(kind)) || lp(utf8(payment_key)) || lp(body)
        || prev_hash                        # exactly 32 bytes, no length prefix
    )
"""

from __future__ import annotations

import enum
import hashlib
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from clearinghouse._invariant import invariant
from clearinghouse.domain import _codec

ENTRY_HASH_TAG: Final = b"clearing.LedgerEntry.v1"
HASH_LEN: Final = 32
GENESIS_HASH: Final = bytes(HASH_LEN)
_TAG_LP: Final = _codec.blob(ENTRY_HASH_TAG)
_HEAD: Final = struct.Struct(">QQQI")  # shard, epoch, seq, len(kind)
_U32: Final = struct.Struct(">I")
# Sequence numbers start at 1, so that 0 can never be mistaken for a written entry.
FIRST_SEQ: Final = 1


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    shard: int
    epoch: int
    seq: int
    kind: str
    payment_key: str
    body: bytes
    prev_hash: bytes
    entry_hash: bytes


def entry_hash(
    *,
    shard: int,
    epoch: int,
    seq: int,
    kind: str,
    payment_key: str,
    body: bytes,
    prev_hash: bytes,
) -> bytes:
    """SHA-256 over the version-1 encoding in the module docstring.

    The arguments are keyword-only because shard, epoch and seq are all integers, and
    swapping two of them would silently produce a different, wrong hash.
    """
    invariant(len(prev_hash) == HASH_LEN, f"prev_hash must be {HASH_LEN} bytes")
    # The encoding of the docstring in one pack of its fixed part (every takeover and
    # audit hashes each entry again: the field-by-field form cost three times as much).
    invariant(
        0 <= shard <= _codec.U64_MAX and 0 <= epoch <= _codec.U64_MAX
        and 0 <= seq <= _codec.U64_MAX,
        f"shard {shard}, epoch {epoch}, seq {seq}: each must fit in an unsigned 64-bit integer",
    )  # fmt: skip
    invariant(len(body) <= _codec.U32_MAX, "a length-prefixed field must be shorter than 4 GiB")
    k = kind.encode("utf-8", errors="strict")
    key = payment_key.encode("utf-8", errors="strict")
    fixed = _HEAD.pack(shard, epoch, seq, len(k))
    preimage = b"".join((_TAG_LP, fixed, k, _U32.pack(len(key)), key, _U32.pack(len(body)),
                         body, prev_hash))  # fmt: skip
    return hashlib.sha256(preimage).digest()


class ChainBuilder:
    """Appends entries to one shard's chain as the shard's current owner, at one epoch."""

    def __init__(self, shard: int, epoch: int, next_seq: int, head_hash: bytes) -> None:
        invariant(0 <= shard <= _codec.U64_MAX, f"shard {shard} out of range")
        invariant(0 <= epoch <= _codec.U64_MAX, f"epoch {epoch} out of range")
        invariant(FIRST_SEQ <= next_seq <= _codec.U64_MAX, f"next_seq {next_seq} out of range")
        invariant(len(head_hash) == HASH_LEN, f"head_hash must be {HASH_LEN} bytes")
        invariant(
            next_seq != FIRST_SEQ or head_hash == GENESIS_HASH,
            "the first entry of a chain must follow GENESIS_HASH",
        )
        self.shard = shard
        self.epoch = epoch
        self.next_seq = next_seq
        self.head_hash = head_hash

    def append(self, kind: str, payment_key: str, body: bytes) -> LedgerEntry:
        """Build the next entry and advance the head; the caller persists the entry."""
        invariant(kind != "", "a ledger entry needs a kind")
        seq = self.next_seq
        digest = entry_hash(
            shard=self.shard,
            epoch=self.epoch,
            seq=seq,
            kind=kind,
            payment_key=payment_key,
            body=body,
            prev_hash=self.head_hash,
        )
        entry = LedgerEntry(
            self.shard, self.epoch, seq, kind, payment_key, body, self.head_hash, digest
        )
        self.next_seq = seq + 1
        self.head_hash = digest
        invariant(self.next_seq == entry.seq + 1, "sequence numbers must have no gaps")
        return entry


@enum.unique
class ChainProblem(enum.Enum):
    GAP = "GAP"  # An entry is missing: the seq found is above the one expected.
    DUPLICATE_SEQ = "DUPLICATE_SEQ"  # The seq found was already seen (or is below start).
    WRONG_PREV_HASH = "WRONG_PREV_HASH"  # prev_hash is not the previous entry's hash.
    WRONG_ENTRY_HASH = "WRONG_ENTRY_HASH"  # The entry's content does not match its hash.
    SHARD_MISMATCH = "SHARD_MISMATCH"  # The entry belongs to another shard.
    EPOCH_REGRESSED = "EPOCH_REGRESSED"  # The entry's epoch is below its predecessor's.


@dataclass(frozen=True, slots=True)
class ChainReport:
    """The outcome of :func:`verify_chain`.

    ``verified`` entries were checked and linked; ``head_seq``/``head_hash`` are those
    of the last of them (``start_seq - 1``/``start_hash`` when none was). When the chain
    is broken, ``broken_seq`` is the first seq that could not be verified.
    """

    ok: bool
    verified: int
    head_seq: int
    head_hash: bytes
    broken_seq: int | None = None
    problem: ChainProblem | None = None
    detail: str = ""


def verify_chain(
    entries: Iterable[LedgerEntry],
    start_seq: int,
    start_hash: bytes,
    *,
    shard: int | None = None,
) -> ChainReport:
    """Check ``entries`` in order against a trusted start; report the first broken link.

    The first entry must have seq ``start_seq`` and prev_hash ``start_hash`` (FIRST_SEQ
    and GENESIS_HASH for a whole chain). Entries must all be of ``shard``, or of the
    first entry's shard when it is None. Corrupt entries are reported, never raised.
    """
    expected_seq, expected_prev = start_seq, start_hash
    chain_shard = shard
    epoch = -1
    verified = 0
    for entry in entries:
        if chain_shard is None:
            chain_shard = entry.shard
        found = _first_problem(entry, expected_seq, expected_prev, chain_shard, epoch)
        if found is not None:
            problem, detail = found
            return ChainReport(
                False, verified, expected_seq - 1, expected_prev, expected_seq, problem, detail
            )
        expected_seq, expected_prev, epoch = entry.seq + 1, entry.entry_hash, entry.epoch
        verified += 1
    return ChainReport(True, verified, expected_seq - 1, expected_prev)


def _first_problem(
    entry: LedgerEntry, expected_seq: int, expected_prev: bytes, shard: int, epoch: int
) -> tuple[ChainProblem, str] | None:
    if entry.seq > expected_seq:
        return ChainProblem.GAP, f"expected seq {expected_seq}, found {entry.seq}"
    if entry.seq < expected_seq:
        return ChainProblem.DUPLICATE_SEQ, f"expected seq {expected_seq}, found {entry.seq}"
    if entry.prev_hash != expected_prev:
        return ChainProblem.WRONG_PREV_HASH, f"seq {entry.seq}: prev_hash does not link"
    if not _hashable(entry) or entry.entry_hash != _recompute(entry):
        return ChainProblem.WRONG_ENTRY_HASH, f"seq {entry.seq}: content does not match hash"
    if entry.shard != shard:
        return ChainProblem.SHARD_MISMATCH, f"seq {entry.seq}: shard {entry.shard} != {shard}"
    if entry.epoch < epoch:
        return ChainProblem.EPOCH_REGRESSED, f"seq {entry.seq}: epoch {entry.epoch} < {epoch}"
    return None


def _hashable(entry: LedgerEntry) -> bool:
    # A corrupt row must be reported, not crash the auditor, so check up front whatever
    # entry_hash() would refuse to encode.
    in_range = all(0 <= n <= _codec.U64_MAX for n in (entry.shard, entry.epoch, entry.seq))
    try:
        entry.kind.encode("utf-8")
        entry.payment_key.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return in_range and len(entry.prev_hash) == HASH_LEN


def _recompute(entry: LedgerEntry) -> bytes:
    return entry_hash(
        shard=entry.shard,
        epoch=entry.epoch,
        seq=entry.seq,
        kind=entry.kind,
        payment_key=entry.payment_key,
        body=entry.body,
        prev_hash=entry.prev_hash,
    )
