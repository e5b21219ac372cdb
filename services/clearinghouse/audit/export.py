"""A settlement window exported to a folder, for auditors who have no access to the switch.

Folder layout, format ``clearing.window-export.v1`` (all text is UTF-8, every file ends
with a newline, every JSON object has sorted keys and integers as JSON integers, hashes
are lowercase hex; the same window always gives the same bytes):

``manifest.json`` (indented JSON; written last, so a folder with a manifest is complete)::

    {"format": "clearing.window-export.v1", "window_id": W, "shard_count": N,
     "shards": [{"shard": s, "start_seq": first seq of the window in s,
                 "start_prev_hash": prev_hash the window's first entry of s must have
                                    (the previous window's cut's hash, or 32 zero bytes),
                 "cut_seq": seq of s's WINDOW_CUT for W, "cut_entry_hash": its hash}, ...],
     "merkle_root": RFC 6962 root over the window's entry hashes (domain.merkle),
     "entry_count": lines in entries.jsonl,
     "created_at_us": the latest at_us of the window's cut entries}

``entries.jsonl`` - every entry of the window, every shard's cut included, one compact
JSON object a line in (shard, seq) order: ``shard``, ``epoch``, ``seq``, ``kind``,
``payment_key``, ``body_b64`` (standard base64 with padding), ``prev_hash_hex``,
``entry_hash_hex``.

``intents.jsonl`` - the same format: the INTENT entries of payments decided in this
window whose intent lies in an earlier window (same shard, lower seq than the window's
start). They are not linked to this window's chains: check them against the earlier
window's export, where they appear with the same hash.

``signing_keys.json`` - every Ed25519 key any participant ever registered for signing
payment orders (:mod:`clearinghouse.domain.signing`), so that each INTENT's signature can
be re-checked offline: ``{"format": "clearing.signing-keys.v1", "keys": [{"participant_id",
"key_id", "public_key_hex" (raw 32 bytes), "added_at_us", "revoked_at_us" (0: still
listed)}, ...]}`` in (participant_id, key_id) order. It lists the keys known when the
export was made, so an export made later may list more.

``clearing.json``, ``net_positions.csv``, ``bilateral.csv``, ``instructions.csv``,
``reconciliation/<participant>.csv`` and ``reconciliation/<participant>.json`` (one pair
per participant in the clearing's ``participants``): the renderings of
:func:`clearinghouse.domain.clearing.clear_window` over the window's entries, with the
order details from both INTENT files; ``clearing.json`` also records the participant
kinds the clearing was computed with (check them against the registry).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Final

from clearinghouse._invariant import invariant
from clearinghouse.domain.chain import HASH_LEN, LedgerEntry, entry_hash, verify_chain
from clearinghouse.domain.clearing import (
    MalformedClearing,
    Reconciliation,
    WindowClearing,
    clear_window,
    reconciliation_from_json,
)
from clearinghouse.domain.entries import (
    KIND_DECISION,
    KIND_INTENT,
    KIND_WINDOW_CUT,
    Intent,
    WindowCut,
    window_key,
)
from clearinghouse.domain.merkle import merkle_root, window_leaves
from clearinghouse.domain.model import ParticipantKind, SigningKeyRecord

EXPORT_FORMAT: Final = "clearing.window-export.v1"
MANIFEST_FILE: Final = "manifest.json"
ENTRIES_FILE: Final = "entries.jsonl"
INTENTS_FILE: Final = "intents.jsonl"
CLEARING_FILE: Final = "clearing.json"
NET_POSITIONS_FILE: Final = "net_positions.csv"
BILATERAL_FILE: Final = "bilateral.csv"
INSTRUCTIONS_FILE: Final = "instructions.csv"
SIGNING_KEYS_FILE: Final = "signing_keys.json"
SIGNING_KEYS_FORMAT: Final = "clearing.signing-keys.v1"
RECONCILIATION_DIR: Final = "reconciliation"
_TMP_SUFFIX: Final = ".tmp"
# A participant id as validation allows it, minus a leading dot: it names two files.
_FILE_SAFE_ID: Final = re.compile(r"[A-Za-z0-9_:-][A-Za-z0-9._:-]{0,63}")
_ENTRY_KEYS: Final = frozenset(
    {"shard", "epoch", "seq", "kind", "payment_key", "body_b64", "prev_hash_hex",
     "entry_hash_hex"}
)  # fmt: skip
_MANIFEST_KEYS: Final = frozenset(
    {"format", "window_id", "shard_count", "shards", "merkle_root", "entry_count",
     "created_at_us"}
)  # fmt: skip
_SHARD_KEYS: Final = frozenset(
    {"shard", "start_seq", "start_prev_hash", "cut_seq", "cut_entry_hash"}
)
_KEY_FILE_KEYS: Final = frozenset({"format", "keys"})
_KEY_KEYS: Final = frozenset(
    {"participant_id", "key_id", "public_key_hex", "added_at_us", "revoked_at_us"}
)


class ExportFormatError(ValueError):
    """A file of an export that cannot be read as its format says (not: whose content
    does not verify; that is :mod:`.verify`'s business)."""

    def __init__(self, file: str, message: str) -> None:
        super().__init__(f"{file}: {message}")
        self.file = file
        self.message = message


@dataclass(frozen=True, slots=True)
class ShardRange:
    """Where window ``window_id`` lies in one shard's chain."""

    shard: int
    start_seq: int
    start_prev_hash: bytes
    cut_seq: int
    cut_entry_hash: bytes


@dataclass(frozen=True, slots=True)
class Manifest:
    window_id: int
    shard_count: int
    shards: tuple[ShardRange, ...]
    merkle_root: bytes
    entry_count: int
    created_at_us: int

    def to_json(self) -> str:
        obj = {
            "format": EXPORT_FORMAT,
            "window_id": self.window_id,
            "shard_count": self.shard_count,
            "shards": [
                {
                    "shard": s.shard,
                    "start_seq": s.start_seq,
                    "start_prev_hash": s.start_prev_hash.hex(),
                    "cut_seq": s.cut_seq,
                    "cut_entry_hash": s.cut_entry_hash.hex(),
                }
                for s in self.shards
            ],
            "merkle_root": self.merkle_root.hex(),
            "entry_count": self.entry_count,
            "created_at_us": self.created_at_us,
        }
        return json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        """Parse :meth:`to_json`'s output; raise :class:`ExportFormatError` if it is not."""
        try:
            return cls._from_obj(json.loads(text))
        except _Malformed as e:
            raise ExportFormatError(MANIFEST_FILE, str(e)) from e
        except ValueError as e:
            raise ExportFormatError(MANIFEST_FILE, f"not JSON: {e}") from e

    @classmethod
    def _from_obj(cls, obj: object) -> Manifest:
        m = _fields(obj, _MANIFEST_KEYS, "$")
        if m["format"] != EXPORT_FORMAT:
            raise _Malformed(f"$.format: expected {EXPORT_FORMAT!r}, found {m['format']!r}")
        shards = m["shards"]
        if not isinstance(shards, list):
            raise _Malformed("$.shards: expected an array")
        ranges = []
        for n, item in enumerate(shards):
            where = f"$.shards[{n}]"
            s = _fields(item, _SHARD_KEYS, where)
            ranges.append(
                ShardRange(
                    shard=_int(s, "shard", where),
                    start_seq=_int(s, "start_seq", where),
                    start_prev_hash=_hash(s, "start_prev_hash", where),
                    cut_seq=_int(s, "cut_seq", where),
                    cut_entry_hash=_hash(s, "cut_entry_hash", where),
                )
            )
        return cls(
            window_id=_int(m, "window_id", "$"),
            shard_count=_int(m, "shard_count", "$"),
            shards=tuple(ranges),
            merkle_root=_hash(m, "merkle_root", "$"),
            entry_count=_int(m, "entry_count", "$"),
            created_at_us=_int(m, "created_at_us", "$"),
        )


@dataclass(frozen=True, slots=True)
class WindowExport:
    """An export folder as read back; nothing in it has been verified."""

    directory: Path
    manifest: Manifest
    entries: tuple[LedgerEntry, ...]
    intents: tuple[LedgerEntry, ...]
    clearing: WindowClearing


# -- entries as JSON lines ----------------------------------------------------------------


def entry_to_json(entry: LedgerEntry) -> str:
    """One entry as one compact JSON object (no newline)."""
    obj = {
        "shard": entry.shard,
        "epoch": entry.epoch,
        "seq": entry.seq,
        "kind": entry.kind,
        "payment_key": entry.payment_key,
        "body_b64": base64.b64encode(entry.body).decode("ascii"),
        "prev_hash_hex": entry.prev_hash.hex(),
        "entry_hash_hex": entry.entry_hash.hex(),
    }
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def entry_from_json(line: str, file: str = ENTRIES_FILE) -> LedgerEntry:
    """The inverse of :func:`entry_to_json`; raise ExportFormatError naming ``file``."""
    try:
        return _entry_from_obj(json.loads(line))
    except _Malformed as e:
        raise ExportFormatError(file, str(e)) from e
    except ValueError as e:
        raise ExportFormatError(file, f"not JSON: {e}") from e


def _entry_from_obj(obj: object) -> LedgerEntry:
    fields = _fields(obj, _ENTRY_KEYS, "$")
    try:
        body = base64.b64decode(_str(fields, "body_b64", "$"), validate=True)
    except binascii.Error as e:
        raise _Malformed(f"$.body_b64: not base64: {e}") from e
    return LedgerEntry(
        shard=_int(fields, "shard", "$"),
        epoch=_int(fields, "epoch", "$"),
        seq=_int(fields, "seq", "$"),
        kind=_str(fields, "kind", "$"),
        payment_key=_str(fields, "payment_key", "$"),
        body=body,
        prev_hash=_hash(fields, "prev_hash_hex", "$"),
        entry_hash=_hash(fields, "entry_hash_hex", "$"),
    )


def render_entries(entries: Iterable[LedgerEntry]) -> str:
    """JSON lines in (shard, seq) order."""
    return "".join(entry_lines(entries))


def entry_lines(entries: Iterable[LedgerEntry]) -> Iterator[str]:
    """:func:`render_entries` a line at a time (a window's entries file can be hundreds
    of MiB: a server streams it without ever holding it whole)."""
    for e in sorted(entries, key=lambda e: (e.shard, e.seq)):
        yield entry_to_json(e) + "\n"


def parse_entries(text: str, file: str) -> tuple[LedgerEntry, ...]:
    """Every line of a JSON-lines entries file, in file order."""
    lines = text.split("\n")
    if lines[-1] != "":
        raise ExportFormatError(file, "does not end with a newline")
    out: list[LedgerEntry] = []
    for n, line in enumerate(lines[:-1], start=1):
        try:
            out.append(entry_from_json(line, file))
        except ExportFormatError as e:
            raise ExportFormatError(file, f"line {n}: {e.message}") from e
    return tuple(out)


# -- signing keys -------------------------------------------------------------------------


def render_signing_keys(keys: Iterable[SigningKeyRecord]) -> str:
    """``signing_keys.json``: indented JSON, keys in (participant_id, key_id) order."""
    ordered = sorted(keys, key=lambda k: (k.participant_id, k.key_id))
    obj = {
        "format": SIGNING_KEYS_FORMAT,
        "keys": [
            {
                "participant_id": k.participant_id,
                "key_id": k.key_id,
                "public_key_hex": k.public_key.hex(),
                "added_at_us": k.added_at_us,
                "revoked_at_us": k.revoked_at_us,
            }
            for k in ordered
        ],
    }
    return json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=True) + "\n"


