"""Where the ledger's rows are: the counts a writer keeps and the report its close returns."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class LedgerCounts:
    """Where every row this run recorded is. Always: recorded == stored + journaled + unjournaled + lost."""

    recorded: int  # rows this run recorded (every answered or refused request of a known task)
    stored: int  # in the store
    journaled: int  # not in the store yet; its whole line is in the journal (written at the next start)
    unjournaled: int  # not in the store yet and not in the journal: held in memory only
    lost: int  # in neither, as far as this run can tell: counted, logged and said at the stop
    pending: int  # rows held in memory while the store refuses them (earlier runs' included)
    replayed: int  # rows of an earlier run's journal this run stored
    earlier_held: int  # rows of an earlier run's journal still waiting for the store (they stay in the journal)
    unreadable: int  # lines of an earlier run's journal that were not rows (a torn line): skipped


@dataclass(frozen=True, slots=True)
class LedgerClose:
    """What `LedgerWriter.close` kept, for the proxy's stop line and log: only what is true."""

    counts: LedgerCounts
    journal: Path
    lost_because: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    def summary(self) -> str:
        c = self.counts
        text = (f"{c.stored} ledger row(s) stored this run, {c.journaled} held in the journal {self.journal} "
                f"for the next start, {c.lost} lost (of {c.recorded} recorded)")
        if c.lost:
            text += ": " + "; ".join(self.lost_because)
        if c.replayed:
            text += f"; {c.replayed} row(s) of an earlier run's journal stored"
        if c.earlier_held:
            text += f"; {c.earlier_held} row(s) of an earlier run still wait in the journal"
        for note in self.notes:
            text += f"; {note}"
        return text
