"""Verify a window export folder (:mod:`.export`) from its files alone, no cluster needed.

Checks, each failure reported as a :class:`Problem` naming the file and the shard/seq
or participant concerned:

1. ``manifest.json`` parses; its shards are exactly 0..shard_count-1.
2. Per shard, ``entries.jsonl``'s entries of the shard form a chain (``verify_chain``)
   from the manifest's ``start_seq``/``start_prev_hash``, and the last of them is the
   shard's WINDOW_CUT for the window, with the manifest's ``cut_seq`` and
   ``cut_entry_hash``; no other cut lies inside. Entries are in (shard, seq) order and
   their count is the manifest's ``entry_count``.
3. The RFC 6962 Merkle root over the entries' hashes equals the manifest's.
4. Every DECISION decodes and balances (debits == credits per currency), and has its
   INTENT before it in its shard: in the window or in ``intents.jsonl``.
5. Every entry of ``intents.jsonl`` is an INTENT whose hash matches its fields, lies
   before the window in its shard and is needed by a decision of the window.
6. :func:`clear_window` re-run on the entries, with the participant kinds recorded in
   ``clearing.json``, renders byte for byte ``clearing.json``, the three CSV files and
   every ``reconciliation/`` file (no file missing, none extra); the nets in
   ``clearing.json`` and ``net_positions.csv`` sum to zero per currency.

8. ``signing_keys.json`` parses, and every INTENT (of ``entries.jsonl`` and
   ``intents.jsonl``) carries its institution's Ed25519 signature of the order, made by
   a key that ``signing_keys.json`` lists for that institution and verifying over the
   order's canonical bytes (:mod:`clearinghouse.domain.signing`). A changed order field
   or signature byte fails here (as well as breaking the chain, unless the hashes were
   recomputed too), with the payment, the key and the reason.

   The export's keys come from the switch, so an insider who rewrites an order, signs
   it with a key of its own and lists that key in ``signing_keys.json`` (recomputing
   every hash) passes this check. With ``keys`` (``--keys FILE``: the keys each
   participant published itself, in the same JSON shape or as lines of
   ``{"participant_id", "key_id", "public_key"}``: what ``clearingctl pki signing-key
   new`` prints, with the participant's id added), every signature must verify with
   *those* keys instead, and every key of ``signing_keys.json`` that the file does not
   list is reported.

7. With ``previous`` (``--previous <dir>``, the window before's export): every shard
   starts right after that window's cut, and the intents of ``intents.jsonl`` that lie
   in that window are entries of its export with the same hash. Without it, the window
   is anchored only by the manifest's ``start_prev_hash`` values.

9. With ``expected_root`` (``--expected-root HEX``, a root the auditor obtained on its
   own, e.g. ``GetWindow`` on another city's node): the manifest's Merkle root is that
   root. With checks 2 and 3 this ties every entry of the export to it.

Command line: ``python -m clearinghouse.audit.verify <dir> [--json] [--previous <dir>]
[--keys FILE] [--expected-root HEX]`` prints a summary (or the report as JSON) and exits 0 when the
export verifies, 1 when it does not.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import csv
import json
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Final, TypeVar

from clearinghouse.audit.export import (
    CLEARING_FILE,
    ENTRIES_FILE,
    INTENTS_FILE,
    MANIFEST_FILE,
    NET_POSITIONS_FILE,
    RECONCILIATION_DIR,
    SIGNING_KEYS_FILE,
    ExportFormatError,
    Manifest,
    clearing_files,
    intents_by_key,
    is_window_cut,
    parse_signing_keys,
    read_clearing,
    read_entries,
    read_manifest,
    read_signing_keys,
)
from clearinghouse.domain.chain import LedgerEntry, entry_hash, verify_chain
from clearinghouse.domain.clearing import WindowClearing, clear_window
from clearinghouse.domain.entries import (
    KIND_DECISION,
    KIND_INTENT,
    KIND_WINDOW_CUT,
    Decision,
    Intent,
)
from clearinghouse.domain.errors import SignatureRefused
from clearinghouse.domain.fingerprint import order_from_canonical_bytes
from clearinghouse.domain.merkle import merkle_root, window_leaves
from clearinghouse.domain.model import SigningKeyRecord
from clearinghouse.domain.signing import PUBLIC_KEY_LEN, key_id_of, verify_order_signature

# How problems of the participants' keys file (``--keys``) name it.
KEYS_OPTION: Final = "--keys {}"
# Differences listed per file before the rest are summed up in one line.
DIFFS_PER_FILE_MAX: Final = 10
MERKLE_ROOT_BYTES: Final = 32
# Decoding corrupt bytes raises InvariantViolation (an AssertionError) or ValueError
# (UnicodeDecodeError among them); the verifier reports them, it never crashes on them.
_CORRUPT: Final = (AssertionError, ValueError)
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing that does not verify."""

    file: str
    message: str
    shard: int | None = None
    seq: int | None = None
    participant: str | None = None

    def __str__(self) -> str:
        where = [self.file]
        if self.shard is not None:
            where.append(f"shard {self.shard}")
        if self.seq is not None:
            where.append(f"seq {self.seq}")
        if self.participant is not None:
            where.append(f"participant {self.participant}")
        return f"{' '.join(where)}: {self.message}"