def parse_signing_keys(text: str) -> tuple[SigningKeyRecord, ...]:
    """The inverse of :func:`render_signing_keys`; ExportFormatError if it is not."""
    try:
        top = _fields(json.loads(text), _KEY_FILE_KEYS, "$")
        if top["format"] != SIGNING_KEYS_FORMAT:
            raise _Malformed(f"$.format: expected {SIGNING_KEYS_FORMAT!r}, found {top['format']!r}")
        items = top["keys"]
        if not isinstance(items, list):
            raise _Malformed("$.keys: expected an array")
        out = []
        for n, item in enumerate(items):
            where = f"$.keys[{n}]"
            k = _fields(item, _KEY_KEYS, where)
            hex_key = _str(k, "public_key_hex", where)
            if not re.fullmatch(r"(?:[0-9a-f]{2})*", hex_key):
                raise _Malformed(f"{where}.public_key_hex: expected lowercase hex")
            out.append(
                SigningKeyRecord(
                    participant_id=_str(k, "participant_id", where),
                    key_id=_str(k, "key_id", where),
                    public_key=bytes.fromhex(hex_key),
                    added_at_us=_int(k, "added_at_us", where),
                    revoked_at_us=_int(k, "revoked_at_us", where),
                )
            )
        return tuple(out)
    except _Malformed as e:
        raise ExportFormatError(SIGNING_KEYS_FILE, str(e)) from e
    except ValueError as e:
        raise ExportFormatError(SIGNING_KEYS_FILE, f"not JSON: {e}") from e


