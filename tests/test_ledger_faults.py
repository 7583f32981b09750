"""The ledger under faults: every row the proxy recorded is stored, durably journaled, or counted lost, and
what the writer says (counts, /metrics, /health, the stop line) is what happened.

Two levels: the journal writer with os.write/os.ftruncate/os.fsync made to fail for the journal's file only
(short writes, ENOSPC, EIO), and the real `fleetdeck proxy` over HTTP with its store and journal on real
size-limited filesystems (tmpfs), filled, stopped with SIGTERM and started again.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from unittest.mock import patch

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from store.db import open_store
from store.ledger import LedgerRow, LedgerWriter, journal_path, read_journal
from tests.helpers import kill_a_writer_with_queued_rows, wait_for
from tests.proxy_helpers import ProxyProcess, fill, free_port, router_toml, tmpfs

ROOT = Path(__file__).resolve().parents[1]


def row(i: int, **kw: Any) -> LedgerRow:
    base = dict(id=f"r{i}", ts=time.time(), task="t", route="slm", escalated=False, reason="confident", status=200,
                confidence=0.9, latency_ms=3.0)
    base.update(kw)
    return LedgerRow(**base)  # type: ignore[arg-type]


def cap_store(store) -> None:
    """The store refuses every write from here on (this connection only), as a full or failing disk does."""
    store.execute("PRAGMA query_only = ON")


def uncap_store(store) -> None:
    store.execute("PRAGMA query_only = OFF")


def stored_ids(db: Path) -> set[str]:
    store = open_store(db)
    try:
        return {r["id"] for r in store.query("SELECT id FROM requests")}
    finally:
        store.close()


def restart(db: Path, **kw: Any) -> LedgerWriter:
    """A new writer on the same store (what the next proxy start does), closed at once."""
    store = open_store(db)
    writer = LedgerWriter(store, **kw)
    writer.close(5)
    store.close()
    return writer


def balanced(writer: LedgerWriter) -> bool:
    c = writer.counts()
    return c.recorded == c.stored + c.journaled + c.unjournaled + c.lost


# --- the journal writer, faults injected for the journal's file descriptor only ---------------------------
def test_a_short_write_is_cut_back_and_that_row_counted_not_journaled(tmp_path, monkeypatch):
    db = tmp_path / "fd.db"
    store = open_store(db)
    cap_store(store)  # nothing reaches the store this run: every row must be journaled or counted lost
    writer = LedgerWriter(store, flush_every_s=0.01, retry_every_s=0.05)
    real_write = os.write
    calls = {"n": 0}

    def short_then_full(fd: int, data: bytes) -> int:
        if fd == writer._jf.fd:
            calls["n"] += 1
            if calls["n"] == 7:
                return real_write(fd, data[: len(data) // 2])  # a full disk took half the line...
            if calls["n"] == 8:
                raise OSError(errno.ENOSPC, "No space left on device")  # ...and none of the rest
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", short_then_full)
    for i in range(20):
        writer.put(row(i))
    assert wait_for(lambda: writer.write_failures > 0)
    assert balanced(writer) and writer.counts().unjournaled == 1 and writer.journal_failures == 1
    report = writer.close(0)
    monkeypatch.undo()
    c = report.counts
    assert (c.recorded, c.stored, c.journaled, c.lost) == (20, 0, 19, 1)
    assert "1 not stored" in report.summary() and "write failed after" in report.summary()
    found = read_journal(journal_path(store))
    assert found.unreadable == 0 and not found.torn_tail  # the half line was cut back
    assert len(found.rows) == 19 and "r6" not in {r.id for r in found.rows}
    store.close()
    again = restart(db)
    assert again.replayed == 19 and again.unreadable == 0
    assert stored_ids(db) == {f"r{i}" for i in range(20)} - {"r6"}
    assert restart(db).replayed == 0  # replayed once, never twice


def test_a_torn_line_that_cannot_be_cut_back_takes_no_neighbour_with_it(tmp_path, monkeypatch):
    db = tmp_path / "fd.db"
    store = open_store(db)
    cap_store(store)
    writer = LedgerWriter(store, flush_every_s=0.01, retry_every_s=0.05)
    real_write, real_truncate = os.write, os.ftruncate
    calls = {"n": 0}

    def torn(fd: int, data: bytes) -> int:
        if fd == writer._jf.fd:
            calls["n"] += 1
            if calls["n"] == 4:
                return real_write(fd, data[:30])
            if calls["n"] == 5:
                raise OSError(errno.EIO, "Input/output error")
        return real_write(fd, data)

    def no_truncate(fd: int, length: int) -> None:
        if fd == writer._jf.fd:
            raise OSError(errno.EIO, "Input/output error")
        real_truncate(fd, length)

    monkeypatch.setattr(os, "write", torn)
    monkeypatch.setattr(os, "ftruncate", no_truncate)
    for i in range(10):
        writer.put(row(i))
    report = writer.close(0)
    monkeypatch.undo()
    assert (report.counts.journaled, report.counts.lost) == (9, 1)
    found = read_journal(journal_path(store))
    assert found.unreadable == 1 and len(found.rows) == 9  # the torn line is one line; the next starts anew
    store.close()
    again = restart(db)
    assert again.replayed == 9 and again.unreadable == 1
    assert len(stored_ids(db)) == 9
    assert restart(db).replayed == 0


def test_a_failed_fsync_means_the_journal_is_not_counted_as_keeping_anything(tmp_path, monkeypatch):
    db = tmp_path / "fd.db"
    store = open_store(db)
    cap_store(store)
    writer = LedgerWriter(store, flush_every_s=0.01, retry_every_s=0.05)
    real_fsync = os.fsync

    def failing_fsync(fd: int) -> None:
        if fd == writer._jf.fd:
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    for i in range(12):
        writer.put(row(i))
    # The store refuses, so the writer syncs the journal that now holds the rows: that fails, and says so.
    assert wait_for(lambda: writer.journal_error is not None and "fsync" in writer.journal_error)
    report = writer.close(0)
    monkeypatch.undo()
    assert (report.counts.stored, report.counts.journaled, report.counts.lost) == (0, 0, 12)
    assert "could not be synced to disk" in report.summary() and "Input/output error" in report.summary()
    store.close()
    # The lines may still be readable (the page cache kept them): then the next start stores them once.
    again = restart(db)
    assert again.replayed <= 12 and len(stored_ids(db)) == again.replayed


def test_rows_dropped_from_memory_are_stored_from_the_journal_once_the_store_takes_rows(tmp_path, monkeypatch, caplog):
    """Before: the 15 rows dropped from memory pinned the journal for the rest of the run (never cut, growing
    with every request, all of it read at the next start). Now the pinned journal is sealed as a part once the
    store takes rows again, the 15 are read back from it (by id: none twice) and the part removed; the live
    journal is cut again as rows are stored."""
    import store.ledger as ledger_module

    def dropped() -> int:
        return sum(int(m.group(1)) for r in list(caplog.records)
                   if (m := re.match(r"ledger: (\d+) row\(s\) dropped from memory", r.getMessage())))

    monkeypatch.setattr(ledger_module, "MAX_PENDING", 5)
    db = tmp_path / "fd.db"
    store = open_store(db)
    cap_store(store)
    writer = LedgerWriter(store, flush_every_s=0.01, retry_every_s=0.05)
    with caplog.at_level("ERROR", logger="fleetdeck.ledger"):
        for i in range(20):
            writer.put(row(i))
        assert wait_for(lambda: dropped() == 15 and writer.pending == 5)
    assert writer.counts().journaled == 20 and balanced(writer)
    uncap_store(store)  # space returns: the 5 in memory are stored, then the 15 that waited in the journal
    assert wait_for(lambda: writer.counts().stored == 20)
    assert balanced(writer) and writer.counts().journaled == 0
    for i in range(20, 30):  # the journal is cut again: it does not grow with every request for the rest of the run
        writer.put(row(i))
    assert wait_for(lambda: writer.counts().stored == 30 and writer.journal.stat().st_size == 0)
    assert [p.name for p in tmp_path.iterdir() if ".jsonl." in p.name] == []  # the sealed part is gone
    report = writer.close(5)
    assert (report.counts.stored, report.counts.journaled, report.counts.lost) == (30, 0, 0)
    assert store.execute("SELECT SUM(requests) FROM rollup_minute")[0][0] == 30
    store.close()
    assert restart(db).replayed == 0
    assert len(stored_ids(db)) == 30


def test_a_stop_on_a_full_store_is_bounded_and_says_where_every_row_is(tmp_path):
    store = open_store(tmp_path / "fd.db")
    cap_store(store)
    writer = LedgerWriter(store, flush_every_s=0.01, retry_every_s=0.05)
    for i in range(30):
        writer.put(row(i))
    report = writer.close(0.2)  # the store never comes back: the close gives up at its bound
    assert report.counts.journaled == 30 and report.counts.lost == 0
    assert "0 ledger row(s) stored this run, 30 held in the journal" in report.summary()
    writer.put(row(99))  # a row after the reckoning is counted, never silently dropped
    assert writer.counts().lost == 1 and writer.close() is report



# Any sequence of faults: the store refusing and coming back, journal writes failing at the first byte, short
# (cut back) or torn (the cut-back failing too), fsync failing; rows put in between.
FAULT = st.one_of(
    st.tuples(st.just("put"), st.integers(1, 6)),
    st.tuples(st.just("store_refuses"), st.booleans()),
    st.tuples(st.just("journal"), st.sampled_from(["ok", "enospc", "short", "torn"])),
    st.tuples(st.just("fsync_fails"), st.booleans()),
    st.tuples(st.just("settle"), st.just(0)),
    st.tuples(st.just("rm_journal"), st.just(0)),  # an operator removes the journal file under the writer
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(FAULT, min_size=1, max_size=14), max_pending=st.sampled_from([3, 1_000_000]),
       seal_bytes=st.sampled_from([600, 8 * 1024 * 1024]))
def test_whatever_fails_every_row_is_stored_journaled_or_counted_lost(tmp_path_factory, ops, max_pending, seal_bytes):
    """Faults in any order, with rows dropped from memory (MAX_PENDING 3), the journal sealed every row or two
    (SEAL_BYTES 600) and removed under the writer: every row is stored, journaled or counted lost, the counts
    always add up, and the next start stores what was journaled, once."""
    import store.ledger as ledger_module
    import store.ledger_journal as journal_module

    db = tmp_path_factory.mktemp("prop") / "fd.db"
    store = open_store(db)
    faults: dict[str, Any] = {"journal": "ok", "fsync_fails": False, "fsync_raised": False}
    real_write, real_truncate, real_fsync = os.write, os.ftruncate, os.fsync
    holder: dict[str, LedgerWriter] = {}

    def journal_fd(fd: int) -> bool:
        return "w" in holder and fd == holder["w"]._jf.fd

    def write(fd: int, data: bytes) -> int:
        mode = faults["journal"]
        if journal_fd(fd) and mode != "ok":
            if mode in ("short", "torn") and len(data) > 1:
                faults["journal"] = mode + "-rest"  # half the line fits, the rest does not
                return real_write(fd, data[: len(data) // 2])
            if mode.endswith("-rest"):
                faults["journal"] = mode[:-5]
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    def ftruncate(fd: int, length: int) -> None:
        if journal_fd(fd) and faults["journal"].startswith("torn"):
            raise OSError(errno.EIO, "Input/output error")
        real_truncate(fd, length)

    def fsync(fd: int) -> None:
        if journal_fd(fd) and faults["fsync_fails"]:
            faults["fsync_raised"] = True
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    with patch.object(os, "write", write), patch.object(os, "ftruncate", ftruncate), patch.object(os, "fsync", fsync), \
            patch.object(ledger_module, "MAX_PENDING", max_pending), patch.object(journal_module, "SEAL_BYTES", seal_bytes):
        writer = holder["w"] = LedgerWriter(store, flush_every_s=0.005, retry_every_s=0.01)
        n = 0
        for op, arg in ops:
            if op == "put":
                for _ in range(int(arg)):
                    writer.put(row(n))
                    n += 1
            elif op == "store_refuses":
                store.execute(f"PRAGMA query_only = {'ON' if arg else 'OFF'}")
            elif op == "journal":
                faults["journal"] = str(arg)
            elif op == "fsync_fails":
                faults["fsync_fails"] = bool(arg)
            elif op == "rm_journal":
                writer.journal.unlink(missing_ok=True)
            else:
                wait_for(lambda: writer._q.empty(), timeout=5)
            assert balanced(writer)
        report = writer.close(0)
    # Rows counted lost because the journal's fsync failed may still be read back (the page cache kept them).
    fsync_failed = faults["fsync_raised"]
    c = report.counts
    assert c.recorded == n and c.unjournaled == 0 and c.stored + c.journaled + c.lost == n, report.summary()
    store.close()
    first = restart(db)
    assert first.replayed == c.journaled or (fsync_failed and c.journaled <= first.replayed <= c.journaled + c.lost)
    assert restart(db).replayed == 0  # once, never twice
    check = open_store(db)
    try:
        count = check.execute("SELECT count(*) FROM requests")[0][0]
        assert count == check.execute("SELECT count(DISTINCT id) FROM requests")[0][0]
        assert count == (check.execute("SELECT SUM(requests) FROM rollup_minute")[0][0] or 0)
        assert c.stored + c.journaled <= count <= n and (fsync_failed or count == c.stored + c.journaled)
    finally:
        check.close()


def test_sigkill_mid_line_leaves_a_torn_tail_that_the_replay_skips_and_counts(tmp_path):
    db = tmp_path / "fd.db"
    kill_a_writer_with_queued_rows(db, 40)
    journal = Path(f"{db}-ledger.jsonl")
    with journal.open("ab") as f:  # what a kill in the middle of a write leaves
        f.write(b'{"id": "k40", "ts": 17')
    first = restart(db)
    assert first.replayed == 40 and first.unreadable == 1
    assert restart(db).replayed == 0
    store = open_store(db)
    assert store.execute("SELECT count(*) FROM requests")[0][0] == 40
    assert store.execute("SELECT SUM(requests) FROM rollup_minute")[0][0] == 40  # no row folded twice
    store.close()


# --- [proxy] journal_dir ------------------------------------------------------------------------------------
def test_the_journal_can_live_in_another_folder_and_one_left_beside_the_store_is_replayed(tmp_path):
    db = tmp_path / "fd.db"
    store = open_store(db)
    beside = journal_path(store)
    beside.write_text(json.dumps({"id": "old1", "ts": time.time(), "task": "t", "route": "slm", "escalated": False,
                                  "reason": "confident", "status": 200}) + "\n")
    folder = tmp_path / "elsewhere"
    writer = LedgerWriter(store, journal_dir=folder, flush_every_s=0.01)
    assert writer.replayed == 1 and not beside.exists()
    assert writer.journal.parent == folder and folder.stat().st_mode & 0o777 == 0o700
    cap_store(store)
    writer.put(row(1))
    report = writer.close(0)
    assert report.counts.journaled == 1 and str(folder) in report.summary()
    assert writer.journal.stat().st_mode & 0o777 == 0o600
    # Another store of the same name never shares the journal.
    other = open_store(tmp_path / "b" / "fd.db")
    assert journal_path(other, folder) != journal_path(store, folder)
    other.close()
    store.close()
    again = restart(db, journal_dir=folder)
    assert again.replayed == 1 and stored_ids(db) == {"old1", "r1"}


def test_journal_dir_is_validated_and_the_error_names_the_file_and_key(tmp_path, capsys):
    from engine.router.config import load_router_config
    from fleetdeck.cli import main
    from store.config_files import ConfigError

    def config(extra: str) -> Path:
        path = tmp_path / "router.toml"
        path.write_text(f'[proxy]\napi_keys_env = "FD_NO_SUCH"\n{extra}\n[[task]]\nname = "t"\n'
                        'slm_base_url = "http://127.0.0.1:9/v1"\nslm_model = "m"\nthreshold = 0.5\n')
        return path

    with pytest.raises(ConfigError) as exc:
        load_router_config(config('journal_dir = "relative/dir"'))
    assert str(tmp_path / "router.toml") in str(exc.value) and "proxy.journal_dir" in str(exc.value)
    assert "absolute" in str(exc.value)
    assert load_router_config(config('journal_dir = "~/j"')).proxy.journal_dir == Path("~/j").expanduser()

    a_file = tmp_path / "not-a-folder"
    a_file.write_text("x")
    path = config(f'journal_dir = "{a_file}"')
    assert main(["proxy", "--router-config", str(path), "--store", str(tmp_path / "fd.db"), "--port", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and "[proxy] journal_dir" in err and "not a folder" in err


# --- the real proxy over HTTP, its store and journal on real size-limited filesystems -----------------------
@pytest.fixture(scope="module")
def slm():
    from tests.fakes.fake_openai import ServerThread, slm_app

    server = ServerThread(slm_app()).start()
    yield server
    server.stop()


WARM, ANSWERED = 5, 120


@pytest.mark.parametrize("layout", ["one_full_disk", "journal_on_a_disk_with_room", "journal_on_a_disk_that_fills"])
def test_a_full_disk_then_a_stop_then_a_restart_keeps_or_counts_every_answered_request(slm, tmp_path, layout):
    """What an attacker did (disk full, then an ordinary stop): answered = stored + journaled + lost, the
    stop line and /metrics say the same, and the restart stores exactly the journaled rows, once."""
    with tmpfs(tmp_path / "store-fs", "512k") as store_fs, tmpfs(tmp_path / "journal-fs", "256k") as journal_fs:
        journal_dir = {"one_full_disk": None, "journal_on_a_disk_with_room": tmp_path / "journal",
                       "journal_on_a_disk_that_fills": journal_fs}[layout]
        config = router_toml(tmp_path / "router.toml", slm.url, journal_dir)
        db = store_fs / "fd.db"
        port = free_port()
        proxy = ProxyProcess(config, db, port)
        try:
            assert [proxy.ask(i) for i in range(WARM)] == [200] * WARM
            assert wait_for(lambda: proxy.client.get("/health").json()["ledger_stored"] == WARM)
            fillers = [fill(store_fs)]
            if layout == "journal_on_a_disk_that_fills":
                fillers.append(fill(journal_fs, leave=16 * 1024))  # room for a few dozen rows, then a torn one
            # The proxy keeps answering on a full disk: the ledger's trouble is never the client's.
            assert [proxy.ask(WARM + i) for i in range(ANSWERED)] == [200] * ANSWERED
            total = WARM + ANSWERED
            # The writer meets the full disk on its next batch, a moment after the answers (it gathers rows for
            # flush_every_s first): wait for its error, not for a time.
            assert wait_for(lambda: "full" in (proxy.client.get("/health").json()["ledger_error"] or ""))
            seen = proxy.metrics()
            health = proxy.client.get("/health").json()
            assert seen["fleetdeck_ledger_rows_recorded_total"] == total == health["ledger_recorded"]
            assert (seen["fleetdeck_ledger_rows_written_total"] + seen["fleetdeck_ledger_rows_journaled"]
                    + seen["fleetdeck_ledger_rows_unjournaled"] + seen["fleetdeck_ledger_rows_lost_total"]) == total
            assert (health["ledger_stored"] + health["ledger_journaled"] + health["ledger_unjournaled"]
                    + health["ledger_lost"]) == total
            assert health["ledger_error"] and "full" in health["ledger_error"]
            stop, out = proxy.stop()
        finally:
            proxy.kill()
        assert stop is not None, out
        # The stop line: only what is true, and it adds up.
        assert stop.recorded == total and stop.stored + stop.journaled + stop.lost == total, stop.line
        assert stop.stored >= seen["fleetdeck_ledger_rows_written_total"] and stop.lost >= seen["fleetdeck_ledger_rows_lost_total"]
        assert stop.stored < total  # the full disk did refuse rows
        if layout == "one_full_disk":
            assert stop.lost > 0 and "not journaled" in stop.line and "No space left on device" in stop.line
        elif layout == "journal_on_a_disk_with_room":
            assert stop.lost == 0 and stop.journaled == total - stop.stored and stop.journal.startswith(str(journal_dir))
        else:
            assert stop.journaled > 0 and stop.lost > 0 and "write failed" in stop.line
        # The log said it as it happened, not only at the stop.
        before_stop = out.split("ledger at the stop")[0]
        assert "ledger write failed (database or disk is full)" in before_stop
        if stop.lost:
            assert "ledger journal" in before_stop and "No space left on device" in before_stop

        # Space returns; the next start writes the journaled rows, each once.
        for f in fillers:
            f.unlink()
        again = ProxyProcess(config, db, port)
        try:
            seen2 = again.metrics()
            assert seen2["fleetdeck_ledger_rows_replayed_total"] == stop.journaled
            assert seen2["fleetdeck_ledger_journal_lines_unreadable_total"] == 0  # a torn line was cut back
            assert again.client.get("/health").json()["ledger_replayed"] == stop.journaled
            stop2, out2 = again.stop()
        finally:
            again.kill()
        assert stop2 is not None and stop2.recorded == 0, out2
        if stop.journaled:
            assert f"{stop.journaled} row(s) of an earlier run's journal stored" in stop2.line
        store = open_store(db)
        try:
            assert store.execute("SELECT count(*) FROM requests")[0][0] == stop.stored + stop.journaled
            assert store.execute("SELECT count(DISTINCT id) FROM requests")[0][0] == stop.stored + stop.journaled
            assert store.execute("SELECT SUM(requests) FROM rollup_minute")[0][0] == stop.stored + stop.journaled
        finally:
            store.close()


def test_a_journal_dir_others_can_write_is_refused_and_left_as_it_is(tmp_path):
    from engine.router.config import RouterConfig
    from engine.router.server import ProxyStartError, check_journal_dir

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # like /tmp
    cfg = RouterConfig.model_validate({"proxy": {"journal_dir": str(shared)}, "task": [
        {"name": "t", "slm_base_url": "http://127.0.0.1:9/v1", "slm_model": "m", "threshold": 0.5}]})
    with pytest.raises(ProxyStartError, match="other users can write") as exc:
        check_journal_dir(cfg, tmp_path / "router.toml")
    assert str(tmp_path / "router.toml") in str(exc.value) and "[proxy] journal_dir" in str(exc.value)
    assert shared.stat().st_mode & 0o7777 == 0o1777  # not chmodded: it may be everyone's folder
    made = tmp_path / "new" / "journal"
    check_journal_dir(RouterConfig.model_validate({**cfg.model_dump(mode="json"), "proxy": {"journal_dir": str(made)}}))
    assert made.is_dir() and made.stat().st_mode & 0o777 == 0o700


def test_a_link_planted_at_the_journals_name_is_not_written_through(tmp_path):
    db = tmp_path / "fd.db"
    store = open_store(db)
    target = tmp_path / "victim"
    target.write_text("precious\n")
    journal_path(store).symlink_to(target)
    writer = LedgerWriter(store, flush_every_s=0.01)
    writer.put(row(1))
    report = writer.close(5)
    assert target.read_text() == "precious\n"
    assert report.counts.stored == 1 and report.counts.lost == 0
    store.close()


def test_a_stop_while_another_process_holds_the_store_locked_still_ends_and_counts(tmp_path):
    import sqlite3

    db = tmp_path / "fd.db"
    store = open_store(db)
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another writer holds the lock: each store write waits its busy timeout
    try:
        writer = LedgerWriter(store, flush_every_s=0.01, retry_every_s=0.05)
        for i in range(15):
            writer.put(row(i))
        report = writer.close(0)  # the stop's grace is spent: one bounded attempt, then the reckoning
        assert report.counts.recorded == 15 and report.counts.stored == 0
        assert report.counts.journaled == 15 and report.counts.lost == 0
    finally:
        other.execute("ROLLBACK")
        other.close()
    store.close()
    assert restart(db).replayed == 15 and len(stored_ids(db)) == 15


def test_a_journal_line_that_parses_but_is_not_a_row_is_skipped_and_holds_nothing_up(tmp_path):
    db = tmp_path / "fd.db"
    store = open_store(db)
    good = {"id": "g1", "ts": time.time(), "task": "t", "route": "slm", "escalated": False, "reason": "confident",
            "status": 200}
    lines = [good, {**good, "id": "b1", "ts": "yesterday"}, {**good, "id": "b2", "prompt_tokens": "many"},
             {**good, "id": "b3", "status": True}, [1, 2], "text", {**good, "id": 7}]
    journal_path(store).write_text("".join(json.dumps(x) + "\n" for x in lines) + "\n\n")
    writer = LedgerWriter(store, flush_every_s=0.01)
    assert writer.replayed == 1 and writer.unreadable == 6 and writer.pending == 0
    writer.put(row(2))
    assert writer.close(5).counts.stored == 1
    assert {r["id"] for r in store.query("SELECT id FROM requests")} == {"g1", "r2"}
    store.close()


def test_metrics_health_and_the_close_tell_the_same_over_http_without_root(slm, tmp_path):
    """The same accounting through the in-process proxy (no mount needed): the store refuses, the journal
    takes the first half of the rows and then the disk is full."""
    from engine.router.config import RouterConfig
    from engine.router.proxy import Router, create_app
    from tests.fakes.fake_openai import ServerThread

    config = RouterConfig.model_validate({"proxy": {"api_keys_env": None, "shutdown_grace_s": 0.2}, "task": [
        {"name": "tickets", "slm_base_url": f"{slm.url}/v1", "slm_model": "m", "threshold": 0.5}]})
    db = tmp_path / "fd.db"
    store = open_store(db)
    cap_store(store)
    writer = LedgerWriter(store, flush_every_s=0.01, retry_every_s=0.05)
    server = ServerThread(create_app(Router(config, writer, load_litellm=False))).start()
    full = {"on": False}
    real_write = os.write

    def write(fd: int, data: bytes) -> int:
        if full["on"] and fd == writer._jf.fd:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    body = {"model": "tickets", "messages": [{"role": "user", "content": "q lp=-0.01"}]}
    try:
        with patch.object(os, "write", write), httpx.Client(base_url=server.url, trust_env=False, timeout=30) as client:
            for i in range(20):
                full["on"] = i >= 12
                assert client.post("/v1/chat/completions", json=body).status_code == 200
            assert wait_for(lambda: writer.write_failures > 0)
            health = client.get("/health").json()
            text = client.get("/metrics").text
            assert (health["ledger_recorded"], health["ledger_stored"], health["ledger_journaled"],
                    health["ledger_unjournaled"], health["ledger_lost"]) == (20, 0, 12, 8, 0)
            assert "No space left on device" in health["ledger_journal_error"]
            for line in ("fleetdeck_ledger_rows_recorded_total 20.0", "fleetdeck_ledger_rows_journaled 12.0",
                         "fleetdeck_ledger_rows_unjournaled 8.0", "fleetdeck_ledger_rows_lost_total 0.0"):
                assert line in text, text
    finally:
        server.stop()  # the app's shutdown closes the ledger within the grace
    report = writer.close()
    assert (report.counts.stored, report.counts.journaled, report.counts.lost) == (0, 12, 8)
    assert "8 not stored" in report.summary() and "No space left on device" in report.summary()
    store.close()
    assert restart(db).replayed == 12 and len(stored_ids(db)) == 12


def test_the_router_screens_backlog_counts_the_journal_where_journal_dir_puts_it(tmp_path):
    from store.ledger import journal_backlog

    store = open_store(tmp_path / "fd.db")
    folder = tmp_path / "j"
    folder.mkdir()
    for path, n in ((journal_path(store, folder), 3), (journal_path(store), 2)):
        path.write_text("".join(json.dumps({"id": f"{path.name}{i}"}) + "\n" for i in range(n)))
        os.utime(path, (time.time() - 60, time.time() - 60))
    assert journal_backlog(store, time.time(), journal_dir=folder) == 5
    assert journal_backlog(store, time.time()) == 2
    store.close()


def test_a_store_failure_in_the_middle_of_a_row_by_row_retry_folds_no_row_twice(tmp_path, monkeypatch):
    """A batch with one unstorable row is written row by row; the disk fails half-way. The rows already in
    the store are not sent again: their rollups would count twice."""
    import sqlite3

    import store.ledger as ledger_module

    real = ledger_module.write_rows
    failed = {"once": False}

    def flaky(store, rows):
        if len(rows) == 1 and rows[0].id == "r6" and not failed["once"]:
            failed["once"] = True
            raise sqlite3.OperationalError("disk I/O error")
        return real(store, rows)

    monkeypatch.setattr(ledger_module, "write_rows", flaky)
    db = tmp_path / "fd.db"
    store = open_store(db)
    writer = LedgerWriter(store, flush_every_s=0.2, retry_every_s=0.05)
    for i in range(10):
        writer.put(row(i, completion_text="cut \ud800" if i == 3 else "ok"))
    assert wait_for(lambda: failed["once"] and writer.pending == 0)
    report = writer.close(5)
    assert report.counts.stored == 10 and writer.sanitized == 1
    assert store.execute("SELECT count(*) FROM requests")[0][0] == 10
    assert store.execute("SELECT SUM(requests) FROM rollup_minute")[0][0] == 10
    store.close()


def test_a_journal_that_cannot_be_removed_after_its_replay_is_appended_to_safely(tmp_path):
    """The replayed journal cannot be removed (its unlink is refused): the writer appends after what is there,
    starting on a new line, and its rows are still replayed once."""
    db = tmp_path / "fd.db"
    store = open_store(db)
    journal = journal_path(store)
    journal.write_text(json.dumps({"id": "old", "ts": time.time(), "task": "t", "route": "slm", "escalated": False,
                                   "reason": "confident", "status": 200}))  # and no newline: torn tail
    real_unlink = Path.unlink

    def no_unlink(self: Path, missing_ok: bool = False) -> None:
        if self == journal:
            raise PermissionError(13, "Permission denied")
        real_unlink(self, missing_ok)

    with patch.object(Path, "unlink", no_unlink):
        writer = LedgerWriter(store, flush_every_s=0.01)
    assert writer.replayed == 1
    cap_store(store)
    writer.put(row(1))
    report = writer.close(0)
    assert report.counts.journaled == 1
    found = read_journal(journal)
    assert {r.id for r in found.rows} == {"old", "r1"} and found.unreadable == 0
    store.close()
    assert restart(db).replayed == 1 and stored_ids(db) == {"old", "r1"}


# --- attacks on the journal's contents and its name (wt-books) --------------------------------------------
# A number no row can hold: json.loads reads NaN and the infinities; a time no date shows; past 64 bits.
POISON = st.sampled_from(["NaN", "Infinity", "-Infinity", "1e300", "-5", "100000000000000000000000000000"])
POISON_FIELD = st.sampled_from(["ts", "confidence", "latency_ms", "cost_usd", "status", "prompt_tokens"])


def _unholdable(field: str, bad: str) -> bool:
    """Whether a row with `bad` in `field` is no row: not a number, past 64 bits, a float where an integer
    goes, or a time outside 1970..9999. (1e300 or -5 as a confidence, a latency or a cost is storable.)"""
    if bad in ("NaN", "Infinity", "-Infinity") or len(bad) > 20:
        return True
    if field in ("status", "prompt_tokens"):
        return bad == "1e300"
    return field == "ts"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layout=st.lists(st.one_of(st.just("good"), st.tuples(POISON_FIELD, POISON)), min_size=1, max_size=12))
def test_a_journal_line_with_a_number_no_row_can_hold_holds_no_row_up(tmp_path_factory, layout):
    """Before: one journal line with `"ts": NaN` (or 1e300, or a status past 64 bits) was read as a row, failed its
    batch, failed again made safe, and stayed first in the held rows: nothing after it, of the journal or of the
    new run, was ever stored, and the store was reported as failing."""
    db = tmp_path_factory.mktemp("poison") / "fd.db"
    store = open_store(db)
    good_ids, lines = set(), []
    for i, what in enumerate(layout):
        line = json.dumps({"id": f"j{i}", "ts": time.time(), "task": "t", "route": "slm", "escalated": False,
                           "reason": "confident", "status": 200, "confidence": 0.5, "latency_ms": 4.0, "cost_usd": 0.01,
                           "prompt_tokens": 9})
        if what == "good":
            good_ids.add(f"j{i}")
        else:
            field, bad = what
            if not _unholdable(field, bad):
                good_ids.add(f"j{i}")
            line = re.sub(rf'"{field}": [^,}}]+', f'"{field}": {bad}', line)
        lines.append(line)
    journal_path(store).write_text("\n".join(lines) + "\n")
    writer = LedgerWriter(store, flush_every_s=0.005, retry_every_s=0.01)
    for i in range(3):
        writer.put(row(100 + i))
    report = writer.close(5)
    c = report.counts
    assert c.stored == 3 and c.lost == 0 and c.pending == 0 and c.earlier_held == 0, report.summary()
    assert c.replayed + c.unreadable == len(layout)
    assert writer.last_error is None  # the store never failed: no line says it did
    store.close()
    assert stored_ids(db) == good_ids | {"r100", "r101", "r102"}
    assert not journal_path(open_store(db)).exists()


def test_a_row_of_this_run_that_cannot_be_stored_even_made_safe_is_counted_lost_not_held(tmp_path):
    """A row whose time is not a number (no value made up would be true) is given up, counted lost with why,
    and every row queued after it is stored: before, it was held first and retried for ever."""
    db = tmp_path / "fd.db"
    store = open_store(db)
    writer = LedgerWriter(store, flush_every_s=0.005, retry_every_s=0.01)
    writer.put(row(1))
    writer.put(row(2, ts=float("inf")))
    writer.put(row(3, confidence=float("inf"), latency_ms=float("nan")))  # optional numbers: made safe
    writer.put(row(4))
    report = writer.close(5)
    c = report.counts
    assert (c.recorded, c.stored, c.lost, c.journaled, c.unjournaled) == (4, 3, 1, 0, 0), report.summary()
    assert "could not be stored even with its fields made safe" in report.summary() and "ts" in report.summary()
    rows = {r["id"]: r for r in store.query("SELECT id, confidence, latency_ms, sanitized FROM requests")}
    assert set(rows) == {"r1", "r3", "r4"}
    assert rows["r3"]["sanitized"] == 1 and rows["r3"]["confidence"] is None and rows["r3"]["latency_ms"] is None
    assert store.execute("SELECT SUM(requests) FROM rollup_minute")[0][0] == 3
    store.close()


@pytest.mark.parametrize("planted", ["fifo", "link-to-fifo", "link-to-device", "link-to-another-journal"])
def test_a_fifo_device_or_link_at_the_journals_name_never_hangs_the_start(tmp_path, planted):
    """Before: the start read the journal with read_bytes(), through any link: a FIFO there (or a link to one)
    waited for a writer for ever, a link to /dev/zero read until memory ran out, and a link to another store's
    journal stored that store's rows here. Now only a regular file at the name itself is read."""
    db = tmp_path / "fd.db"
    store = open_store(db)
    jp = journal_path(store)
    other = tmp_path / "other.db-ledger.jsonl"
    other.write_text(json.dumps({"id": "theirs", "ts": time.time(), "task": "t", "route": "slm", "escalated": False,
                                 "reason": "confident", "status": 200}) + "\n")
    fifo = tmp_path / "a-fifo"
    os.mkfifo(fifo)
    if planted == "fifo":
        os.mkfifo(jp)
    else:
        jp.symlink_to({"link-to-fifo": fifo, "link-to-device": Path("/dev/zero"),
                       "link-to-another-journal": other}[planted])
    # A hang fails the test by its timeout: the writer is made in a thread that must end.
    import threading

    box: dict[str, LedgerWriter] = {}
    maker = threading.Thread(target=lambda: box.setdefault("w", LedgerWriter(store, flush_every_s=0.005)), daemon=True)
    maker.start()
    maker.join(30)  # a ceiling against the hang only
    assert "w" in box, "the ledger's start hung on what was planted at the journal's name"
    writer = box["w"]
    writer.put(row(1))
    report = writer.close(5)
    assert report.counts.stored == 1 and report.counts.lost == 0
    assert stored_ids(db) == {"r1"}  # never another store's rows
    assert other.read_text().count("theirs") == 1  # what a link pointed to is left as it was
    if planted == "fifo":
        assert writer.journal_error and "cannot open" in writer.journal_error  # said, not waited on
    else:
        assert not jp.is_symlink()  # the link is gone; this run kept a journal of its own
        assert writer.journal_failures == 0
    store.close()


