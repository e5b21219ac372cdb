"""Window exports: written from an in-memory ledger, verified from the files alone, and
refused when any file is tampered with."""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from clearinghouse import topology
from clearinghouse._invariant import InvariantViolation
from clearinghouse.audit import cli as audit_cli
from clearinghouse.audit.export import (
    ENTRIES_FILE,
    INTENTS_FILE,
    MANIFEST_FILE,
    NET_POSITIONS_FILE,
    SIGNING_KEYS_FILE,
    entry_from_json,
    entry_to_json,
    read_export,
    render_signing_keys,
    write_export,
)
from clearinghouse.audit.verify import Problem, VerifyReport, main, verify_export
from clearinghouse.domain.chain import FIRST_SEQ, GENESIS_HASH, ChainBuilder, LedgerEntry
from clearinghouse.domain.clearing import clear_window
from clearinghouse.domain.entries import (
    KIND_CAP_GRANT,
    KIND_CAP_RECEIVE,
    KIND_DECISION,
    KIND_INTENT,
    KIND_WINDOW_CUT,
    CapTransfer,
    Decision,
    Intent,
    WindowCut,
    cap_key,
    window_key,
)
from clearinghouse.domain.fingerprint import canonical_bytes, fingerprint
from clearinghouse.domain.merkle import MerkleTree, verify_inclusion, window_leaves
from clearinghouse.domain.model import (
    ParticipantKind,
    PaymentOrder,
    PaymentState,
    PaymentType,
    SigningKeyRecord,
)
from clearinghouse.domain.money import Money
from clearinghouse.domain.postings import postings_for
from clearinghouse.domain.signing import key_id_of, public_key_bytes, sign_order

pytestmark = pytest.mark.unit

S = PaymentState
SHARD_COUNT = 6
KINDS = {
    "INST_ALIPAY": ParticipantKind.INSTITUTION,
    "INST_WECHAT": ParticipantKind.INSTITUTION,
    "BANK_ICBC": ParticipantKind.BANK,
    "BANK_CCB": ParticipantKind.BANK,
    "BANK_BOC": ParticipantKind.BANK,  # no payments: an empty reconciliation
}
T0_US = 1_790_000_000_000_000
# Each institution's signing key, fixed so that exports are the same bytes on every run.
PRIVATE_KEYS = {
    pid: Ed25519PrivateKey.from_private_bytes(hashlib.sha256(pid.encode()).digest())
    for pid in ("INST_ALIPAY", "INST_WECHAT")
}
SIGNING_KEYS = [
    SigningKeyRecord(pid, key_id_of(public_key_bytes(k)), public_key_bytes(k), T0_US)
    for pid, k in PRIVATE_KEYS.items()
]
# A key someone with write access to the switch made up, and an intent left unsigned.
INSIDER_KEY = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"insider").digest())
INSIDER_RECORD = SigningKeyRecord(
    "INST_ALIPAY", key_id_of(public_key_bytes(INSIDER_KEY)), public_key_bytes(INSIDER_KEY), T0_US
)
UNSIGNED = Ed25519PrivateKey.from_private_bytes(b"\x01" * 32)
REWRITTEN = 16  # a window-2 payment of INST_ALIPAY