def read_signing_keys(directory: str | os.PathLike[str]) -> tuple[SigningKeyRecord, ...]:
    return parse_signing_keys(read_text(directory, SIGNING_KEYS_FILE))


# -- writing ------------------------------------------------------------------------------


def clearing_files(clearing: WindowClearing) -> dict[str, str]:
    """The clearing's files of an export, by path relative to the folder."""
    return {path: make() for path, make in clearing_file_makers(clearing).items()}


def clearing_file_makers(clearing: WindowClearing) -> dict[str, Callable[[], str]]:
    """:func:`clearing_files`, each file rendered only when asked for."""
    files: dict[str, Callable[[], str]] = {
        CLEARING_FILE: clearing.to_json,
        NET_POSITIONS_FILE: clearing.net_positions_csv,
        BILATERAL_FILE: clearing.bilateral_csv,
        INSTRUCTIONS_FILE: clearing.instructions_csv,
    }
    for pid, _ in clearing.participants:
        invariant(_FILE_SAFE_ID.fullmatch(pid), f"participant id {pid!r} cannot name a file")
        files[f"{RECONCILIATION_DIR}/{pid}.csv"] = partial(clearing.reconciliation_csv, pid)
        files[f"{RECONCILIATION_DIR}/{pid}.json"] = partial(clearing.reconciliation_json, pid)
    return files