def test_rows_pruned_while_the_journal_holds_them_are_not_replayed_into_the_rollups_twice(tmp_path, monkeypatch):
    """A journal pinned by rows dropped from memory keeps every later row too, stored or not. Before: the
    retention prune deleted stored rows the journal still held, and the next start, not finding their ids,
    stored them again and added them to the rollups a second time (the month's cost and escalation counted
    twice). Now the raw rows are not pruned while a journal this store's rows wait in is kept."""
    import store.ledger as ledger_module

    monkeypatch.setattr(ledger_module, "MAX_PENDING", 2)
    db = tmp_path / "fd.db"
    store = open_store(db)
    cap_store(store)
    old = time.time() - 40 * 86400  # past the 30-day retention by the time the prune runs
    writer = LedgerWriter(store, flush_every_s=0.005, retry_every_s=0.01, retention_days=30, prune_every_s=0)
    for i in range(6):
        writer.put(row(i, ts=old + i))
    assert wait_for(lambda: writer.pending == 2)  # 4 dropped from memory: they wait in the journal, now pinned
    uncap_store(store)
    for i in range(6, 9):
        writer.put(row(i, ts=old + i))
    assert wait_for(lambda: writer.pending == 0)
    report = writer.close(5)
    store.close()
    restart(db, retention_days=30, prune_every_s=0)  # the next start stores what waited, once, then may prune
    check = open_store(db)
    try:
        assert check.execute("SELECT SUM(requests) FROM rollup_minute")[0][0] == 9, report.summary()
        assert check.execute("SELECT SUM(requests) FROM rollup_day")[0][0] == 9
    finally:
        check.close()