@dataclass
class Ledger:
    """Six shard chains written as owners would: intents, decisions, caps, cuts."""

    chains: dict[int, ChainBuilder] = field(
        default_factory=lambda: {
            s: ChainBuilder(s, 10, FIRST_SEQ, GENESIS_HASH) for s in range(SHARD_COUNT)
        }
    )
    entries: dict[int, list[LedgerEntry]] = field(
        default_factory=lambda: {s: [] for s in range(SHARD_COUNT)}
    )
    clock_us: int = T0_US

    def append(self, shard: int, kind: str, payment_key: str, body: bytes) -> LedgerEntry:
        self.clock_us += 1_000
        entry = self.chains[shard].append(kind, payment_key, body)
        self.entries[shard].append(entry)
        return entry

    def take_over(self, shard: int, epoch: int) -> None:
        """A new owner continues the chain at a higher epoch."""
        old = self.chains[shard]
        self.chains[shard] = ChainBuilder(shard, epoch, old.next_seq, old.head_hash)

    def intent(self, o: PaymentOrder, shard: int, key: Ed25519PrivateKey | None = None) -> None:
        """The order's INTENT, signed with ``key`` (default: its institution's); with
        ``UNSIGNED``, without a signature."""
        bank = o.payer_id if o.type is PaymentType.DEBIT else o.payee_id
        if key is UNSIGNED:
            key_id, signature = "", b""
        else:
            key_id, signature = sign_order(o, key or PRIVATE_KEYS[o.institution_id])
        i = Intent(
            canonical_bytes(o), fingerprint(o), bank, "shanghai-a", self.clock_us, "SW1",
            key_id, signature,
        )  # fmt: skip
        self.append(shard, KIND_INTENT, _key(o), i.encode())

    def decide(self, o: PaymentOrder, shard: int, state: PaymentState) -> None:
        postings = postings_for(_key(o), o, state, from_state=S.ROUTED)
        d = Decision(state, self.clock_us, "shanghai-a", "", "BR", False, postings)
        self.append(shard, KIND_DECISION, _key(o), d.encode())

    def cap(self, home: int, borrower: int, pid: str, amount: int) -> None:
        grant = CapTransfer(pid, "CNY", borrower, amount, self.clock_us)
        self.append(home, KIND_CAP_GRANT, cap_key(pid, "CNY"), grant.encode())
        receipt = CapTransfer(pid, "CNY", home, amount, self.clock_us)
        self.append(borrower, KIND_CAP_RECEIVE, cap_key(pid, "CNY"), receipt.encode())

    def cut(self, window_id: int) -> None:
        for s in range(SHARD_COUNT):
            body = WindowCut(window_id, self.clock_us).encode()
            self.append(s, KIND_WINDOW_CUT, window_key(window_id), body)

    def window(self, window_id: int) -> dict[int, list[LedgerEntry]]:
        """Per shard: after the previous window's cut, up to and including this one's."""
        out: dict[int, list[LedgerEntry]] = {}
        for s, chain in self.entries.items():
            cuts = [n for n, e in enumerate(chain) if e.kind == KIND_WINDOW_CUT]
            end = cuts[window_id - 1]
            start = cuts[window_id - 2] + 1 if window_id > 1 else 0
            out[s] = chain[start : end + 1]
        return out


def _order(n: int, kind: PaymentType, inst: str, bank: str, amount: int) -> PaymentOrder:
    payer, payee = (bank, inst) if kind is PaymentType.DEBIT else (inst, bank)
    return PaymentOrder(
        payment_id=f"p-{n:04d}", institution_id=inst, type=kind, payer_id=payer,
        payee_id=payee, bank_account=f"62220200000{n:05d}", amount=Money(amount, "CNY"),
        memo="", requested_at_us=T0_US,
    )  # fmt: skip


def _key(o: PaymentOrder) -> str:
    return f"{o.institution_id}/{o.payment_id}"