def intents_by_key(entries: Iterable[LedgerEntry]) -> dict[str, Intent]:
    """The decoded INTENT entries among ``entries``, by payment key (others skipped)."""
    return {e.payment_key: Intent.decode(e.body) for e in entries if e.kind == KIND_INTENT}


def is_window_cut(entry: LedgerEntry, window_id: int) -> bool:
    """Whether ``entry`` is a WINDOW_CUT of ``window_id`` (kind, key and body agree)."""
    if entry.kind != KIND_WINDOW_CUT or entry.payment_key != window_key(window_id):
        return False
    try:
        return WindowCut.decode(entry.body).window_id == window_id
    except (AssertionError, ValueError):  # InvariantViolation is an AssertionError
        return False


def render_export(
    window_id: int,
    entries_by_shard: Mapping[int, Sequence[LedgerEntry]],
    referenced_intents: Sequence[LedgerEntry],
    kinds: Mapping[str, ParticipantKind],
    *,
    signing_keys: Iterable[SigningKeyRecord] = (),
) -> dict[str, str]:
    """Every file of the export, by relative path, after checking the input (as
    :func:`export_parts` says)."""
    parts = export_parts(
        window_id, entries_by_shard, referenced_intents, kinds, signing_keys=signing_keys
    )
    return {path: "".join(make()) for path, make in parts.items()}