def test_a_second_proxy_on_one_store_is_refused_in_one_line_and_counts_nothing_twice(slm, tmp_path):
    """Before: a second `fleetdeck proxy` on the same store (a systemd one and one started by hand, both on
    the default store) replayed the first's journal while its rows were still on their way (both then stored
    them: the rollups counted them twice) and cut the journal under the other's unstored rows. Now the store
    has one ledger writer: the second is refused with one line naming the first's process."""
    db = tmp_path / "fd.db"
    cfg = router_toml(tmp_path / "router.toml", slm.url, None)
    first = ProxyProcess(cfg, db, free_port())
    try:
        assert all(first.ask(i) == 200 for i in range(10))
        second = subprocess.run([sys.executable, "-m", "fleetdeck", "proxy", "--router-config", str(cfg), "--port",
                                 str(free_port()), "--store", str(db)], capture_output=True, text=True, cwd=ROOT,
                                timeout=300)  # a ceiling: it must end by itself
        assert second.returncode == 2, second.stdout + second.stderr
        assert f"another fleetdeck proxy (process {first.proc.pid})" in second.stderr
        assert "Traceback" not in second.stderr and second.stderr.strip().count("\n") == 0, second.stderr
        assert all(first.ask(i) == 200 for i in range(10, 20))  # the first never noticed
        stop, out = first.stop()
    finally:
        first.kill()
    assert stop is not None and stop.stored == 20 and stop.lost == 0, out
    store = open_store(db)
    try:
        assert store.execute("SELECT count(*) FROM requests")[0][0] == 20
        assert store.execute("SELECT SUM(requests) FROM rollup_minute")[0][0] == 20
    finally:
        store.close()
    second_writer = LedgerWriter(open_store(db))  # the first is gone: the next writer starts as always
    assert second_writer.replayed == 0 and second_writer.close(5).counts.lost == 0