@dataclass(frozen=True, slots=True)
class VerifyReport:
    directory: str
    ok: bool
    window_id: int | None
    shard_count: int
    entry_count: int
    payments_decided: int
    merkle_root_hex: str
    problems: tuple[Problem, ...]
    # The checks asked for beyond the export itself (--expected-root, --keys,
    # --previous), so that a report that passes says it made them.
    also_checked: tuple[str, ...] = ()

    def to_json(self) -> str:
        """The report as indented JSON with sorted keys; ``problems`` as objects with
        ``file``, ``message``, ``shard``, ``seq``, ``participant`` (null if unknown)."""
        return json.dumps(asdict(self), sort_keys=True, indent=2) + "\n"

    def summary(self) -> str:
        """A few lines for a human: the verdict, what was checked, every problem."""
        verdict = "OK" if self.ok else f"FAILED, {len(self.problems)} problem(s)"
        lines = [
            f"window {self.window_id} export in {self.directory}: {verdict}",
            f"  shards {self.shard_count}, entries {self.entry_count}, "
            f"payments decided {self.payments_decided}, merkle root {self.merkle_root_hex}",
        ]
        lines += [f"  checked: {c}" for c in self.also_checked]
        lines += [f"  {p}" for p in self.problems]
        return "\n".join(lines) + "\n"


@dataclass
class _Run:
    directory: Path
    problems: list[Problem] = field(default_factory=list)

    def add(self, file: str, message: str, **where: int | str | None) -> None:
        shard, seq, participant = where.get("shard"), where.get("seq"), where.get("participant")
        self.problems.append(
            Problem(
                file,
                message,
                shard if isinstance(shard, int) else None,
                seq if isinstance(seq, int) else None,
                participant if isinstance(participant, str) else None,
            )
        )