def build_ledger(
    rewrite: Callable[[int, PaymentOrder], tuple[PaymentOrder, Ed25519PrivateKey | None]]
    | None = None,
) -> tuple[Ledger, list[LedgerEntry]]:
    """Windows 1 and 2; returns the ledger and the window-1 intents decided in window 2.

    ``rewrite(n, order)`` gives each window-2 payment's order and signing key instead
    (None: its institution's): the ledger an insider who rewrote history would produce,
    every hash and chain link recomputed."""
    led = Ledger()
    D, C = PaymentType.DEBIT, PaymentType.CREDIT
    parties = [("INST_ALIPAY", "BANK_ICBC"), ("INST_WECHAT", "BANK_CCB"),
               ("INST_ALIPAY", "BANK_CCB"), ("INST_WECHAT", "BANK_ICBC")]  # fmt: skip
    states = [S.APPROVED, S.APPROVED, S.DECLINED, S.APPROVED, S.FAILED]
    led.cap(0, 3, "BANK_ICBC", 50_000)
    # Window 1: twelve payments decided, four still in flight at the cut.
    in_flight: list[tuple[PaymentOrder, int]] = []
    for n in range(16):
        inst, bank = parties[n % 4]
        o = _order(n, D if n % 3 else C, inst, bank, 1_000 + 37 * n)
        shard = n % 5  # shard 5 holds nothing but its cuts
        led.intent(o, shard)
        if n < 12:
            led.decide(o, shard, states[n % 5])
        else:
            in_flight.append((o, shard))
    led.cut(1)
    # Window 2: the in-flight payments are decided, new ones come and go, owners change.
    led.take_over(2, 11)
    pending = {_key(o) for o, _ in in_flight}
    referenced = [
        e for s in range(SHARD_COUNT) for e in led.entries[s]
        if e.kind == KIND_INTENT and e.payment_key in pending
    ]  # fmt: skip
    for o, shard in in_flight:
        led.decide(o, shard, S.APPROVED)
    led.cap(1, 4, "INST_WECHAT", 20_000)
    for n in range(16, 30):
        inst, bank = parties[n % 4]
        o = _order(n, C if n % 2 else D, inst, bank, 500 + 11 * n)
        key = None
        if rewrite is not None:
            o, key = rewrite(n, o)
        shard = n % 5
        led.intent(o, shard, key)
        if n < 27:
            led.decide(o, shard, states[n % 5])
    led.cut(2)
    return led, referenced


@pytest.fixture
def exported(tmp_path: Path) -> Path:
    led, referenced = build_ledger()
    return write_export(
        tmp_path / "w2", 2, led.window(2), referenced, KINDS, signing_keys=SIGNING_KEYS
    )


def _problems(report: VerifyReport, file: str) -> list[Problem]:
    return [p for p in report.problems if p.file == file]


def _rewrite_entries(directory: Path, name: str, edit: Callable[[list[LedgerEntry]], None]) -> None:
    path = directory / name
    entries = [entry_from_json(line, name) for line in path.read_text().splitlines()]
    edit(entries)
    path.write_text("".join(entry_to_json(e) + "\n" for e in entries))


def test_export_verifies_and_reads_back(exported: Path) -> None:
    led, referenced = build_ledger()
    window = led.window(2)
    report = verify_export(exported)
    assert report.ok, report.summary()
    assert report.problems == ()
    assert (report.window_id, report.shard_count) == (2, SHARD_COUNT)

    names = sorted(str(p.relative_to(exported)) for p in exported.rglob("*") if p.is_file())
    assert names == sorted(
        [MANIFEST_FILE, ENTRIES_FILE, INTENTS_FILE, "clearing.json", NET_POSITIONS_FILE,
         "bilateral.csv", "instructions.csv", SIGNING_KEYS_FILE]
        + [f"reconciliation/{pid}.{ext}" for pid in KINDS for ext in ("csv", "json")]
    )  # fmt: skip

    export = read_export(exported)
    m = export.manifest
    assert (m.window_id, m.shard_count, len(m.shards)) == (2, SHARD_COUNT, SHARD_COUNT)
    window1 = led.window(1)
    for sr in m.shards:
        prev_cut = window1[sr.shard][-1]
        assert (sr.start_seq, sr.start_prev_hash) == (prev_cut.seq + 1, prev_cut.entry_hash)
        cut = window[sr.shard][-1]
        assert (sr.cut_seq, sr.cut_entry_hash) == (cut.seq, cut.entry_hash)
    assert m.shards[5].start_seq == m.shards[5].cut_seq  # only its cut in this window
    flat = [e for s in range(SHARD_COUNT) for e in window[s]]
    assert export.entries == tuple(flat)
    assert m.entry_count == len(flat)
    assert m.created_at_us == WindowCut.decode(window[SHARD_COUNT - 1][-1].body).at_us
    assert export.intents == tuple(sorted(referenced, key=lambda e: (e.shard, e.seq)))
    assert len(export.intents) == 4

    # Every entry of the window can be proven against the manifest's root.
    tree = MerkleTree(window_leaves(export.entries))
    assert tree.root == m.merkle_root
    for i, leaf in enumerate(window_leaves(export.entries)):
        assert verify_inclusion(leaf, i, tree.size, tree.proof(i), m.merkle_root)

    intents = {e.payment_key: Intent.decode(e.body) for e in (*referenced, *flat)
               if e.kind == KIND_INTENT}  # fmt: skip
    clearing = clear_window(2, flat, KINDS, intents)
    assert export.clearing == clearing
    assert (exported / "clearing.json").read_text() == clearing.to_json()
    # Payments whose intent lies in window 1 still get their order's details.
    rows = [r for rec in clearing.reconciliations for r in rec.rows]
    assert all(r.type in ("DEBIT", "CREDIT") and r.amount_minor for r in rows)
    assert {"p-0012", "p-0013", "p-0014", "p-0015"} <= {r.payment_id for r in rows}
    assert clearing.reconciliation("BANK_BOC").rows == ()