def test_two_writers_in_one_process_on_one_store_are_refused_too(tmp_path):
    from store.db import StoreError

    store = open_store(tmp_path / "fd.db")
    first = LedgerWriter(store, flush_every_s=0.5)
    first.put(row(1))
    with pytest.raises(StoreError, match="another fleetdeck proxy"):
        LedgerWriter(open_store(tmp_path / "fd.db"))
    report = first.close(5)
    assert report.counts.stored == 1
    again = LedgerWriter(store)  # released by the close
    assert again.replayed == 0
    again.close(5)
    assert store.execute("SELECT SUM(requests) FROM rollup_minute")[0][0] == 1


def test_a_start_that_fails_in_its_replay_releases_the_stores_writer_lock(tmp_path, monkeypatch):
    import sqlite3

    import store.ledger_journal as journal_module

    db = tmp_path / "fd.db"
    kill_a_writer_with_queued_rows(db, 5)
    store = open_store(db)

    def failing(store, rows):
        raise sqlite3.OperationalError("disk I/O error")

    with monkeypatch.context() as m:
        m.setattr(journal_module, "missing_rows", failing)
        with pytest.raises(sqlite3.OperationalError):
            LedgerWriter(store)
    writer = LedgerWriter(store)  # not refused as "another proxy": the failed start let the lock go
    assert writer.replayed == 5 and writer.close(5).counts.lost == 0
    store.close()