def export_parts(
    window_id: int,
    entries_by_shard: Mapping[int, Sequence[LedgerEntry]],
    referenced_intents: Sequence[LedgerEntry],
    kinds: Mapping[str, ParticipantKind],
    *,
    signing_keys: Iterable[SigningKeyRecord] = (),
) -> dict[str, Callable[[], Iterator[str]]]:
    """Every file of the export, by relative path, as a function giving its text in
    pieces, after checking the input; nothing is rendered until asked for, so a caller
    can hold one file's piece at a time, not the export.

    ``signing_keys`` is every signing key the participants ever registered.

    ``entries_by_shard`` maps each shard 0..N-1 to its entries of the window in chain
    order, ending with its WINDOW_CUT for ``window_id``. Raises InvariantViolation if a
    shard is missing or its chain does not link, if a decision's intent is neither in
    the window nor in ``referenced_intents``, or if a referenced intent is not needed,
    not an intent, not from before the window or does not match its hash.
    """
    shard_count = len(entries_by_shard)
    invariant(shard_count > 0, "an export needs at least one shard")
    invariant(
        sorted(entries_by_shard) == list(range(shard_count)),
        f"shards must be 0..{shard_count - 1}, not {sorted(entries_by_shard)}",
    )
    ranges = tuple(_shard_range(window_id, s, entries_by_shard[s]) for s in range(shard_count))
    entries = [e for s in range(shard_count) for e in entries_by_shard[s]]
    _check_intents(entries, referenced_intents, ranges)
    cuts = [WindowCut.decode(entries_by_shard[s][-1].body) for s in range(shard_count)]
    manifest = Manifest(
        window_id=window_id,
        shard_count=shard_count,
        shards=ranges,
        merkle_root=merkle_root(window_leaves(entries)),
        entry_count=len(entries),
        created_at_us=max(c.at_us for c in cuts),
    )
    intents = intents_by_key(referenced_intents) | intents_by_key(entries)
    clearing = clear_window(window_id, entries, kinds, intents)
    del intents
    keys = tuple(signing_keys)

    def one(text: Callable[[], str]) -> Callable[[], Iterator[str]]:
        return lambda: iter((text(),))

    return {
        MANIFEST_FILE: one(manifest.to_json),
        ENTRIES_FILE: partial(entry_lines, entries),
        INTENTS_FILE: partial(entry_lines, referenced_intents),
        SIGNING_KEYS_FILE: one(partial(render_signing_keys, keys)),
        **{path: one(make) for path, make in clearing_file_makers(clearing).items()},
    }


def _shard_range(window_id: int, shard: int, entries: Sequence[LedgerEntry]) -> ShardRange:
    invariant(len(entries) > 0, f"shard {shard} has no WINDOW_CUT for window {window_id}")
    first, last = entries[0], entries[-1]
    report = verify_chain(entries, first.seq, first.prev_hash, shard=shard)
    invariant(report.ok, f"shard {shard}: chain broken at seq {report.broken_seq}: {report.detail}")
    invariant(
        is_window_cut(last, window_id),
        f"shard {shard}: the window's entries must end with its WINDOW_CUT for {window_id}",
    )
    invariant(
        all(e.kind != KIND_WINDOW_CUT for e in entries[:-1]),
        f"shard {shard}: a WINDOW_CUT inside the window",
    )
    return ShardRange(shard, first.seq, first.prev_hash, last.seq, last.entry_hash)


def _check_intents(
    entries: Sequence[LedgerEntry],
    referenced: Sequence[LedgerEntry],
    ranges: Sequence[ShardRange],
) -> None:
    in_window = {e.payment_key: e for e in entries if e.kind == KIND_INTENT}
    earlier: dict[str, LedgerEntry] = {}
    for e in referenced:
        where = f"referenced intent {e.shard}/{e.seq} ({e.payment_key})"
        invariant(e.kind == KIND_INTENT, f"{where} is a {e.kind}")
        invariant(e.payment_key not in earlier, f"{where} given twice")
        invariant(
            0 <= e.shard < len(ranges) and e.seq < ranges[e.shard].start_seq,
            f"{where} does not lie before the window",
        )
        invariant(e.entry_hash == _recomputed_hash(e), f"{where} does not match its hash")
        earlier[e.payment_key] = e
    needed: set[str] = set()
    for d in entries:
        if d.kind != KIND_DECISION:
            continue
        intent = in_window.get(d.payment_key) or earlier.get(d.payment_key)
        invariant(
            intent is not None and intent.shard == d.shard and intent.seq < d.seq,
            f"decision {d.shard}/{d.seq} ({d.payment_key}) has no intent before it",
        )
        if d.payment_key not in in_window:
            needed.add(d.payment_key)
    extra = sorted(earlier.keys() - needed)
    invariant(not extra, f"referenced intents not needed by the window: {extra}")


