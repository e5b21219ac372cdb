"""A simulated bank: one bank's ``clearing.v1.BankService`` over real gRPC.

The switch routes every payment to a bank. In tests, drills and the local cluster,
each bank is one process of this package with its own idempotent book (keyed by the
switch's ``switch_ref`` and journalled so that it survives a restart) and knobs for
the failures the switch must survive: declines, latency, answers that come too late,
and outages. Run it as ``python -m clearinghouse.bank --help``; see ``__main__`` for
the run-time drill signals.
"""

from clearinghouse.bank._behaviour import BankBehaviour, BankControls, Decision, TransferKind
from clearinghouse.bank._ledger import (
    REVERSED_BEFORE_ARRIVAL,
    BankLedger,
    CurrencyTotals,
    JournalError,
    SwitchRefReused,
    Transfer,
    TxnRecord,
    TxnStatus,
)
from clearinghouse.bank.server import GRACE_S, BankConfig, BankServerHandle, serve
from clearinghouse.domain.errors import ERROR_METADATA_KEY

__all__ = [
    "ERROR_METADATA_KEY",
    "GRACE_S",
    "REVERSED_BEFORE_ARRIVAL",
    "BankBehaviour",
    "BankConfig",
    "BankControls",
    "BankLedger",
    "BankServerHandle",
    "CurrencyTotals",
    "Decision",
    "JournalError",
    "SwitchRefReused",
    "Transfer",
    "TransferKind",
    "TxnRecord",
    "TxnStatus",
    "serve",
]