def test_export_is_deterministic_and_rewritable(tmp_path: Path, exported: Path) -> None:
    led, referenced = build_ledger()
    other = write_export(
        tmp_path / "again", 2, led.window(2), referenced, KINDS, signing_keys=SIGNING_KEYS
    )
    files = sorted(p.relative_to(exported) for p in exported.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(other) for p in other.rglob("*") if p.is_file())
    for rel in files:
        assert (exported / rel).read_bytes() == (other / rel).read_bytes(), rel
    # Writing over an earlier export replaces it, stale participant files included.
    fewer = {k: v for k, v in KINDS.items() if k != "BANK_BOC"}
    write_export(exported, 2, led.window(2), referenced, fewer, signing_keys=SIGNING_KEYS)
    assert not (exported / "reconciliation/BANK_BOC.csv").exists()
    assert not list(exported.rglob(".*.tmp"))
    assert verify_export(exported).ok


def test_write_export_refuses_bad_input(tmp_path: Path) -> None:
    led, referenced = build_ledger()
    window = led.window(2)
    with pytest.raises(InvariantViolation, match="WINDOW_CUT"):
        write_export(
            tmp_path / "a",
            2,
            {**window, 3: window[3][:-1]},
            referenced,
            KINDS,
            signing_keys=SIGNING_KEYS,
        )
    with pytest.raises(InvariantViolation, match="no intent"):
        write_export(tmp_path / "b", 2, window, referenced[1:], KINDS, signing_keys=SIGNING_KEYS)
    decided_in_1 = next(e for e in led.window(1)[0] if e.kind == KIND_INTENT)
    with pytest.raises(InvariantViolation, match="not needed"):
        write_export(
            tmp_path / "c", 2, window, [*referenced, decided_in_1], KINDS, signing_keys=SIGNING_KEYS
        )
    with pytest.raises(InvariantViolation, match="before the window"):
        in_2 = next(e for e in window[4] if e.kind == KIND_INTENT)
        write_export(
            tmp_path / "c", 2, window, [*referenced, in_2], KINDS, signing_keys=SIGNING_KEYS
        )
    with pytest.raises(InvariantViolation, match="shards must be"):
        write_export(
            tmp_path / "d",
            2,
            {s: window[s] for s in range(1, 6)},
            referenced,
            KINDS,
            signing_keys=SIGNING_KEYS,
        )
    with pytest.raises(InvariantViolation, match="chain broken"):
        gap = [e for n, e in enumerate(window[1]) if n != 2]
        write_export(
            tmp_path / "e", 2, {**window, 1: gap}, referenced, KINDS, signing_keys=SIGNING_KEYS
        )
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        write_export(foreign, 2, window, referenced, KINDS, signing_keys=SIGNING_KEYS)
    assert (foreign / "notes.txt").read_text() == "mine"