def verify_export(
    directory: str | Path,
    previous: str | Path | None = None,
    keys: str | Path | None = None,
    *,
    expected_root: bytes | None = None,
) -> VerifyReport:
    """Verify the export in ``directory`` (see the module docstring); never raises for
    anything wrong in the files, which all become problems in the report.

    ``previous``, the export folder of the window before (verified on its own), also
    checks that this window starts in every shard right after that window's cut, and
    that the intents of ``intents.jsonl`` lying in that window are its entries.

    ``keys``, a file of the signing keys the participants published themselves (the
    shape of ``signing_keys.json``), is what signatures are checked against instead of
    the export's own keys; a key of the export that it does not list is a problem.
    ``expected_root``, the window's Merkle root as obtained independently of the
    export, must be the manifest's root.
    """
    run = _Run(Path(directory))
    manifest = _read(run, MANIFEST_FILE, lambda: read_manifest(run.directory))
    found_root = manifest.merkle_root if manifest is not None else None
    if found_root is not None and expected_root is not None and found_root != expected_root:
        run.add(
            MANIFEST_FILE,
            f"merkle_root {found_root.hex()} is not the expected root {expected_root.hex()}",
        )
    entries = _read(run, ENTRIES_FILE, lambda: read_entries(run.directory, ENTRIES_FILE))
    intents = _read(run, INTENTS_FILE, lambda: read_entries(run.directory, INTENTS_FILE))
    clearing = _read(run, CLEARING_FILE, lambda: read_clearing(run.directory))
    exported_keys = _read(run, SIGNING_KEYS_FILE, lambda: read_signing_keys(run.directory))
    keys_file = KEYS_OPTION.format(keys)
    published = (
        _read(run, keys_file, lambda: _read_published_keys(Path(keys), keys_file))
        if keys is not None
        else None
    )
    if published is not None and exported_keys is not None:
        _check_keys_published(run, exported_keys, published)
    # Signatures are checked with the participants' own keys when given; with the
    # export's otherwise. Neither readable: nothing to check against (already reported).
    trusted = published if keys is not None else exported_keys
    root_hex = ""
    if manifest is not None:
        _check_manifest_shards(run, manifest)
        if entries is not None:
            in_order = _check_order(run, entries)
            _check_shards(run, manifest, entries)
            if in_order:
                root = merkle_root(window_leaves(entries))
                root_hex = root.hex()
                if root != manifest.merkle_root:
                    run.add(
                        MANIFEST_FILE,
                        f"merkle_root {manifest.merkle_root.hex()} but the entries give {root_hex}",
                    )
            if len(entries) != manifest.entry_count:
                run.add(
                    MANIFEST_FILE,
                    f"entry_count {manifest.entry_count} but {ENTRIES_FILE} has {len(entries)}",
                )
            _check_decisions(run, entries)
            if intents is not None:
                _check_intents(run, manifest, entries, intents)
            if trusted is not None:
                _check_signatures(run, ENTRIES_FILE, entries, trusted)
                _check_signatures(run, INTENTS_FILE, intents or (), trusted)
            if intents is not None and clearing is not None and in_order:
                _check_clearing(run, manifest, entries, intents, clearing)
        if previous is not None:
            _check_previous(run, manifest, intents or (), Path(previous))
    if clearing is not None:
        _check_nets_sum_to_zero(run, clearing)
    return VerifyReport(
        directory=str(run.directory),
        ok=not run.problems,
        window_id=manifest.window_id if manifest is not None else None,
        shard_count=manifest.shard_count if manifest is not None else 0,
        entry_count=len(entries) if entries is not None else 0,
        payments_decided=clearing.payments_decided if clearing is not None else 0,
        merkle_root_hex=root_hex,
        problems=tuple(run.problems),
        also_checked=_also_checked(expected_root, keys, previous),
    )


def _also_checked(
    expected_root: bytes | None, keys: str | Path | None, previous: str | Path | None
) -> tuple[str, ...]:
    out = []
    if expected_root is not None:
        out.append(f"the merkle root against --expected-root {expected_root.hex()}")
    if keys is not None:
        out.append(f"every signature against the published keys of --keys {keys}")
    if previous is not None:
        out.append(f"the window starts where the export of --previous {previous} ends")
    return tuple(out)


def _read(run: _Run, file: str, reader: Callable[[], _T]) -> _T | None:
    try:
        return reader()
    except ExportFormatError as e:
        run.add(e.file, e.message)
    except OSError as e:
        run.add(file, f"cannot be read: {e}")
    return None


def _check_manifest_shards(run: _Run, manifest: Manifest) -> None:
    numbers = [s.shard for s in manifest.shards]
    if numbers != list(range(manifest.shard_count)):
        run.add(
            MANIFEST_FILE,
            f"shards must be 0..{manifest.shard_count - 1} in order, found {numbers}",
        )


def _check_order(run: _Run, entries: Sequence[LedgerEntry]) -> bool:
    for n, (a, b) in enumerate(pairwise(entries), start=2):
        if (a.shard, a.seq) >= (b.shard, b.seq):
            run.add(
                ENTRIES_FILE,
                f"line {n} is out of (shard, seq) order or repeats an entry",
                shard=b.shard,
                seq=b.seq,
            )
            return False
    return True


