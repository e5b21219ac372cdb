"""What a repair of the keyspace did: one record per Cassandra node it ran from.

Kept apart from ``cluster`` so that readers of results (the drill's checker, reports)
need not load process management.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Repair:
    """One ``nodetool repair --full`` of the keyspace from one Cassandra node."""

    zone: str
    ok: bool
    seconds: float
    detail: str  # the line nodetool ended with, or why it did not end
    log: str  # the node's system.log, where Cassandra says what the repair did
    # Cassandra nodes that were down and so left out (``--force``): not repaired.
    left_out: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"zone": self.zone, "ok": self.ok, "seconds": round(self.seconds, 1),
                "detail": self.detail, "log": self.log,
                "left_out": list(self.left_out)}  # fmt: skip


def nodetool_gist(output: str, returncode: int) -> str:
    """The line of nodetool's output that says how it ended: the last one, or when it
    failed, the last ``error:`` line (else the last naming an error, not a stack frame)."""
    lines = [ln.strip() for ln in output.strip().splitlines() if ln.strip()]
    if returncode != 0:
        said = [ln for ln in lines if ln.startswith("error:")] or [
            ln for ln in lines if not ln.startswith(("at ", "..."))
            and any(w in ln.lower() for w in ("error", "exception", "fail"))
        ]  # fmt: skip
        if said:
            return said[-1][:500]
    return lines[-1][:500] if lines else f"nodetool exited {returncode}"


__all__ = ["Repair", "nodetool_gist"]