def test_a_changed_byte_in_an_entry_body_breaks_the_chain_there(exported: Path) -> None:
    target: list[LedgerEntry] = []

    def flip(entries: list[LedgerEntry]) -> None:
        n = next(i for i, e in enumerate(entries) if e.kind == KIND_DECISION and e.shard == 2)
        e = entries[n]
        body = bytearray(e.body)
        body[-3] ^= 0x01
        entries[n] = LedgerEntry(e.shard, e.epoch, e.seq, e.kind, e.payment_key, bytes(body),
                                 e.prev_hash, e.entry_hash)  # fmt: skip
        target.append(e)

    _rewrite_entries(exported, ENTRIES_FILE, flip)
    report = verify_export(exported)
    assert not report.ok
    hit = [p for p in _problems(report, ENTRIES_FILE) if "chain broken" in p.message]
    assert [(p.shard, p.seq) for p in hit] == [(target[0].shard, target[0].seq)]
    assert "WRONG_ENTRY_HASH" in hit[0].message
    # The Merkle root commits to the entry hashes, which did not change: the chain check
    # is what binds a body to its hash. The corrupt body no longer clears either.
    assert not _problems(report, MANIFEST_FILE)
    assert any("cannot recompute" in p.message for p in _problems(report, "clearing.json"))


def test_an_altered_net_position_is_reported(exported: Path) -> None:
    path = exported / NET_POSITIONS_FILE
    lines = path.read_text().splitlines(keepends=True)
    cells = lines[1].rstrip("\n").split(",")
    cells[-1] = str(int(cells[-1]) + 1)
    lines[1] = ",".join(cells) + "\n"
    path.write_text("".join(lines))
    report = verify_export(exported)
    assert not report.ok
    found = _problems(report, NET_POSITIONS_FILE)
    assert any(p.participant == cells[0] and "line 2" in p.message for p in found)
    assert any("sum to 1, not zero" in p.message for p in found)
    assert all(p.file == NET_POSITIONS_FILE for p in report.problems)


def test_a_dropped_cut_is_reported(exported: Path) -> None:
    def drop(entries: list[LedgerEntry]) -> None:
        for shard in (1, 5):
            cut = max((e for e in entries if e.shard == shard), key=lambda e: e.seq)
            assert cut.kind == KIND_WINDOW_CUT
            entries.remove(cut)

    _rewrite_entries(exported, ENTRIES_FILE, drop)
    report = verify_export(exported)
    assert not report.ok
    by_shard = {p.shard: p.message for p in _problems(report, ENTRIES_FILE)}
    assert "cut is missing" in by_shard[1]
    assert "WINDOW_CUT for window 2 is missing" in by_shard[5]  # nothing left of shard 5
    assert any("entry_count" in p.message for p in _problems(report, MANIFEST_FILE))


def test_a_wrong_merkle_root_is_reported(exported: Path) -> None:
    path = exported / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    manifest["merkle_root"] = "ab" * 32
    path.write_text(json.dumps(manifest))
    report = verify_export(exported)
    assert [(p.file, "merkle_root" in p.message) for p in report.problems] == [
        (MANIFEST_FILE, True)
    ]


def test_a_wrong_start_hash_and_a_tampered_intent_are_reported(exported: Path) -> None:
    path = exported / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    manifest["shards"][3]["start_prev_hash"] = "00" * 32
    path.write_text(json.dumps(manifest))
    target: list[LedgerEntry] = []

    def alter(entries: list[LedgerEntry]) -> None:
        e = entries[0]
        body = e.body[:-1] + bytes([e.body[-1] ^ 0x20])  # the signature's last byte
        entries[0] = LedgerEntry(e.shard, e.epoch, e.seq, e.kind, e.payment_key, body,
                                 e.prev_hash, e.entry_hash)  # fmt: skip
        target.append(e)

    _rewrite_entries(exported, INTENTS_FILE, alter)
    report = verify_export(exported)
    chain = _problems(report, ENTRIES_FILE)
    assert [(p.shard, "WRONG_PREV_HASH" in p.message) for p in chain] == [(3, True)]
    intents = _problems(report, INTENTS_FILE)
    assert [(p.shard, p.seq) for p in intents] == [(target[0].shard, target[0].seq)] * 2
    assert "entry_hash" in intents[0].message
    assert "signature refused (SIGNATURE_INVALID)" in intents[1].message