def _check_shards(run: _Run, manifest: Manifest, entries: Sequence[LedgerEntry]) -> None:
    by_shard: defaultdict[int, list[LedgerEntry]] = defaultdict(list)
    for e in entries:
        by_shard[e.shard].append(e)
    known = {s.shard for s in manifest.shards}
    for shard in sorted(by_shard.keys() - known):
        run.add(ENTRIES_FILE, "entries of a shard the manifest does not list", shard=shard)
    window_id = manifest.window_id
    for sr in manifest.shards:
        mine = by_shard.get(sr.shard, [])
        if not mine:
            run.add(
                ENTRIES_FILE,
                f"no entries: the shard's WINDOW_CUT for window {window_id} is missing",
                shard=sr.shard,
            )
            continue
        report = verify_chain(mine, sr.start_seq, sr.start_prev_hash, shard=sr.shard)
        if not report.ok:
            problem = report.problem.value if report.problem else "?"
            run.add(
                ENTRIES_FILE,
                f"chain broken ({problem}): {report.detail}",
                shard=sr.shard,
                seq=report.broken_seq,
            )
        last = mine[-1]
        if not is_window_cut(last, window_id):
            run.add(
                ENTRIES_FILE,
                f"the shard's entries end with a {last.kind}, not its WINDOW_CUT for window "
                f"{window_id}: the cut is missing",
                shard=sr.shard,
                seq=last.seq,
            )
        elif (last.seq, last.entry_hash) != (sr.cut_seq, sr.cut_entry_hash):
            run.add(
                MANIFEST_FILE,
                f"cut_seq/cut_entry_hash {sr.cut_seq}/{sr.cut_entry_hash.hex()} but the cut "
                f"is {last.seq}/{last.entry_hash.hex()}",
                shard=sr.shard,
            )
        for e in mine[:-1]:
            if e.kind == KIND_WINDOW_CUT:
                run.add(ENTRIES_FILE, "a WINDOW_CUT inside the window", shard=e.shard, seq=e.seq)


def _check_decisions(run: _Run, entries: Iterable[LedgerEntry]) -> None:
    for e in entries:
        if e.kind != KIND_DECISION:
            continue
        try:
            decision = Decision.decode(e.body, e.payment_key)
        except _CORRUPT as exc:
            run.add(ENTRIES_FILE, f"DECISION body does not decode: {exc}", shard=e.shard, seq=e.seq)
            continue
        debits: Counter[str] = Counter()
        credits: Counter[str] = Counter()
        for p in decision.postings:
            debits[p.currency] += p.debit_minor
            credits[p.currency] += p.credit_minor
        for ccy in sorted(debits.keys() | credits.keys()):
            if debits[ccy] != credits[ccy]:
                run.add(
                    ENTRIES_FILE,
                    f"{e.payment_key}: debits {debits[ccy]} != credits {credits[ccy]} {ccy}",
                    shard=e.shard,
                    seq=e.seq,
                )