# A writer SIGKILLed at each stage of a batch (deterministic points, not a timer): inside the store's
# transaction (rows inserted, rollups not yet folded), after the commit before the journal is cut, and
# inside the cut. The next start must store every recorded row exactly once, rollups included.
_KILLED_AT_STAGE = r"""
import os, signal, sys, time
import store.ledger as ledger
import store.ledger_batch as batch
import store.rollup as rollup
from store.db import open_store
from store.ledger import LedgerRow, LedgerWriter
from store.ledger_journal import JournalFile

stage, db = sys.argv[1], sys.argv[2]
def die():
    os.kill(os.getpid(), signal.SIGKILL)

real_fold, real_write, real_cut = rollup.fold_rollups, ledger.write_rows, JournalFile.cut

def fold(conn, rows):
    if stage == "in_transaction":
        die()
    return real_fold(conn, rows)

def write_rows(store, rows):
    real_write(store, rows)
    if stage == "after_commit":
        die()

def cut(self):
    if stage == "in_cut" and self.end and not self.in_memory(self.gen):
        os.ftruncate(self.fd, self.end // 2)  # half cut, as a kill inside it could leave it
        die()
    return real_cut(self)

batch.fold_rollups = fold
ledger.write_rows = write_rows
JournalFile.cut = cut
writer = LedgerWriter(open_store(db), flush_every_s=0.05)
for i in range(40):  # however the rows fall into batches, the first batch meets the stage
    writer.put(LedgerRow(id=f"s{i}", ts=time.time(), task="t", route="slm", escalated=False, reason="confident",
                         status=200))
time.sleep(600)
"""


@pytest.mark.parametrize("stage", ["in_transaction", "after_commit", "in_cut"])
def test_a_writer_killed_at_each_stage_of_a_batch_loses_and_doubles_nothing(tmp_path, stage):
    db = tmp_path / "fd.db"
    open_store(db).close()
    proc = subprocess.run([sys.executable, "-c", _KILLED_AT_STAGE, stage, str(db)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)  # a ceiling: it kills itself at the stage
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    writer = restart(db)
    store = open_store(db)
    try:
        count = store.execute("SELECT count(*) FROM requests")[0][0]
        assert count == 40, (stage, writer.replayed, writer.unreadable)
        assert store.execute("SELECT SUM(requests) FROM rollup_minute")[0][0] == 40
        assert store.execute("SELECT SUM(requests) FROM rollup_day")[0][0] == 40
    finally:
        store.close()
    assert restart(db).replayed == 0
