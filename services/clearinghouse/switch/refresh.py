"""The node's periodic re-read of the participant registry and the revoked certificates.

Each read is on its own: a failure of one keeps that one's last good snapshot and does
not hold the other back. The revocation list only grows (:meth:`RevocationList.merge`),
so a failed or late read never admits a certificate again; it only delays refusing one
revoked on another node. That delay is said at ERROR, with how long the list has been
stale, on every failed round until a read succeeds. A node that cannot read them cannot
commit either (the same Cassandra, the same QUORUM), so a stale list does not go with
payments being accepted for long.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass
class RegistryRefresh:
    """One round per call of :meth:`round`; the node calls it every ``interval_s``."""

    participants: Callable[[], None]
    revocations: Callable[[], None]
    interval_s: float
    clock: Callable[[], float] = time.monotonic
    # When the first failed revocation read of the current run of failures happened.
    stale_since: float | None = None

    def stale_s(self) -> float:
        """How long the revocation list may have missed a revocation (0 while fresh):
        from the last successful read, one interval before the first failed one."""
        if self.stale_since is None:
            return 0.0
        return self.clock() - self.stale_since + self.interval_s

    def round(self) -> bool:
        """Read both; True when the revocation list is fresh after it."""
        try:
            self.participants()
        except Exception:
            log.warning("participant registry refresh failed", exc_info=True)
        try:
            self.revocations()
        except Exception:
            if self.stale_since is None:
                self.stale_since = self.clock()
            log.error(
                "revoked certificates not refreshed for %.0f s: a revocation taken on "
                "another node is not refused here until they are",
                self.stale_s(),
                exc_info=True,
            )
            return False
        if self.stale_since is not None:
            log.warning("revoked certificates refreshed again after %.0f s", self.stale_s())
            self.stale_since = None
        return True