def _read_published_keys(path: Path, name: str) -> tuple[SigningKeyRecord, ...]:
    """The keys of ``--keys``: the export's ``signing_keys.json`` shape, or one published
    key per line (``{"participant_id", "key_id", "public_key": <base64>}``)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ExportFormatError(name, f"not UTF-8: {e}") from e
    try:
        whole = json.loads(text)
    except ValueError:
        whole = None  # several lines: not one JSON document
    if not (isinstance(whole, dict) and "format" in whole):
        return _published_lines(text, name)
    try:
        return parse_signing_keys(text)
    except ExportFormatError as e:
        raise ExportFormatError(name, e.message) from e


PUBLISHED_LINE: Final = '{"participant_id": ..., "key_id": ..., "public_key": <base64>}'


def _published_lines(text: str, name: str) -> tuple[SigningKeyRecord, ...]:
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            pid, key_id, b64 = item["participant_id"], item["key_id"], item["public_key"]
            if not all(isinstance(v, str) for v in (pid, key_id, b64)):
                raise TypeError("not text")
            public = base64.b64decode(b64, validate=True)
        except (ValueError, KeyError, TypeError, binascii.Error) as e:
            raise ExportFormatError(name, f"line {n}: not {PUBLISHED_LINE}: {e}") from e
        if len(public) != PUBLIC_KEY_LEN or key_id_of(public) != key_id:
            raise ExportFormatError(
                name, f"line {n}: key_id {key_id} is not that of a 32-byte public_key"
            )
        out.append(SigningKeyRecord(pid, key_id, public, 0, 0))
    if not out:
        raise ExportFormatError(name, f"no key in it: give one a line, {PUBLISHED_LINE}")
    return tuple(out)


def _check_keys_published(
    run: _Run, exported: Sequence[SigningKeyRecord], published: Sequence[SigningKeyRecord]
) -> None:
    """Every key the export lists must be one a participant published (same id, same
    key bytes): any other was added by someone else."""
    known = {(k.participant_id, k.key_id, k.public_key) for k in published}
    for k in exported:
        if (k.participant_id, k.key_id, k.public_key) not in known:
            run.add(
                SIGNING_KEYS_FILE,
                f"key {k.key_id} of {k.participant_id} is not among the keys the "
                "participants published (--keys): the switch lists a key its owner never "
                "registered",
                participant=k.participant_id,
            )


def _check_signatures(
    run: _Run, file: str, entries: Iterable[LedgerEntry], keys: Sequence[SigningKeyRecord]
) -> None:
    by_participant: defaultdict[str, dict[str, bytes]] = defaultdict(dict)
    for k in keys:
        by_participant[k.participant_id][k.key_id] = k.public_key
    for e in entries:
        if e.kind != KIND_INTENT:
            continue
        try:
            intent = Intent.decode(e.body)
            order = order_from_canonical_bytes(intent.order_bytes)
        except _CORRUPT:
            continue  # reported where the body is decoded for the chain and the clearing
        try:
            verify_order_signature(
                order, intent.signing_key_id, intent.signature,
                by_participant.get(order.institution_id, {}),
            )  # fmt: skip
        except SignatureRefused as exc:
            run.add(
                file,
                f"INTENT of {e.payment_key}: signature refused ({exc.reason}): {exc.message}",
                shard=e.shard,
                seq=e.seq,
                participant=order.institution_id,
            )


def _check_intents(
    run: _Run,
    manifest: Manifest,
    entries: Sequence[LedgerEntry],
    intents: Sequence[LedgerEntry],
) -> None:
    starts = {s.shard: s.start_seq for s in manifest.shards}
    in_window: dict[str, LedgerEntry] = {}
    for e in entries:
        if e.kind == KIND_INTENT:
            if e.payment_key in in_window:
                run.add(ENTRIES_FILE, f"second INTENT of {e.payment_key}", shard=e.shard, seq=e.seq)
            in_window.setdefault(e.payment_key, e)
    earlier: dict[str, LedgerEntry] = {}
    for e in intents:
        at = {"shard": e.shard, "seq": e.seq}
        if e.kind != KIND_INTENT:
            run.add(INTENTS_FILE, f"a {e.kind}, not an INTENT", **at)
            continue
        if not _hash_matches(e):
            run.add(INTENTS_FILE, "entry_hash does not match the entry's fields", **at)
        if e.shard not in starts or e.seq >= starts[e.shard]:
            run.add(INTENTS_FILE, "does not lie before the window in its shard", **at)
        try:
            Intent.decode(e.body)
        except _CORRUPT as exc:
            run.add(INTENTS_FILE, f"INTENT body does not decode: {exc}", **at)
        if e.payment_key in earlier or e.payment_key in in_window:
            run.add(INTENTS_FILE, f"second INTENT of {e.payment_key}", **at)
        earlier.setdefault(e.payment_key, e)
    needed: set[str] = set()
    for d in entries:
        if d.kind != KIND_DECISION:
            continue
        intent = in_window.get(d.payment_key)
        if intent is None:
            intent = earlier.get(d.payment_key)
            needed.add(d.payment_key)
        if intent is None or intent.shard != d.shard or intent.seq >= d.seq:
            run.add(
                ENTRIES_FILE,
                f"DECISION of {d.payment_key} has no INTENT before it in its shard "
                f"(neither in the window nor in {INTENTS_FILE})",
                shard=d.shard,
                seq=d.seq,
            )
    for key in sorted(earlier.keys() - needed):
        e = earlier[key]
        run.add(
            INTENTS_FILE, f"{key}: no DECISION of the window needs it", shard=e.shard, seq=e.seq
        )


def _hash_matches(e: LedgerEntry) -> bool:
    try:
        recomputed = entry_hash(
            shard=e.shard, epoch=e.epoch, seq=e.seq, kind=e.kind, payment_key=e.payment_key,
            body=e.body, prev_hash=e.prev_hash,
        )  # fmt: skip
    except _CORRUPT:
        return False
    return recomputed == e.entry_hash


def _check_clearing(
    run: _Run,
    manifest: Manifest,
    entries: Sequence[LedgerEntry],
    intents: Sequence[LedgerEntry],
    clearing: WindowClearing,
) -> None:
    try:
        by_key: dict[str, Intent] = {}
        for e in (*intents, *entries):
            # A body that does not decode is reported by _check_intents.
            with contextlib.suppress(*_CORRUPT):
                by_key |= intents_by_key([e])
        recomputed = clear_window(manifest.window_id, entries, clearing.kinds(), by_key)
        expected = clearing_files(recomputed)
    except _CORRUPT as exc:
        run.add(CLEARING_FILE, f"cannot recompute the clearing from {ENTRIES_FILE}: {exc}")
        return
    for name, text in sorted(expected.items()):
        participant = _participant_of(name)
        try:
            found = (run.directory / name).read_bytes()
        except OSError:
            run.add(name, "missing", participant=participant)
            continue
        if found != text.encode("utf-8"):
            _report_difference(run, name, text, found, participant)
    recon_dir = run.directory / RECONCILIATION_DIR
    if recon_dir.is_dir():
        for path in sorted(recon_dir.iterdir()):
            name = f"{RECONCILIATION_DIR}/{path.name}"
            if name not in expected:
                run.add(name, "not part of the clearing", participant=_participant_of(name))


def _participant_of(name: str) -> str | None:
    if not name.startswith(f"{RECONCILIATION_DIR}/"):
        return None
    return name.removeprefix(f"{RECONCILIATION_DIR}/").rsplit(".", 1)[0]


def _report_difference(
    run: _Run, name: str, expected: str, found_bytes: bytes, participant: str | None
) -> None:
    try:
        found = found_bytes.decode("utf-8")
    except UnicodeDecodeError:
        run.add(name, "not UTF-8, so not the recomputed file", participant=participant)
        return
    if name.endswith(".json"):
        diffs = _json_differences(expected, found)
        for path, message in diffs[:DIFFS_PER_FILE_MAX]:
            run.add(name, f"{path}: {message}", participant=participant)
        more = len(diffs) - DIFFS_PER_FILE_MAX
    else:
        more = _csv_differences(run, name, expected, found, participant)
    if more > 0:
        run.add(name, f"and {more} more difference(s)", participant=participant)


def _json_differences(expected_text: str, found_text: str) -> list[tuple[str, str]]:
    try:
        found = json.loads(found_text)
    except ValueError as e:
        return [("$", f"not JSON ({e}); differs from the recomputed file")]
    out: list[tuple[str, str]] = []
    _json_diff(json.loads(expected_text), found, "$", out)
    return out or [("$", "same content, different bytes (formatting or key order)")]


def _json_diff(expected: object, found: object, path: str, out: list[tuple[str, str]]) -> None:
    if isinstance(expected, dict) and isinstance(found, dict):
        for key in sorted(expected.keys() | found.keys()):
            if key not in found:
                out.append((f"{path}.{key}", "missing"))
            elif key not in expected:
                out.append((f"{path}.{key}", "not expected"))
            else:
                _json_diff(expected[key], found[key], f"{path}.{key}", out)
    elif isinstance(expected, list) and isinstance(found, list):
        for n, (a, b) in enumerate(zip(expected, found, strict=False)):
            _json_diff(a, b, f"{path}[{n}]", out)
        if len(expected) != len(found):
            out.append((path, f"{len(found)} items, recomputed {len(expected)}"))
    elif type(expected) is not type(found) or expected != found:
        out.append((path, f"found {found!r}, recomputed {expected!r}"))


def _csv_differences(
    run: _Run, name: str, expected: str, found: str, participant: str | None
) -> int:
    """Report differing lines; return how many differences were left unreported."""
    want, got = expected.splitlines(), found.splitlines()
    if want == got:
        run.add(name, "same lines, other line ends or bytes", participant=participant)
        return 0
    header = next(csv.reader(want[:1]), [])
    column = header.index("participant_id") if "participant_id" in header else None
    reported = unreported = 0
    for n in range(max(len(want), len(got))):
        a = want[n] if n < len(want) else None
        b = got[n] if n < len(got) else None
        if a == b:
            continue
        if reported >= DIFFS_PER_FILE_MAX:
            unreported += 1
            continue
        who = participant
        if column is not None and n > 0:
            cells = next(csv.reader([a if a is not None else b or ""]), [])
            who = cells[column] if column < len(cells) else who
        if a is None:
            message = f"line {n + 1} is not in the recomputed file: {b!r}"
        elif b is None:
            message = f"line {n + 1} is missing: recomputed {a!r}"
        else:
            message = f"line {n + 1}: found {b!r}, recomputed {a!r}"
        run.add(name, message, participant=who)
        reported += 1
    return unreported


def _check_previous(
    run: _Run, manifest: Manifest, intents: Sequence[LedgerEntry], previous: Path
) -> None:
    """Link this window to the previous window's export: cut to start, shard by shard."""
    where = f"{MANIFEST_FILE} (against {previous})"
    try:
        before = read_manifest(previous)
        before_entries = read_entries(previous, ENTRIES_FILE)
    except (ExportFormatError, OSError) as exc:
        run.add(where, f"the previous export cannot be read: {exc}")
        return
    if before.window_id != manifest.window_id - 1:
        run.add(where, f"the previous export is of window {before.window_id}")
        return
    cuts = {s.shard: s for s in before.shards}
    for sr in manifest.shards:
        cut = cuts.get(sr.shard)
        if cut is None:
            run.add(where, "the previous window has no cut in this shard", shard=sr.shard)
        elif (sr.start_seq, sr.start_prev_hash) != (cut.cut_seq + 1, cut.cut_entry_hash):
            run.add(
                where,
                f"the window starts at seq {sr.start_seq} after hash "
                f"{sr.start_prev_hash.hex()[:16]}..., not right after the previous window's "
                f"cut {cut.cut_seq}/{cut.cut_entry_hash.hex()[:16]}...",
                shard=sr.shard,
            )
    hashes = {(e.shard, e.seq): e.entry_hash for e in before_entries}
    starts = {s.shard: s.start_seq for s in before.shards}
    for e in intents:
        in_previous = e.shard in starts and e.seq >= starts[e.shard]
        if in_previous and hashes.get((e.shard, e.seq)) != e.entry_hash:
            run.add(
                INTENTS_FILE,
                "not the previous window's entry at this shard and seq",
                shard=e.shard,
                seq=e.seq,
            )


