"""Where the time of a slow start went, for the log.

A create or resume is a few steps (waiting for a start slot, a network slot, a disk, `runsc
restore`, envd's init). Under load one of them can take minutes; the log then says which,
instead of only that the caller gave up.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)

SLOW_S = 10.0  # a start takes about a second on an idle host


class Steps:
    def __init__(self, what: str) -> None:
        self.what = what
        self._t0 = self._last = time.monotonic()
        self._took: list[tuple[str, float]] = []

    def done(self, step: str) -> None:
        now = time.monotonic()
        self._took.append((step, now - self._last))
        self._last = now

    def report(self, outcome: str = "done") -> None:
        """Log the breakdown if the whole took longer than SLOW_S."""
        total = time.monotonic() - self._t0
        if total >= SLOW_S:
            parts = ", ".join(f"{step} {took:.1f}s" for step, took in self._took)
            log.warning("%s %s after %.1fs: %s", self.what, outcome, total, parts or "no steps")
