"""A template build's log and outcome, as the client polls them (`GET .../builds/{id}/status`:
entries from an offset, each with a time, level and step)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

MAX_ENTRIES = 20_000
MAX_LINE = 4096


@dataclass(frozen=True)
class Entry:
    timestamp: float
    level: str  # debug | info | warn | error
    message: str
    step: str | None = None


@dataclass
class BuildLog:
    entries: list[Entry] = field(default_factory=list)
    status: str = "waiting"  # waiting | building | ready | error
    reason: str | None = None
    failed_step: str | None = None
    dropped: int = 0

    def add(self, message: str, level: str = "info", step: str | None = None) -> None:
        # Clients read from an offset, so entries are only ever appended; past the limit only
        # errors are (they say why a build failed).
        if len(self.entries) >= MAX_ENTRIES and level != "error":
            self.dropped += 1
            return
        self.entries.append(Entry(time.time(), level, message[:MAX_LINE], step))

    def fail(self, reason: str, step: str | None) -> None:
        self.add(reason, "error", step)
        self.status, self.reason, self.failed_step = "error", reason, step