def _check_nets_sum_to_zero(run: _Run, clearing: WindowClearing) -> None:
    sums: Counter[str] = Counter()
    for n in clearing.net_positions:
        sums[n.currency] += n.net_minor
    for ccy, total in sorted(sums.items()):
        if total != 0:
            run.add(CLEARING_FILE, f"net positions in {ccy} sum to {total}, not zero")
    try:
        text = (run.directory / NET_POSITIONS_FILE).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        run.add(NET_POSITIONS_FILE, f"cannot be read: {e}")
        return
    sums = Counter()
    for line, row in enumerate(csv.DictReader(text.splitlines()), start=2):
        try:
            sums[row["currency"]] += int(row["net_minor"])
        except (KeyError, TypeError, ValueError):
            run.add(NET_POSITIONS_FILE, f"line {line}: no integer net_minor and currency")
            return
    for ccy, total in sorted(sums.items()):
        if total != 0:
            run.add(NET_POSITIONS_FILE, f"net positions in {ccy} sum to {total}, not zero")


def merkle_root_arg(text: str) -> bytes:
    """A Merkle root on the command line: 64 hex digits (SHA-256)."""
    try:
        root = bytes.fromhex(text)
    except ValueError:
        root = b""
    if len(root) != MERKLE_ROOT_BYTES:
        raise argparse.ArgumentTypeError(f"not {MERKLE_ROOT_BYTES * 2} hex digits: {text!r}")
    return root


def add_expected_root(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--expected-root",
        type=merkle_root_arg,
        metavar="HEX",
        help="the window's Merkle root obtained independently (e.g. GetWindow on another "
        "city's node); the export must have it",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m clearinghouse.audit.verify <dir> [--json] [--previous <dir>]
    [--keys FILE] [--expected-root HEX]``: exit status 0 if the export verifies, 1 if not (2 for bad
    arguments, from argparse)."""
    parser = argparse.ArgumentParser(
        prog="python -m clearinghouse.audit.verify",
        description="Verify a settlement window export folder from its files alone.",
    )
    parser.add_argument("directory", type=Path, help="the export folder")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--previous", type=Path, help="the previous window's export, to link the two windows"
    )
    parser.add_argument(
        "--keys",
        type=Path,
        help="signing keys the participants published themselves (signing_keys.json's "
        "shape): check signatures with these, not the export's",
    )
    add_expected_root(parser)
    args = parser.parse_args(argv)
    report = verify_export(
        args.directory, args.previous, args.keys, expected_root=args.expected_root
    )
    sys.stdout.write(report.to_json() if args.json else report.summary())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