def test_tampered_reconciliation_files_are_reported(exported: Path) -> None:
    recon = exported / "reconciliation"
    text = (recon / "INST_ALIPAY.csv").read_text()
    (recon / "INST_ALIPAY.csv").write_text(text.replace("APPROVED", "DECLINED", 1))
    (recon / "INST_EVIL.csv").write_text("x\n")
    (recon / "BANK_ICBC.json").unlink()
    data = json.loads((recon / "BANK_CCB.json").read_text())
    data["totals"][0]["net_minor"] += 5
    (recon / "BANK_CCB.json").write_text(json.dumps(data, sort_keys=True))
    report = verify_export(exported)
    got = {(p.file, p.participant) for p in report.problems}
    assert got == {
        ("reconciliation/INST_ALIPAY.csv", "INST_ALIPAY"),
        ("reconciliation/INST_EVIL.csv", "INST_EVIL"),
        ("reconciliation/BANK_ICBC.json", "BANK_ICBC"),
        ("reconciliation/BANK_CCB.json", "BANK_CCB"),
    }
    ccb = next(p for p in report.problems if p.participant == "BANK_CCB")
    assert "$.totals[0].net_minor" in ccb.message


def test_unreadable_files_are_problems_not_crashes(tmp_path: Path, exported: Path) -> None:
    (exported / "clearing.json").write_text("{")
    with (exported / ENTRIES_FILE).open("a") as f:
        f.write('{"shard": 1}\n')
    report = verify_export(exported)
    messages = {p.file: p.message for p in report.problems}
    assert "not JSON" in messages["clearing.json"]
    assert messages[ENTRIES_FILE].startswith("line ")
    assert "expected keys" in messages[ENTRIES_FILE]
    empty = verify_export(tmp_path / "nothing-here")
    assert not empty.ok
    assert {p.file for p in empty.problems} >= {MANIFEST_FILE, ENTRIES_FILE}