def _recomputed_hash(e: LedgerEntry) -> bytes:
    return entry_hash(
        shard=e.shard, epoch=e.epoch, seq=e.seq, kind=e.kind, payment_key=e.payment_key,
        body=e.body, prev_hash=e.prev_hash,
    )  # fmt: skip


def write_export(
    directory: str | os.PathLike[str],
    window_id: int,
    entries_by_shard: Mapping[int, Sequence[LedgerEntry]],
    referenced_intents: Sequence[LedgerEntry],
    kinds: Mapping[str, ParticipantKind],
    *,
    signing_keys: Iterable[SigningKeyRecord] = (),
) -> Path:
    """Write window ``window_id``'s export into ``directory`` and return its path.

    The input is checked as :func:`render_export` says. The folder is created if
    missing; it must be empty or hold an earlier export (files of other names are never
    overwritten: FileExistsError). Each file is written to a temporary name, synced and
    renamed into place; the manifest goes first out and last in, so that a folder with a
    manifest always holds a complete export.
    """
    files = render_export(
        window_id, entries_by_shard, referenced_intents, kinds, signing_keys=signing_keys
    )
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    (root / RECONCILIATION_DIR).mkdir(exist_ok=True)
    _check_only_ours(root)
    (root / MANIFEST_FILE).unlink(missing_ok=True)
    for name, text in sorted(files.items()):
        if name != MANIFEST_FILE:
            _write_atomic(root / name, text)
    recon_dir = root / RECONCILIATION_DIR
    for stale in sorted(recon_dir.iterdir()):
        if f"{RECONCILIATION_DIR}/{stale.name}" not in files:
            stale.unlink()
    for leftover in sorted(root.glob(f".*{_TMP_SUFFIX}")):
        leftover.unlink()
    _sync_directory(recon_dir)
    _write_atomic(root / MANIFEST_FILE, files[MANIFEST_FILE])
    _sync_directory(root)
    return root


