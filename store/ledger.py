"""The request ledger: rows queued by the proxy, written in batches by one thread, rolled up per minute.

The proxy's request path appends each row to a journal (one JSON line, a plain write: it survives
SIGKILL, not a power cut) beside the store or in `[proxy] journal_dir`, and to a queue. The writer thread
wakes on the first queued row, lets rows gather for `flush_every_s`, then writes them in batches: inserts
the raw rows and folds them into the per-minute rollups in one transaction. The journal is cut once no row
of it is in memory; one that cannot be (rows dropped from memory wait only in it, or traffic never lets it
empty) is sealed as a part beside it, read back by id once the store takes rows, and removed
(store/ledger_journal.py).

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
from store.ledger_journal import (RETRY_S, JournalContents, JournalFile, Replayed, Sealed, journal_backlog, journal_files,
                                  journal_path, journal_paths, next_part, read_journal, replay_journal, sealed_parts,
                                  write_journal_note)
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
    gen: int  # the journal generation (file) its line is in
    journaled: bool  # its whole line is in the journal file
    earlier: bool = False  # read from an earlier run's journal, not recorded by this run


ALL_EARLIER = 2**62  # a part's `earlier_end` when every line of it is an earlier run's


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
        self._given_up: set[str] = set()  # this run's rows given up as unstorable: a read-back never stores them
        self._start_ids: set[str] = set()  # rows the start holds in memory: one read from two files is held once
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
            kept = [other for other in self._others if self._replay_other(other)]
            write_journal_note(store, [self._jf.path, *kept])
            self._start_ids.clear()
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
        """Rows a killed writer journaled but never stored, in the sealed parts and then the live file: write
        each once, then start a fresh journal. A file whose rows the store still refuses is kept, and its rows
        held for retry like this run's."""
        for part in sealed_parts(self._jf.path):
            self._replay_part(part)
        self._replay_live()

    def _hold_earlier(self, rows: list[LedgerRow], gen: int) -> None:
        rows = [r for r in rows if r.id not in self._start_ids]
        self._start_ids.update(r.id for r in rows)
        self._pending += [_Held(r, gen, True, earlier=True) for r in rows]
        self._earlier_held += len(rows)
        self._jf.held(gen, len(rows))

    def _replay_part(self, part: Path) -> None:
        """A sealed part an earlier run left (killed before it was read back or removed)."""
        jf = self._jf
        try:
            found = replay_journal(part, self.store, self._store_rows, skip=self._start_ids)
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # a link at a part's name: fleetdeck makes none, and reads through none
                self._drop_link(part)
                return
            if exc.errno == errno.EINVAL:  # a FIFO or a device: never read, left as it is, holding nothing up
                log.error("ledger journal part %s: %s; it is left as it is", part, exc.strerror or exc)
                return
            gen = jf.new_gen()
            log.error("cannot read the ledger journal part %s: %s; tried again later, and kept for the next start",
                      part, exc)
            jf.sealed[gen] = Sealed(part, ALL_EARLIER, counted=False, retry_at=time.monotonic() + RETRY_S)
            jf.orphan_file(gen)
            return
        if found.rows == 0 and found.unreadable:
            # Lines and no row: no part fleetdeck wrote (a file an operator named so; a journal part holds at
            # least one whole row, or nothing). Never removed, never counted: left as it is.
            log.error("ledger journal part %s holds no ledger row (%d line(s) that are not rows): it is not read as "
                      "a journal and is left as it is", part, found.unreadable)
            return
        self._note_replayed(part, found)
        if not found.waiting:
            try:
                part.unlink(missing_ok=True)
                return
            except OSError:
                pass  # the writer tries again (`_tidy`)
        gen = jf.new_gen()
        jf.sealed[gen] = Sealed(part, ALL_EARLIER)  # removed by the writer once no row of it is in memory
        if found.waiting:
            self._hold_earlier(found.waiting, gen)

    def _replay_live(self) -> None:
        jf = self._jf
        path = jf.path
        try:
            found = replay_journal(path, self.store, self._store_rows, skip=self._start_ids)
        except OSError as exc:
            if exc.errno == errno.ELOOP and self._drop_link(path):
                jf.open_or_fail()
                return
            if exc.errno == errno.EINVAL:  # a FIFO, a device or a socket at the name: left alone, never read
                log.error("ledger journal %s: %s; it is left as it is", path, exc.strerror or exc)
                jf.open_or_fail()
                return
            self._set_aside(path, exc)
            return
        self._note_replayed(path, found)
        if found.waiting:
            # The store still refuses: keep the journal as it is (appended to) and hold the rest for retry.
            self._hold_earlier(found.waiting, jf.gen)
            if jf.open_or_fail(found.torn_tail):
                jf.earlier_end = jf.end
            else:
                jf.stale = True  # its rows, once stored, stay in it: no pruning while it is there
            return
        try:
            if path.exists() or path.is_symlink():
                path.unlink()
        except OSError as exc:
            # Its rows are all in the store now: appending after them is safe (a replay skips stored ids).
            log.warning("ledger journal %s replayed but not removed (%s); new rows are appended to it", path, exc)
        jf.open_or_fail()

    def _set_aside(self, path: Path, exc: OSError) -> None:
        """A journal that cannot be read now (an I/O error, a permission) may be readable later: it is renamed
        to a sealed part, read again now and then and at the next start, and this run gets a fresh journal
        that is cut as usual. Before, the run appended to it and never cut it."""
        jf = self._jf
        part, _ = next_part(path)
        try:
            os.rename(path, part)
        except OSError as exc2:
            log.error("cannot read the ledger journal %s (%s) nor set it aside (%s); it is kept for the next start "
                      "and this run's rows are appended to it", path, exc, exc2)
            if jf.open_or_fail():
                jf.earlier_end, jf.earlier_counted = jf.end, False
            jf.orphan_file(jf.gen)
            return
        log.error("cannot read the ledger journal %s: %s; set aside as %s, read again later and at the next start",
                  path, exc, part.name)
        gen = jf.new_gen()
        jf.sealed[gen] = Sealed(part, ALL_EARLIER, counted=False, retry_at=time.monotonic() + RETRY_S)
        jf.orphan_file(gen)
        jf.open_or_fail()

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

    def _replay_other(self, journal: Path) -> bool:
        """A journal left where an earlier configuration put it (and its parts): stored and removed, or left for
        next time (True: some of it is kept)."""
        kept = False
        for path in journal_files(journal):
            kept = self._replay_other_file(path) or kept
        return kept

    def _replay_other_file(self, path: Path) -> bool:
        try:
            if not path.exists():
                return False
            found = replay_journal(path, self.store, self._store_rows, skip=self._start_ids)
        except OSError as exc:
            log.error("cannot read the ledger journal %s: %s; it is kept for the next start", path, exc)
            self._others_kept = True
            return True
        self._note_replayed(path, found)
        if found.waiting:
            # The rest waits in that file (the ids stored now are skipped when it is read again).
            log.error("ledger: %d row(s) in the journal %s wait for the store; kept for the next start",
                      len(found.waiting), path)
            self._others_kept = True
            return True
        try:
            path.unlink()
        except OSError:
            pass
        return False

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
            gen, journaled = self._jf.append(row)
            if journaled:
                self._journaled += 1
            else:
                self._unjournaled += 1
            self._q.put(_Held(row, gen, journaled))

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
                else:
                    self._tidy()  # a part whose read-back failed is retried at its time, traffic or not
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
                    if self._write(batch):
                        self._tidy()
                    batch = []
            if (batch or self._pending) and self._write(batch):
                self._tidy()
            elif stop and not self._pending and self.last_error is None:
                self._tidy()  # the stop reads back what it can, so the next start has less to read
            self._maybe_prune()
            if stop:
                return

    def _write(self, batch: list[_Held]) -> bool:
        """Pending rows first, then the batch; True when all of them are in the store."""
        self._keep_named()
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
                self._jf.cut()
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
        if h.journaled:
            self._jf.settle(h.gen)
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
        if h.journaled:
            self._jf.settle(h.gen)
        if h.earlier:
            self._earlier_held -= 1
            self.unreadable += 1
            return
        if h.journaled:
            self._journaled -= 1
        else:
            self._unjournaled -= 1
        self._given_up.add(h.row.id)
        self._lose_locked(1, f"could not be stored even with its fields made safe ({why})")

    def _drop_locked(self, n: int) -> None:
        """Past MAX_PENDING the oldest rows leave memory: a journaled one waits in the journal (its file is then
        not cut but sealed, and read back once the store takes rows: `_tidy`); one that is not is lost, and
        counted."""
        dropped, self._pending = self._pending[:n], self._pending[n:]
        gone = 0
        for h in dropped:
            if h.journaled:
                self._jf.orphan(h.gen)
            else:
                self._unjournaled -= 1
                gone += 1
        if gone:
            self._lose_locked(gone, f"dropped from memory past {MAX_PENDING} held rows, and not journaled")
        log.error("ledger: %d row(s) dropped from memory; %d of them wait in the journal %s (stored once the store "
                  "takes rows again, or at the next start), %d lost", n, n - gone, self._jf.path, gone)

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

    # -- cutting the journal: sealed parts -----------------------------------------------------------
    def _tidy(self) -> None:
        """With the store taking rows: set the live journal aside when it cannot be cut (it holds rows dropped
        from memory, a cut failed, or steady traffic grew it past SEAL_BYTES), then read back and remove each
        sealed part no row in memory belongs to. Only the writer thread runs this (and touches `sealed`)."""
        jf = self._jf
        now = time.monotonic()
        self._keep_named()
        with self._lock:
            if self._abandoned:
                return
            jf.reopen(now)
            fd = jf.seal(now) if jf.wants_seal(now) else None
        if fd is not None:
            jf.finish_seal(fd)
        for gen in sorted(jf.sealed):
            part = jf.sealed[gen]
            with self._lock:
                busy = jf.in_memory(gen) > 0
                orphaned = jf.is_orphaned(gen)
            if busy or now < part.retry_at:
                continue
            if orphaned and not self._read_back(part, now):
                continue
            try:
                part.path.unlink(missing_ok=True)
            except OSError as exc:
                log.error("ledger journal part %s is all in the store but cannot be removed (%s); tried again later",
                          part.path, exc)
                part.retry_at = now + RETRY_S
                continue
            with self._lock:
                jf.forget(gen)

    def _keep_named(self) -> None:
        """A journal removed (or replaced) under the running proxy, by an operator cleaning up say, is copied
        back as a part and a new one started: rows written to a file with no name would be in no file once it is
        closed, and the stop line would name a journal that is not there. Checked before every store attempt."""
        with self._lock:
            if self._abandoned:
                return
            rescued = self._jf.rescue(time.monotonic()) if self._jf.lost_its_name() else None
        if rescued is not None:
            self._jf.finish_rescue(*rescued)

    def _read_back(self, part: Sealed, now: float) -> bool:
        """Store the rows only a sealed part holds (by id: what is in the store is skipped, and so is a row this
        run gave up on); True when all of them are in the store. Each row moves from journaled (or an earlier
        run's held) to stored, in the counts."""
        try:
            found = replay_journal(part.path, self.store, self._store_rows, part.earlier_end, skip=self._given_up)
        except OSError as exc:
            if not part.said and part.counted:  # (one the start could not read was said then)
                log.error("cannot read the ledger journal part %s: %s; tried again every %g s, and kept for the "
                          "next start", part.path, exc, RETRY_S)
            part.said = True
            part.retry_at = now + RETRY_S
            return False
        with self._lock:
            given_up = dict(self._unstorable)
            self._unstorable.clear()
            earlier_given_up = sum(1 for i in given_up if i in found.earlier)
            mine_given_up = len(given_up) - earlier_given_up
            stored_earlier = found.stored_earlier - earlier_given_up
            mine = found.stored - found.stored_earlier - mine_given_up
            self.written += mine
            self._journaled -= mine + mine_given_up
            for why in given_up.values():
                if mine_given_up:
                    self._lose_locked(1, f"could not be stored even with its fields made safe ({why})")
                    mine_given_up -= 1
            self.replayed += stored_earlier
            self.unreadable += earlier_given_up
            if part.counted:
                self._earlier_held -= stored_earlier + earlier_given_up
            else:
                # First read of a part the start could not read: its lines that are no row are counted now, and
                # its earlier rows the store refuses from now on wait as any earlier run's rows do.
                self.unreadable += found.unreadable_earlier
                self._earlier_held += sum(1 for r in found.waiting if r.id in found.earlier)
                part.counted = True
        if found.stored:
            log.warning("ledger: %d row(s) that waited in the journal part %s stored", found.stored - len(given_up),
                        part.path)
        if found.waiting:
            # The store failed half-way: the part is read again later (not every retry: it can be large).
            part.retry_at = now + max(RETRY_S, self.retry_every_s)
            return False
        if self.last_error is not None and not self.pending:
            log.warning("ledger writes work again: the journal part %s is stored", part.path)
            self.last_error = None
        return True

    def _prune_hold(self) -> str | None:
        """Why raw rows may not be pruned now, or None. A journal the next start replays may hold rows that are
        in the store: the replay skips a row whose id the store has, but a row pruned meanwhile it would store,
        and count, again. "transient": a sealed part whose rows are on their way to the store (removed in a
        moment); any other answer holds pruning until it is resolved, said once."""
        with self._lock:
            jf = self._jf
            if jf.pinned or jf.stale or self._others_kept or self._earlier_held > 0:
                return "held"
            if any(jf.is_orphaned(g) for g in jf.sealed):
                return "held"
            return "transient" if jf.sealed else None

    def _journal_holds_stored_rows(self) -> bool:
        """Whether a journal the next start replays may hold rows that are in the store (`_prune_hold`)."""
        return self._prune_hold() is not None

    def _maybe_prune(self) -> None:
        now = time.time()
        if self._abandoned or now - self._last_prune < self.prune_every_s:
            return
        hold = self._prune_hold()
        if hold == "transient":
            return  # tried again on the next round, once the part is gone
        self._last_prune = now
        if hold is not None:
            # Raw rows are kept past the retention until the journal is read back (here, or at the next start):
            # pruned now, they would come back from the journal and be added to the rollups a second time.
            if not self._prune_held:
                log.warning("ledger: raw rows are not pruned while the journal %s holds rows that are in the "
                            "store; they are pruned once it is read back (or at the next start)", self._jf.path)
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
            parts = [p.path.name for p in self._jf.sealed.values()]
            if parts:
                notes.append(f"{len(parts)} sealed part(s) of the journal beside it ({', '.join(parts[:3])}"
                             f"{', ...' if len(parts) > 3 else ''}) are read at the next start too")
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
