"""The request ledger: rows queued by the proxy, written in batches by one thread, rolled up per minute.

The proxy's request path appends each row to a journal (one JSON line, a plain write: it survives
SIGKILL, not a power cut) beside the store or in `[proxy] journal_dir`, and to a queue. The writer thread
wakes on the first queued row, lets rows gather for `flush_every_s`, then writes them in batches: inserts
the raw rows and folds them into the per-minute rollups in one transaction, and drops the journal's
committed prefix.

No row is dropped silently. Every row recorded is counted in exactly one of: stored, journaled (its whole
line is in the journal), held in memory only, lost (`LedgerWriter.counts()`):
- every journal write is checked: a short write (a full disk takes part of a line) is cut back or fenced
  off with a newline, and the row counts as not journaled; an fsync that fails marks the journal as not
  durable for the rest of the run;
- when the store cannot be written (disk full, locked, I/O error) the rows stay pending, in memory and in
  the journal, retried every `retry_every_s` (the journal is fsynced then); the failure is logged once
  and counted;
- a row the store cannot take as given (text with a lone surrogate, an integer past 64 bits) is stored
  with the offending field made safe and `sanitized = 1`, never taking its batch with it;
- rows in the journal that never reached the store (the process was killed) are written when the next
  writer opens the same store, once each (by request id); a torn line is skipped and counted.
`close(timeout)` stores what it can within its bound, syncs the journal, counts what is in neither as lost
and returns a `LedgerClose` that says so.

The writer is here; the journal file and its replay are in store/ledger_journal.py, a batch's write in
store/ledger_batch.py, the counts and the stop's report in store/ledger_counts.py, the rollups in
store/rollup.py. The names callers use stay importable from here.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import queue
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from store.db import BUSY_TIMEOUT_MS, Store, StoreError
from store.ledger_batch import sanitize, store_wide, write_rows
from store.ledger_counts import LedgerClose, LedgerCounts
from store.ledger_journal import (JournalContents, JournalFile, Replayed, journal_backlog, journal_path, journal_paths,
                                  read_journal, replay_journal)
from store.ledger_row import LedgerRow
from store.rollup import CONFIDENCE_BINS, LATENCY_BUCKETS_MS, confidence_bin, latency_bucket, put_rollups

# Names callers import from here (the proxy, the demo, tests and benchmarks): the ledger's public face.
__all__ = ["CONFIDENCE_BINS", "LATENCY_BUCKETS_MS", "MAX_PENDING", "JournalContents", "LedgerClose", "LedgerCounts",
           "LedgerRow", "LedgerWriter", "confidence_bin", "journal_backlog", "journal_path", "journal_paths",
           "latency_bucket", "put_rollups", "read_journal", "sanitize", "write_rows"]

MAX_PENDING = 1_000_000  # rows held in memory while the store cannot be written; the journal keeps the rest
log = logging.getLogger("fleetdeck.ledger")


def writer_lock_path(store: Store) -> Path:
    """Beside the store, whatever `journal_dir` says: one writer per store, however each is configured."""
    return Path(f"{store.path}-ledger.lock")


def take_writer_lock(store: Store) -> int:
    """Hold the store's ledger-writer lock for the writer's life (the descriptor; closing it releases the lock,
    as does the process's end, SIGKILL included). A second writer on one store, another proxy on the same
    default store say, would replay the first's journal while its rows are still on their way (both then
    store them: the rollups count them twice) and cut the journal under the other's unstored rows; so it is
    refused with one line (StoreError) naming the process that holds the lock."""
    path = writer_lock_path(store)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise StoreError(f"cannot take the ledger's writer lock {path}: {exc.strerror or exc}") from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise StoreError(f"the ledger's writer lock {path} is not a regular file: remove it (fleetdeck makes it)")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            by = f" (process {holder})" if holder.isdigit() else ""
            raise StoreError(f"the ledger of {store.path} is written by another fleetdeck proxy{by}: one proxy per "
                             "store (each would replay and cut the other's journal, and count its rows twice); "
                             "give this one its own --store") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


@dataclass(slots=True)
class _Held:
    row: LedgerRow
    offset: int  # the journal's logical offset just past this row's line: a cut there or later removes it
    journaled: bool  # its whole line is in the journal file
    earlier: bool = False  # read from an earlier run's journal, not recorded by this run


MIN_CLOSE_ATTEMPT_S = 1.0  # the last store attempt at a stop gets this long even when the grace is spent


class LedgerWriter:
    """A journal, a queue and one thread that writes it in batches. Thread-safe `put`; `close` flushes.

    Every row this run recorded is counted in exactly one of: stored, journaled (its whole line is in the
    journal), unjournaled (memory only), lost; `counts()` reads them, `close()` settles the last two."""

    def __init__(
        self,
        store: Store,
        batch_size: int = 1000,
        flush_every_s: float = 0.25,
        retention_days: float = 30.0,
        prune_every_s: float = 3600.0,
        retry_every_s: float = 2.0,
        journal_dir: Path | None = None,
    ) -> None:
        self.store = store
        self.batch_size = batch_size
        self.flush_every_s = flush_every_s
        self.retention_s = retention_days * 86400.0
        self.prune_every_s = prune_every_s
        self.retry_every_s = retry_every_s
        self._q: queue.SimpleQueue[_Held | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="ledger-writer", daemon=True)
        self._last_prune = 0.0
        self._pending: list[_Held] = []  # rows the store refused, oldest first
        self._inflight: list[_Held] = []  # rows the writer is trying to store right now
        # One lock for the journal's state and the counts: `put` (the event loop) and the writer thread.
        self._lock = threading.Lock()
        self.recorded = 0
        self.written = 0  # rows of this run stored
        self.sanitized = 0
        self.replayed = 0
        self.lost = 0
        self._journaled = 0
        self._unjournaled = 0
        self._earlier_held = 0
        self.unreadable = 0
        self.write_failures = 0
        self.last_error: str | None = None  # why the store does not take rows now
        self.prune_error: str | None = None
        self._lost_why: dict[str, int] = {}  # rows counted lost before the close, by why
        self._unstorable: dict[str, str] = {}  # ids `_store_rows` gave up on, and why: settled by its caller
        self._others_kept = False  # a journal where an earlier configuration put it still holds waiting rows
        self._prune_held = False  # pruning is held back (`_journal_holds_stored_rows`): said once
        self._closed = False
        self._abandoned = False  # the close's bound passed while a store write ran: the writer stores no more
        self._report: LedgerClose | None = None
        self._writer_fd: int | None = take_writer_lock(store)  # one writer per store; raises StoreError
        # The journal shares the lock: a row's line and its count move together.
        self._jf = JournalFile(journal_path(store, journal_dir), self._lock)
        self._others = journal_paths(store, journal_dir)[1:]
        if journal_dir is not None:
            try:
                # Made 0700 when missing; one that exists is the operator's (the proxy's start checked it).
                Path(journal_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
            except OSError as exc:
                self._jf.failed(f"cannot make the journal folder {journal_dir}: {exc}")
        try:
            self._replay()
            for other in self._others:
                self._replay_other(other)
        except BaseException:
            # A start that failed (the store unreadable under the replay) holds nothing: not the journal, not
            # the store's writer lock, which a later writer in this process would otherwise meet as "another".
            self._jf.close()
            fd, self._writer_fd = self._writer_fd, None
            if fd is not None:
                os.close(fd)
            raise
        self._thread.start()

    # -- the journal ----------------------------------------------------------------------------
    @property
    def journal(self) -> Path:
        return self._jf.path

    @property
    def journal_failures(self) -> int:
        return self._jf.failures

    @property
    def journal_error(self) -> str | None:
        return self._jf.error

    def _replay(self) -> None:
        """Rows a killed writer journaled but never stored: write each once, then start a fresh journal."""
        path = self._jf.path
        try:
            found = replay_journal(path, self.store, self._store_rows)
        except OSError as exc:
            if exc.errno == errno.ELOOP and self._drop_link(path):
                self._jf.open_or_fail()
                return
            # Unreadable now, maybe readable later: keep it whole (never cut it) and append after it.
            log.error("cannot read the ledger journal %s: %s; it is kept for the next start", path, exc)
            self._jf.pinned = True
            self._jf.open_or_fail()
            return
        self._note_replayed(path, found)
        if found.waiting:
            # The store still refuses: keep the journal as it is and hold the rest for retry.
            self._pending = [_Held(r, 0, True, earlier=True) for r in found.waiting]
            self._earlier_held = len(self._pending)
            self._jf.open_or_fail(found.torn_tail, pin=True)
            return
        try:
            if path.exists() or path.is_symlink():
                path.unlink()
        except OSError as exc:
            # Its rows are all in the store now: appending after them is safe (a replay skips stored ids).
            log.warning("ledger journal %s replayed but not removed (%s); new rows are appended to it", path, exc)
        self._jf.open_or_fail()

    @staticmethod
    def _drop_link(path: Path) -> bool:
        """A symbolic link at the journal's name is no journal fleetdeck wrote (it writes through none, and
        reading through one could read another store's journal, a FIFO or a device): the link goes, so this run
        has a journal of its own; what it pointed to is left untouched."""
        try:
            target = os.readlink(path)
            path.unlink()
        except OSError:
            return False
        log.error("ledger journal %s was a symbolic link (to %s): removed, unread; %s itself is left as it is",
                  path, target, target)
        return True

    def _replay_other(self, path: Path) -> None:
        """A journal left where an earlier configuration put it: stored and removed, or left for next time."""
        try:
            if not path.exists():
                return
            found = replay_journal(path, self.store, self._store_rows)
        except OSError as exc:
            log.error("cannot read the ledger journal %s: %s; it is kept for the next start", path, exc)
            self._others_kept = True
            return
        self._note_replayed(path, found)
        if found.waiting:
            # The rest waits in that file (the ids stored now are skipped when it is read again).
            log.error("ledger: %d row(s) in the journal %s wait for the store; kept for the next start",
                      len(found.waiting), path)
            self._others_kept = True
            return
        try:
            path.unlink()
        except OSError:
            pass

    def _note_replayed(self, path: Path, found: Replayed) -> None:
        given_up = len(self._unstorable)  # rows of that journal the store can never take (said as they went)
        self._unstorable.clear()
        stored = found.stored - given_up
        self.replayed += stored
        if stored:
            log.warning("ledger: %d row(s) from the journal %s of an earlier run written to the store",
                        stored, path)
        self.unreadable += given_up
        if found.unreadable:
            self.unreadable += found.unreadable
            log.warning("ledger journal %s: %d line(s) that are not a row skipped (a line torn by a full disk or "
                        "a crash mid-write: that row was counted lost when it was written)", path, found.unreadable)

    # -- the writer -----------------------------------------------------------------------------
    def put(self, row: LedgerRow) -> None:
        with self._lock:
            self.recorded += 1
            if self._closed:
                # Recorded after the stop's reckoning (a request cut by a forced exit): said, never silent.
                self._lose_locked(1, "recorded after the ledger closed")
                log.error("ledger row %s recorded after the ledger closed: lost", row.id)
                return
            offset, journaled = self._jf.append(row)
            if journaled:
                self._journaled += 1
            else:
                self._unjournaled += 1
            self._q.put(_Held(row, offset, journaled))

    @property
    def pending(self) -> int:
        """Rows held in memory until the store takes them (those being written right now included)."""
        with self._lock:
            return len(self._pending) + len(self._inflight)

    def counts(self) -> LedgerCounts:
        with self._lock:
            return LedgerCounts(self.recorded, self.written, self._journaled, self._unjournaled, self.lost,
                                len(self._pending) + len(self._inflight), self.replayed, self._earlier_held,
                                self.unreadable)

    def _run(self) -> None:
        while True:
            try:
                first = self._q.get(timeout=self.retry_every_s if self._pending else 1.0)
            except queue.Empty:
                if self._pending:
                    self._write([])
                self._maybe_prune()
                continue
            # Let rows gather for a moment: one transaction per batch, not per request, and no
            # wake-up of this thread (and its GIL) for every row the proxy queues.
            if first is not None:
                time.sleep(self.flush_every_s)
            batch: list[_Held] = [] if first is None else [first]
            stop = first is None
            while True:
                try:
                    item = self._q.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    continue
                batch.append(item)
                if len(batch) >= self.batch_size:
                    self._write(batch)
                    batch = []
            if batch or self._pending:
                self._write(batch)
            self._maybe_prune()
            if stop:
                return

    def _write(self, batch: list[_Held]) -> bool:
        """Pending rows first, then the batch; True when all of them are in the store."""
        with self._lock:
            items = self._pending + batch
            if self._abandoned:  # the close has counted these rows already: they stay where it said
                self._pending = items
                return False
            self._pending, self._inflight = [], items
        if not items:
            return True
        done = self._store_rows([h.row for h in items])
        ok = done == len(items)
        with self._lock:
            self._inflight = []
            for h in items[:done]:
                why = self._unstorable.pop(h.row.id, None)
                if why is None:
                    self._settle_stored(h)
                else:
                    self._settle_unstorable(h, why)
            if done:
                self._jf.cut(items[done - 1].offset)
            if not ok:
                self._pending = items[done:]
                if len(self._pending) > MAX_PENDING:
                    self._drop_locked(len(self._pending) - MAX_PENDING)
        if ok:
            if self.last_error is not None:
                log.warning("ledger writes work again: %d held row(s) stored", len(items))
            self.last_error = None
        else:
            self._jf.sync()  # the held rows live in the journal now: make it durable
        return ok

    def _settle_stored(self, h: _Held) -> None:
        if h.earlier:
            self.replayed += 1
            self._earlier_held -= 1
            return
        self.written += 1
        if h.journaled:
            self._journaled -= 1
        else:
            self._unjournaled -= 1

    def _settle_unstorable(self, h: _Held, why: str) -> None:
        """A row the store can never take: this run's is counted lost (with why); an earlier run's, which this
        run never recorded, is counted with the journal's lines that were not rows."""
        if h.earlier:
            self._earlier_held -= 1
            self.unreadable += 1
            return
        if h.journaled:
            self._journaled -= 1
        else:
            self._unjournaled -= 1
        self._lose_locked(1, f"could not be stored even with its fields made safe ({why})")

    def _drop_locked(self, n: int) -> None:
        """Past MAX_PENDING the oldest rows leave memory: a journaled one waits in the journal (which is then
        never cut this run, so the next start stores it); one that is not is lost, and counted."""
        dropped, self._pending = self._pending[:n], self._pending[n:]
        gone = 0
        for h in dropped:
            if h.journaled:
                self._jf.pinned = True
            else:
                self._unjournaled -= 1
                gone += 1
        if gone:
            self._lose_locked(gone, f"dropped from memory past {MAX_PENDING} held rows, and not journaled")
        log.error("ledger: %d row(s) dropped from memory; %d of them are in the journal %s for the next start, "
                  "%d lost", n, n - gone, self._jf.path, gone)

    def _lose_locked(self, n: int, why: str) -> None:
        self.lost += n
        self._lost_why[why] = self._lost_why.get(why, 0) + n

    def _store_rows(self, rows: list[LedgerRow]) -> int:
        """Store the rows in order; how many of the first ones are done with: in the store, or given up as
        unstorable (their ids in `_unstorable`); all, or up to a failure of the store itself. A row stored is
        never sent again: its rollups would be counted twice."""
        try:
            write_rows(self.store, rows)
            return len(rows)
        except Exception as exc:
            if store_wide(exc):
                self._failed(exc, len(rows))
                return 0
        # One row's values: store the others as they are, and that one made safe.
        for i, row in enumerate(rows):
            try:
                write_rows(self.store, [row])
            except Exception as exc:
                if store_wide(exc):
                    self._failed(exc, len(rows) - i)
                    return i
                try:
                    write_rows(self.store, [sanitize(row)])
                    self.sanitized += 1
                    log.warning("ledger row %s stored with unstorable fields made safe (%s)", row.id, type(exc).__name__)
                except Exception as exc2:
                    if store_wide(exc2):
                        self._failed(exc2, len(rows) - i)
                        return i
                    # Not even made safe (a time or status that is not a number): held, it would stop every row
                    # queued after it on every retry. It is given up, counted and said (`_settle`).
                    self._unstorable[row.id] = f"{type(exc2).__name__}: {exc2}"
                    log.error("ledger row %s cannot be stored even with its fields made safe (%s): given up",
                              row.id, exc2)
        return len(rows)

    def _failed(self, exc: BaseException, n: int) -> None:
        self.write_failures += 1
        if self.last_error is None:
            log.error("ledger write failed (%s); %d row(s) held and retried every %g s", exc, n, self.retry_every_s)
        self.last_error = f"ledger write failed: {exc}"

    def _journal_holds_stored_rows(self) -> bool:
        """Whether a journal the next start replays may hold rows that are in the store: pinned (rows dropped
        from memory wait in it, after and among stored ones), a cut that failed, an earlier run's journal not
        yet stored whole, or one where an earlier configuration put it kept with rows waiting. The replay
        skips a row whose id the store has; a row pruned meanwhile it would store, and count, again."""
        with self._lock:
            return self._jf.pinned or self._jf.stale or self._earlier_held > 0 or self._others_kept

    def _maybe_prune(self) -> None:
        now = time.time()
        if self._abandoned or now - self._last_prune < self.prune_every_s:
            return
        self._last_prune = now
        if self._journal_holds_stored_rows():
            # Raw rows are kept past the retention until the journal is replayed (the next start prunes them):
            # pruned now, they would come back from the journal and be added to the rollups a second time.
            if not self._prune_held:
                log.warning("ledger: raw rows are not pruned while the journal %s holds rows that are in the "
                            "store; the next start replays it and prunes", self._jf.path)
            self._prune_held = True
            return
        self._prune_held = False
        try:
            with self.store.transaction() as conn:
                conn.execute("DELETE FROM requests WHERE ts < ?", (now - self.retention_s,))
        except Exception as exc:
            # Apart from `last_error`: that one says why rows are not stored, and is logged when it starts.
            if self.prune_error is None:
                log.error("ledger pruning failed: %s", exc)
            self.prune_error = f"ledger pruning failed: {exc}"
        else:
            self.prune_error = None

    def close(self, timeout: float = 30.0) -> LedgerClose:
        """Store what is queued, retrying a failing store until `timeout` (a bound on the whole close, past one
        last attempt); then settle every row not stored: journaled (the journal synced to disk) or lost."""
        if self._report is not None:
            return self._report
        deadline = time.monotonic() + max(0.0, timeout)
        with self._lock:
            self._closed = True
            self._q.put(None)
        self._thread.join(max(deadline - time.monotonic(), MIN_CLOSE_ATTEMPT_S))
        if self._thread.is_alive():
            # Its store write outlived the bound (a store locked by another process, a hung disk): stop it.
            log.error("ledger: the store write still runs at the stop's bound; interrupting it")
            with self._lock:
                self._abandoned = True
            try:
                self.store.conn.interrupt()
            except Exception:
                pass
            # The interrupt does not cut SQLite's wait for another process's lock; that wait has its own bound.
            self._thread.join(BUSY_TIMEOUT_MS / 1000 + MIN_CLOSE_ATTEMPT_S)
        if not self._thread.is_alive():
            while self._pending and time.monotonic() < deadline:
                time.sleep(max(0.0, min(self.retry_every_s, 0.5, deadline - time.monotonic())))
                if self._write([]):
                    break
        held_in_journal = self._journaled or self._earlier_held
        durable = self._jf.sync() if held_in_journal else self._jf.durable
        notes: list[str] = []
        with self._lock:
            if self._inflight:
                notes.append(f"{len(self._inflight)} row(s) were still being written to the store when the stop ended "
                             "(a hung disk): they may be in the store too; the next start stores each at most once")
            why = [f"{n} {reason}" for reason, n in self._lost_why.items()]
            if self._unjournaled:
                why.append(f"{self._unjournaled} not stored ({self.last_error or 'the store write did not finish'}) "
                           f"and not journaled ({self._jf.append_error or self._jf.error or 'no journal'})")
                self.lost += self._unjournaled
                self._unjournaled = 0
            if self._journaled and not durable:
                why.append(f"{self._journaled} not stored ({self.last_error or 'the store write did not finish'}) "
                           f"and the journal could not be synced to disk ({self._jf.fsync_error}; what it still "
                           "holds is stored at the next start)")
                self.lost += self._journaled
                self._journaled = 0
            self._jf.close()
            fd, self._writer_fd = self._writer_fd, None
            if fd is not None:
                os.close(fd)  # the next writer of this store may start (and replay what the journal holds)
            counts = LedgerCounts(self.recorded, self.written, self._journaled, self._unjournaled, self.lost,
                                  len(self._pending) + len(self._inflight), self.replayed, self._earlier_held,
                                  self.unreadable)
        try:
            path = self.journal
            if not held_in_journal and not self._jf.pinned and path.exists() and path.stat().st_size == 0:
                path.unlink()
        except OSError:
            pass
        self._report = LedgerClose(counts, self.journal, tuple(why), tuple(notes))
        level = logging.ERROR if counts.lost else logging.WARNING if counts.journaled or counts.earlier_held else logging.INFO
        log.log(level, "ledger at the stop: %s", self._report.summary())
        return self._report