def test_cli_exit_codes(exported: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(exported)]) == 0
    assert ": OK" in capsys.readouterr().out
    assert main([str(exported), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    net = exported / NET_POSITIONS_FILE
    net.write_text(net.read_text().replace(",-", ",", 1))
    assert main([str(exported)]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and NET_POSITIONS_FILE in out
    assert main([str(exported), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and report["problems"][0]["file"] == NET_POSITIONS_FILE


def test_cli_as_a_module(exported: Path) -> None:
    argv = [sys.executable, "-m", "clearinghouse.audit.verify", str(exported)]
    ok = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert (ok.returncode, ok.stderr) == (0, "")
    manifest = json.loads((exported / MANIFEST_FILE).read_text())
    manifest["created_at_us"] = "soon"  # not an integer
    (exported / MANIFEST_FILE).write_text(json.dumps(manifest))
    bad = subprocess.run([*argv, "--json"], capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode == 1
    assert json.loads(bad.stdout)["problems"][0]["file"] == MANIFEST_FILE


def test_linking_to_the_previous_window(tmp_path: Path, exported: Path) -> None:
    led, referenced = build_ledger()
    first = write_export(tmp_path / "w1", 1, led.window(1), [], KINDS, signing_keys=SIGNING_KEYS)
    assert verify_export(first).ok
    assert verify_export(exported, previous=first).ok
    assert main([str(exported), "--previous", str(first)]) == 0
    wrong = verify_export(exported, previous=exported)
    assert [p.message for p in wrong.problems] == ["the previous export is of window 2"]
    # An export that silently leaves out the first entry of shard 1 (a CAP_GRANT) still verifies on
    # its own (its manifest starts later), but not against the window before.
    window = led.window(2)
    short = write_export(
        tmp_path / "short",
        2,
        {**window, 1: window[1][1:]},
        referenced,
        KINDS,
        signing_keys=SIGNING_KEYS,
    )
    assert verify_export(short).ok
    linked = verify_export(short, previous=first)
    assert [(p.shard, "not right after" in p.message) for p in linked.problems] == [(1, True)]


# -- the participants' own keys (--keys) ----------------------------------------------------


def _published(tmp_path: Path, keys: list[SigningKeyRecord]) -> Path:
    path = tmp_path / "published-keys.json"
    path.write_text(render_signing_keys(keys))
    return path


def _export_of(
    tmp_path: Path,
    name: str,
    rewrite: Callable[[int, PaymentOrder], tuple[PaymentOrder, Ed25519PrivateKey | None]],
    keys: list[SigningKeyRecord],
) -> Path:
    led, referenced = build_ledger(rewrite)
    return write_export(tmp_path / name, 2, led.window(2), referenced, KINDS, signing_keys=keys)


def _insider(n: int, o: PaymentOrder) -> tuple[PaymentOrder, Ed25519PrivateKey | None]:
    """Payment REWRITTEN's amount a hundred times larger, signed with the insider's key."""
    if n != REWRITTEN:
        return o, None
    return replace(o, amount=Money(o.amount.amount_minor * 100, "CNY")), INSIDER_KEY


def test_an_insider_rewrite_is_caught_with_the_keys_participants_published(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An order changed after the fact, re-signed with a key the insider also listed in
    signing_keys.json, with every entry hash, chain link, cut, Merkle root and clearing
    file recomputed: the export verifies against its own keys (why --keys exists), and
    fails against the participants' own."""
    rewritten = _export_of(tmp_path, "rewritten", _insider, [*SIGNING_KEYS, INSIDER_RECORD])
    assert verify_export(rewritten).ok  # the export's keys vouch for themselves
    published = _published(tmp_path, SIGNING_KEYS)
    report = verify_export(rewritten, keys=published)
    assert not report.ok
    (refused,) = _problems(report, ENTRIES_FILE)
    assert "INST_ALIPAY/p-0016" in refused.message
    assert "signature refused (SIGNING_KEY_UNKNOWN)" in refused.message
    assert refused.participant == "INST_ALIPAY"
    (unknown,) = _problems(report, SIGNING_KEYS_FILE)
    assert INSIDER_RECORD.key_id in unknown.message and unknown.participant == "INST_ALIPAY"
    assert len(report.problems) == 2
    # The same from both command lines.
    assert main([str(rewritten), "--keys", str(published)]) == 1
    assert "SIGNING_KEY_UNKNOWN" in capsys.readouterr().out
    args = argparse.Namespace(
        cmd="verify",
        folder=rewritten,
        previous=None,
        keys=published,
        format="json",
        expected_root=None,
    )
    assert audit_cli.run("audit", args, topology.load()) == 1
    assert "SIGNING_KEY_UNKNOWN" in capsys.readouterr().err
    # The untouched export verifies with the published keys.
    led, referenced = build_ledger()
    honest = write_export(
        tmp_path / "honest", 2, led.window(2), referenced, KINDS, signing_keys=SIGNING_KEYS
    )
    assert verify_export(honest, keys=published).ok
    assert main([str(honest), "--keys", str(published)]) == 0
    # What was verified, in clearingctl's answer: the window, its size and its root.
    args.folder = honest
    capsys.readouterr()
    assert audit_cli.run("audit", args, topology.load()) == 0
    (said,) = json.loads(capsys.readouterr().out)
    root = verify_export(honest, keys=published).merkle_root_hex
    assert len(root) == 64  # whole, to give --expected-root next time
    assert said == {"ok": True, "window": 2, "shards": said["shards"], "entries": said["entries"],
                    "payments_decided": said["payments_decided"], "merkle_root": root,
                    "problems": 0}  # fmt: skip
    assert said["entries"] > 0 and said["payments_decided"] > 0


def test_a_key_the_export_lists_but_no_participant_published_is_reported(
    tmp_path: Path, exported: Path
) -> None:
    led, referenced = build_ledger()
    extra = write_export(
        tmp_path / "extra", 2, led.window(2), referenced, KINDS,
        signing_keys=[*SIGNING_KEYS, INSIDER_RECORD],
    )  # fmt: skip
    assert verify_export(extra).ok  # no signature uses it
    report = verify_export(extra, keys=_published(tmp_path, SIGNING_KEYS))
    assert [(p.file, p.participant) for p in report.problems] == [
        (SIGNING_KEYS_FILE, "INST_ALIPAY")
    ]
    assert "not among the keys the participants published" in report.problems[0].message
    # Same id, other key bytes: not the published key either.
    forged_bytes = replace(SIGNING_KEYS[1], public_key=INSIDER_RECORD.public_key)
    report = verify_export(exported, keys=_published(tmp_path, [SIGNING_KEYS[0], forged_bytes]))
    assert {p.file for p in report.problems} == {SIGNING_KEYS_FILE, ENTRIES_FILE, INTENTS_FILE}


def test_an_unsigned_intent_is_reported_with_the_participants_keys(tmp_path: Path) -> None:
    def unsigned(n: int, o: PaymentOrder) -> tuple[PaymentOrder, Ed25519PrivateKey | None]:
        return o, (UNSIGNED if n == REWRITTEN else None)

    export = _export_of(tmp_path, "unsigned", unsigned, SIGNING_KEYS)
    report = verify_export(export, keys=_published(tmp_path, SIGNING_KEYS))
    (missing,) = report.problems
    assert missing.file == ENTRIES_FILE and "SIGNATURE_MISSING" in missing.message
    assert "INST_ALIPAY/p-0016" in missing.message


def test_published_key_lines_are_the_keys_as_institutions_give_them(tmp_path: Path) -> None:
    """The line `pki signing-key new` prints, with the participant's id: one a line."""
    lines = tmp_path / "published.jsonl"
    lines.write_text("".join(  # in any key order (sorted here: key_id first)
        json.dumps({"participant_id": k.participant_id, "key_id": k.key_id,
                    "public_key": base64.b64encode(k.public_key).decode()},
                   sort_keys=True) + "\n"
        for k in SIGNING_KEYS
    ))  # fmt: skip
    rewritten = _export_of(tmp_path, "rewritten", _insider, [*SIGNING_KEYS, INSIDER_RECORD])
    by_lines = verify_export(rewritten, keys=lines)
    by_shape = verify_export(rewritten, keys=_published(tmp_path, SIGNING_KEYS))
    assert not by_lines.ok
    assert [(p.file, p.message) for p in by_lines.problems] == [
        (p.file, p.message) for p in by_shape.problems
    ]  # the same findings: the insider's signature and its key
    assert len(by_lines.problems) == 2
    # A line whose key_id is not its key's: refused, naming the line.
    k = SIGNING_KEYS[0]
    b64 = base64.b64encode(k.public_key).decode()
    lines.write_text(
        json.dumps({"participant_id": k.participant_id, "key_id": "0" * 16, "public_key": b64})
    )
    (bad,) = verify_export(rewritten, keys=lines).problems
    assert bad.file == f"--keys {lines}" and "line 1: key_id" in bad.message


def test_an_unreadable_keys_file_is_a_problem(tmp_path: Path, exported: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "nope"}')
    for path in (bad, tmp_path / "missing.json"):
        report = verify_export(exported, keys=path)
        assert not report.ok
        assert [p.file for p in report.problems] == [f"--keys {path}"], report.problems


def test_an_expected_root_obtained_independently(
    exported: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = read_export(exported).manifest.merkle_root
    matched = verify_export(exported, expected_root=root)
    assert matched.ok  # and it says it compared the root: a pass without it reads the same
    assert matched.also_checked == (f"the merkle root against --expected-root {root.hex()}",)
    assert verify_export(exported).also_checked == ()
    other = hashlib.sha256(b"the root another city's node gave").digest()
    report = verify_export(exported, expected_root=other)
    assert [(p.file, p.message) for p in report.problems] == [
        (MANIFEST_FILE, f"merkle_root {root.hex()} is not the expected root {other.hex()}")
    ]
    assert main([str(exported), "--expected-root", root.hex()]) == 0
    assert f"checked: the merkle root against --expected-root {root.hex()}" in (
        capsys.readouterr().out
    )
    assert main([str(exported), "--expected-root", other.hex().upper()]) == 1
    assert "not the expected root" in capsys.readouterr().out
    for bad in ("abc", "zz" * 32, root.hex()[:-2]):
        with pytest.raises(SystemExit) as e:
            main([str(exported), "--expected-root", bad])
        assert e.value.code == 2
