"""Refusals in the server's log: each kind of refusal of each peer is logged at once, then at
most once a minute with how many there were since, so a hostile or broken peer cannot flood
the log, and an operator still sees who was refused, for what, and how often."""

from __future__ import annotations

import logging
import time

log = logging.getLogger("hauler.server.refusals")
PERIOD_S = 60.0


class RefusalLog:
    def __init__(self, period_s: float = PERIOD_S) -> None:
        self.period_s = period_s
        self._counts: dict[
            tuple[str, str], tuple[float, int]
        ] = {}  # (peer, kind) -> (logged at, since)

    def refused(self, peer: str, kind: str, reason: str) -> None:
        """Count a refusal of `peer`; log it if none of its kind was logged in the last period."""
        now = time.monotonic()
        logged_at, since = self._counts.get((peer, kind), (-self.period_s, 0))
        if now - logged_at < self.period_s:
            self._counts[peer, kind] = (logged_at, since + 1)
            return
        self._counts[peer, kind] = (now, 0)
        log.warning(
            "refused",
            extra={
                "peer": peer,
                "kind": kind,
                "reason": reason[:300],
                "refused_since_last_logged": since + 1,
            },
        )
        if len(self._counts) > 10_000:  # many peers: forget those quiet for a period
            self._counts = {
                key: value for key, value in self._counts.items() if now - value[0] < self.period_s
            }