def _check_only_ours(root: Path) -> None:
    top = {MANIFEST_FILE, ENTRIES_FILE, INTENTS_FILE, CLEARING_FILE, NET_POSITIONS_FILE,
           BILATERAL_FILE, INSTRUCTIONS_FILE, SIGNING_KEYS_FILE, RECONCILIATION_DIR}  # fmt: skip
    for path in root.iterdir():
        ours = path.name in top or (path.name.startswith(".") and path.name.endswith(_TMP_SUFFIX))
        if not ours:
            raise FileExistsError(f"{path} is not part of a window export; not writing there")
    for path in (root / RECONCILIATION_DIR).iterdir():
        if not path.is_file() or path.suffix not in (".csv", ".json", _TMP_SUFFIX):
            raise FileExistsError(f"{path} is not part of a window export; not writing there")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}{_TMP_SUFFIX}")
    with tmp.open("wb") as f:
        f.write(text.encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def _sync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- reading ------------------------------------------------------------------------------


def read_text(directory: str | os.PathLike[str], name: str) -> str:
    """One file of the export as text; ExportFormatError if missing or not UTF-8."""
    path = Path(directory) / name
    try:
        return path.read_bytes().decode("utf-8")
    except FileNotFoundError as e:
        raise ExportFormatError(name, "missing") from e
    except UnicodeDecodeError as e:
        raise ExportFormatError(name, f"not UTF-8: {e}") from e


def read_manifest(directory: str | os.PathLike[str]) -> Manifest:
    return Manifest.from_json(read_text(directory, MANIFEST_FILE))


def read_entries(
    directory: str | os.PathLike[str], name: str = ENTRIES_FILE
) -> tuple[LedgerEntry, ...]:
    """``entries.jsonl`` (or ``intents.jsonl``), in file order."""
    return parse_entries(read_text(directory, name), name)


def read_clearing(directory: str | os.PathLike[str]) -> WindowClearing:
    """``clearing.json`` as written: its reconciliations have no rows."""
    try:
        return WindowClearing.from_json(read_text(directory, CLEARING_FILE))
    except MalformedClearing as e:
        raise ExportFormatError(CLEARING_FILE, str(e)) from e


def read_reconciliation(directory: str | os.PathLike[str], participant_id: str) -> Reconciliation:
    """``reconciliation/<participant_id>.json``, rows included."""
    invariant(_FILE_SAFE_ID.fullmatch(participant_id), f"bad participant id {participant_id!r}")
    name = f"{RECONCILIATION_DIR}/{participant_id}.json"
    try:
        _, rec = reconciliation_from_json(read_text(directory, name))
    except MalformedClearing as e:
        raise ExportFormatError(name, str(e)) from e
    if rec.participant_id != participant_id:
        raise ExportFormatError(name, f"holds participant {rec.participant_id!r}")
    return rec


def read_export(directory: str | os.PathLike[str]) -> WindowExport:
    """Parse an export folder, the clearing with every participant's reconciliation rows;
    raise ExportFormatError on a file that does not parse.

    Nothing is verified here: use :func:`clearinghouse.audit.verify.verify_export`.
    """
    root = Path(directory)
    clearing = read_clearing(root)
    recs = tuple(read_reconciliation(root, pid) for pid, _ in clearing.participants)
    return WindowExport(
        directory=root,
        manifest=read_manifest(root),
        entries=read_entries(root, ENTRIES_FILE),
        intents=read_entries(root, INTENTS_FILE),
        clearing=replace(clearing, reconciliations=recs),
    )


# -- JSON field helpers -------------------------------------------------------------------


class _Malformed(ValueError):
    """Raised by the field helpers; the public readers add the file's name."""


def _fields(value: object, keys: frozenset[str], where: str) -> dict[str, object]:
    if not isinstance(value, dict):
        raise _Malformed(f"{where}: expected a JSON object")
    if set(value) != keys:
        raise _Malformed(f"{where}: expected keys {sorted(keys)}, found {sorted(value)}")
    return value


def _int(obj: Mapping[str, object], key: str, where: str) -> int:
    value = obj[key]
    if not isinstance(value, int) or isinstance(value, bool):
        raise _Malformed(f"{where}.{key}: expected an integer, found {value!r}")
    return value


def _str(obj: Mapping[str, object], key: str, where: str) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise _Malformed(f"{where}.{key}: expected a string, found {value!r}")
    return value


def _hash(obj: Mapping[str, object], key: str, where: str) -> bytes:
    text = _str(obj, key, where)
    if not re.fullmatch(f"[0-9a-f]{{{2 * HASH_LEN}}}", text):
        raise _Malformed(f"{where}.{key}: expected {HASH_LEN} bytes of lowercase hex")
    return bytes.fromhex(text)


__all__ = [
    "BILATERAL_FILE",
    "CLEARING_FILE",
    "ENTRIES_FILE",
    "EXPORT_FORMAT",
    "INSTRUCTIONS_FILE",
    "INTENTS_FILE",
    "MANIFEST_FILE",
    "NET_POSITIONS_FILE",
    "RECONCILIATION_DIR",
    "SIGNING_KEYS_FILE",
    "SIGNING_KEYS_FORMAT",
    "ExportFormatError",
    "Manifest",
    "ShardRange",
    "WindowExport",
    "clearing_file_makers",
    "clearing_files",
    "entry_from_json",
    "entry_lines",
    "entry_to_json",
    "export_parts",
    "intents_by_key",
    "is_window_cut",
    "parse_entries",
    "parse_signing_keys",
    "read_clearing",
    "read_entries",
    "read_export",
    "read_manifest",
    "read_reconciliation",
    "read_signing_keys",
    "read_text",
    "render_entries",
    "render_export",
    "render_signing_keys",
    "write_export",
]
