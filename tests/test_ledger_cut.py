"""The journal is cut for the whole run, whatever pinned it, and a kill at any point around a cut loses and
doubles nothing: the real `fleetdeck proxy` (a subprocess) with its store on a real full filesystem (tmpfs),
rows dropped from memory so that only the journal holds them, the store given room again, and the proxy
SIGKILLed by itself at each stage of setting the journal aside, reading it back and cutting it.

Before: a journal that held rows dropped from memory was "pinned": never cut for the rest of the run, growing
with every request, all of it read at the next start.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import time
from pathlib import Path

import pytest

from store.db import open_store
from store.ledger import LedgerRow, LedgerWriter, journal_path
from store.ledger_journal import sealed_parts
from tests.helpers import wait_for
from tests.proxy_helpers import ProxyProcess, fill, free_port, router_toml, tmpfs

# The proxy, as `fleetdeck proxy` runs it, with MAX_PENDING made small (so a few requests overflow memory)
# and, for a stage, a SIGKILL of itself at that point of the cut: deterministic points, not a timer.
KILLED_AT = r"""
import os, signal, sys
from pathlib import Path
import store.ledger as ledger
from store.ledger_journal import JournalFile

stage = sys.argv[1]
ledger.MAX_PENDING = 5
state = {"reading_back": False, "read_back": False}

def die():
    os.kill(os.getpid(), signal.SIGKILL)

real_rename, real_read_back, real_store_rows = os.rename, ledger.LedgerWriter._read_back, ledger.LedgerWriter._store_rows
real_cut, real_unlink = JournalFile.cut, Path.unlink

def rename(src, dst, *a, **kw):
    real_rename(src, dst, *a, **kw)
    if stage == "after_seal" and ".jsonl." in str(dst):
        die()  # the live journal is renamed to a part; the new live journal is not open yet

def read_back(self, part, now):
    state["reading_back"] = True
    try:
        done = real_read_back(self, part, now)
    finally:
        state["reading_back"] = False
    state["read_back"] = state["read_back"] or done
    return done

def store_rows(self, rows):
    if stage == "mid_read_back" and state["reading_back"] and len(rows) > 1:
        real_store_rows(self, rows[: len(rows) // 2])
        die()  # half of the part's rows are in the store
    return real_store_rows(self, rows)

def unlink(self, *a, **kw):
    if stage == "before_part_removed" and ".jsonl." in self.name:
        die()  # every row of the part is in the store; the part is still there
    return real_unlink(self, *a, **kw)

def cut(self):
    if stage == "in_cut" and state["read_back"] and self.end and not self.in_memory(self.gen) and not self.pinned:
        os.ftruncate(self.fd, self.end // 2)  # half cut, as a kill inside the truncate could leave it
        die()
    return real_cut(self)

os.rename = rename
ledger.LedgerWriter._read_back = read_back
ledger.LedgerWriter._store_rows = store_rows
Path.unlink = unlink
JournalFile.cut = cut
from fleetdeck.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.fixture(scope="module")
def slm():
    from tests.fakes.fake_openai import ServerThread, slm_app

    server = ServerThread(slm_app()).start()
    yield server
    server.stop()


def ask(proxy: ProxyProcess, i: int) -> str | None:
    """One request; the ledger row's id when it was answered (None: the proxy died under it)."""
    body = {"model": "tickets", "messages": [{"role": "user", "content": f"q{i} lp=-0.01"}]}
    try:
        resp = proxy.client.post("/v1/chat/completions", json=body)
    except Exception:
        return None
    assert resp.status_code == 200, resp.text
    return resp.headers["x-fleetdeck-request-id"]


def parts(journal_dir: Path) -> list[str]:
    return sorted(p.name for p in journal_dir.iterdir() if ".jsonl." in p.name)


def health(proxy: ProxyProcess) -> dict:
    return proxy.client.get("/health").json()


@pytest.mark.parametrize("stage", [None, "after_seal", "mid_read_back", "before_part_removed", "in_cut"])
def test_a_pinned_journal_is_read_back_and_cut_and_a_kill_around_it_loses_and_doubles_nothing(slm, tmp_path, stage):
    journal_dir = tmp_path / "journal"
    config = router_toml(tmp_path / "router.toml", slm.url, journal_dir)
    with tmpfs(tmp_path / "store-fs", "4m") as store_fs:
        db = store_fs / "fd.db"
        port = free_port()
        proxy = ProxyProcess(config, db, port, launcher=("-c", KILLED_AT, str(stage)))
        answered: list[str] = []
        try:
            answered += [ask(proxy, i) for i in range(5)]
            assert wait_for(lambda: health(proxy)["ledger_stored"] == 5)
            filler = fill(store_fs)
            answered += [ask(proxy, 5 + i) for i in range(30)]
            # 30 rows the full store refuses: 5 held in memory, 25 dropped from it (they wait in the journal only).
            assert wait_for(lambda: "full" in (health(proxy)["ledger_error"] or "") and health(proxy)["ledger_pending"] == 5)
            assert health(proxy)["ledger_journaled"] == 30
            filler.unlink()  # room again: the 5 are stored, the journal is sealed, the 25 read back from it
            if stage in (None, "in_cut"):
                assert wait_for(lambda: health(proxy)["ledger_stored"] == 35)
                h = health(proxy)
                assert (h["ledger_journaled"], h["ledger_unjournaled"], h["ledger_lost"]) == (0, 0, 0)
                assert wait_for(lambda: parts(journal_dir) == [])  # the part was read back and removed
                answered.append(ask(proxy, 35))  # in_cut: the next cut of the live journal is cut short by a kill
            if stage is None:
                # The journal is cut for the rest of the run: it does not grow with each request.
                answered += [ask(proxy, 36 + i) for i in range(20)]
                assert wait_for(lambda: health(proxy)["ledger_stored"] == 56)
                assert wait_for(lambda: journal_path_of(db, journal_dir).stat().st_size == 0)
                stop, out = proxy.stop()
                assert stop is not None and (stop.stored, stop.journaled, stop.lost) == (56, 0, 0), out
            else:
                assert proxy.proc.wait(timeout=300) == -signal.SIGKILL, proxy.output()  # a ceiling: it kills itself
        finally:
            proxy.kill()
        assert None not in answered  # every request was answered before the kill
        died_with_parts = parts(journal_dir)

        # The next start (an ordinary proxy) stores what waited, each row once, and removes the parts.
        again = ProxyProcess(config, db, port)
        try:
            assert wait_for(lambda: parts(journal_dir) == [])
            more = [ask(again, 100 + i) for i in range(3)]
            stop, out = again.stop()
        finally:
            again.kill()
        assert stop is not None and stop.lost == 0 and stop.journaled == 0, out
        store = open_store(db)
        try:
            ids = {r["id"] for r in store.query("SELECT id FROM requests")}
            count = store.execute("SELECT count(*) FROM requests")[0][0]
            rolled = store.execute("SELECT SUM(requests) FROM rollup_minute")[0][0]
            daily = store.execute("SELECT SUM(requests) FROM rollup_day")[0][0]
        finally:
            store.close()
        assert set(answered) | set(more) <= ids, (stage, died_with_parts)  # nothing lost
        assert count == len(ids) == rolled == daily == len(answered) + len(more), (stage, died_with_parts)  # nothing twice
        assert parts(journal_dir) == []


def journal_path_of(db: Path, journal_dir: Path) -> Path:
    store = open_store(db)
    try:
        return journal_path(store, journal_dir)
    finally:
        store.close()


def row(i: int) -> LedgerRow:
    return LedgerRow(id=f"s{i}", ts=time.time(), task="t", route="slm", escalated=False, reason="confident", status=200,
                     latency_ms=1.0, completion_text="x" * 2000)


def test_a_journal_that_steady_traffic_never_empties_is_sealed_and_removed_once_stored(tmp_path, monkeypatch):
    """Before: the journal was cut only at a moment when every row in it was stored; under steady traffic a
    row is always on its way, so the journal grew for the whole run (and a prune plus a kill could then bring
    pruned rows back from it). Now a live journal past SEAL_BYTES is sealed as a part, and the part is removed
    once its rows are stored."""
    import store.ledger as ledger_module
    import store.ledger_journal as journal_module

    monkeypatch.setattr(journal_module, "SEAL_BYTES", 16 * 1024)
    store = open_store(tmp_path / "fd.db")
    writer = LedgerWriter(store, flush_every_s=0.0, retry_every_s=0.05)
    real_write = ledger_module.write_rows
    total, sizes = 300, []

    def write_while_a_request_arrives(store_, rows):
        # Steady traffic, made deterministic: a request's row arrives while every batch is being written, so
        # when the writer could cut the journal, a row of it is always still on its way.
        real_write(store_, rows)
        sizes.append(writer.journal.stat().st_size)
        if writer.counts().recorded < total:
            writer.put(row(writer.counts().recorded))

    monkeypatch.setattr(ledger_module, "write_rows", write_while_a_request_arrives)
    writer.put(row(0))
    assert wait_for(lambda: writer.counts().stored == total and not sealed_parts(writer.journal))
    assert max(sizes) < 16 * 1024 + 4096  # sealed at SEAL_BYTES: it never grew with the run
    report = writer.close(5)
    assert (report.counts.stored, report.counts.lost) == (total, 0)
    assert store.execute("SELECT SUM(requests) FROM rollup_minute")[0][0] == total
    assert store.execute("SELECT count(*) FROM requests")[0][0] == total
    store.close()


def test_a_journal_unreadable_at_the_start_is_set_aside_and_read_back_when_it_can_be(tmp_path, monkeypatch):
    """Before: a journal the start could not read (an I/O error) was kept and appended to, and never cut for
    the rest of the run. Now it is renamed to a part, this run's journal is cut as usual, and the part is read
    again now and then: its rows are stored once it can be read."""
    import store.ledger as ledger_module
    import store.ledger_journal as journal_module

    monkeypatch.setattr(journal_module, "RETRY_S", 0.0)
    monkeypatch.setattr(ledger_module, "RETRY_S", 0.0)
    db = tmp_path / "fd.db"
    store = open_store(db)
    jp = journal_path(store)
    old = [LedgerRow(id=f"old{i}", ts=time.time(), task="t", route="slm", escalated=False, reason="confident", status=200)
           for i in range(4)]
    jp.write_text("".join(json.dumps(dataclasses.asdict(r)) + "\n" for r in old) + '{"torn": ')
    real_read = journal_module._read_regular
    broken = {"on": True}

    def flaky(path):
        if broken["on"] and path.name.startswith(jp.name):
            raise OSError(5, "Input/output error")
        return real_read(path)

    monkeypatch.setattr(journal_module, "_read_regular", flaky)
    writer = LedgerWriter(store, flush_every_s=0.005, retry_every_s=0.01)
    assert [p.name for p in sealed_parts(jp)] == [f"{jp.name}.1"]
    for i in range(10):
        writer.put(row(i))
    assert wait_for(lambda: writer.counts().stored == 10 and jp.stat().st_size == 0)  # this run's journal is cut
    assert sealed_parts(jp) and writer.replayed == 0
    broken["on"] = False  # readable again: its rows are stored, once, and the part removed
    assert wait_for(lambda: writer.replayed == 4 and not sealed_parts(jp))
    assert writer.unreadable == 1  # its torn last line
    report = writer.close(5)
    assert (report.counts.stored, report.counts.lost, report.counts.replayed) == (10, 0, 4)
    assert store.execute("SELECT SUM(requests) FROM rollup_minute")[0][0] == 14
    store.close()


def test_what_is_planted_at_a_parts_name_is_never_read_through_nor_hangs_the_start(tmp_path):
    """A link at a part's name is removed unread (what it points to is left as it is), a FIFO is left alone and
    holds nothing up, a file that holds no row is no part (never removed), and a part numbered past any bound
    is still found and replayed."""
    import os
    import threading

    db = tmp_path / "fd.db"
    store = open_store(db)
    jp = journal_path(store)
    theirs = tmp_path / "other.db-ledger.jsonl"
    theirs.write_text(json.dumps(dataclasses.asdict(row(1))) + "\n")
    Path(f"{jp}.7").symlink_to(theirs)
    os.mkfifo(f"{jp}.8")
    Path(f"{jp}.{10**25}").write_text(json.dumps(dataclasses.asdict(row(2))) + "\n")
    not_a_part = Path(f"{jp}.9")  # another store an operator named so: lines, and no row
    not_a_part.write_bytes(b"SQLite format 3\x00" + bytes(range(256)) * 8)
    box: dict[str, LedgerWriter] = {}
    maker = threading.Thread(target=lambda: box.setdefault("w", LedgerWriter(store, flush_every_s=0.005)), daemon=True)
    maker.start()
    maker.join(60)  # a ceiling against the hang only
    assert "w" in box, "the start hung on what was planted at a part's name"
    writer = box["w"]
    assert writer.replayed == 1 and not Path(f"{jp}.7").is_symlink() and not Path(f"{jp}.{10**25}").exists()
    assert theirs.read_text().count('"s1"') == 1  # left as it was
    assert not_a_part.read_bytes().startswith(b"SQLite format 3") and writer.unreadable == 0  # never removed nor counted
    writer.put(row(3))
    report = writer.close(5)
    assert (report.counts.stored, report.counts.lost) == (1, 0)
    assert {r["id"] for r in store.query("SELECT id FROM requests")} == {"s2", "s3"}
    writer._maybe_prune()  # the FIFO holds no pruning back: it is no part of this journal's
    assert not writer._prune_held
    store.close()


def test_a_journal_an_operator_removes_under_the_running_writer_is_copied_back(tmp_path):
    """Before: rows went on being written to the removed file (a name no start would read), and the stop line
    said they waited in a journal that was not there; a kill lost them. Now the file's rows are copied to a
    part and a new journal is started at the name: the next start stores every row once."""
    db = tmp_path / "fd.db"
    store = open_store(db)
    store.execute("PRAGMA query_only = ON")  # the store refuses: every row waits in the journal
    writer = LedgerWriter(store, flush_every_s=0.005, retry_every_s=0.02)
    for i in range(10):
        writer.put(row(i))
    assert wait_for(lambda: writer.pending == 10)
    writer.journal.unlink()  # `rm` of a file that looked big
    for i in range(10, 15):
        writer.put(row(i))
    assert wait_for(lambda: bool(sealed_parts(writer.journal)) and writer.journal.exists())
    report = writer.close(0.2)
    assert (report.counts.journaled, report.counts.lost) == (15, 0), report.summary()
    assert "sealed part(s) of the journal" in report.summary()
    store.close()
    again = open_store(db)
    second = LedgerWriter(again)
    assert second.replayed == 15 and second.unreadable == 0
    second.close(5)
    assert again.execute("SELECT SUM(requests) FROM rollup_minute")[0][0] == 15
    assert not sealed_parts(journal_path(again))
    again.close()


def test_rows_left_in_a_journal_dir_the_operator_then_changed_are_still_stored(tmp_path):
    """Before: with rows waiting in `journal_dir` A, a restart with `journal_dir` B looked only in B and
    beside the store: A's rows were never stored, and nothing said so. The store's note says where the last
    run's journal was."""
    db = tmp_path / "fd.db"
    store = open_store(db)
    store.execute("PRAGMA query_only = ON")
    first = LedgerWriter(store, journal_dir=tmp_path / "a", flush_every_s=0.005)
    for i in range(3):
        first.put(row(i))
    assert first.close(0.1).counts.journaled == 3
    store.close()
    again = open_store(db)
    second = LedgerWriter(again, journal_dir=tmp_path / "b")
    assert second.replayed == 3
    second.close(5)
    assert {r["id"] for r in again.query("SELECT id FROM requests")} == {"s0", "s1", "s2"}
    assert not journal_path(again, tmp_path / "a").exists()
    # The note names only this store's journals: one pointing elsewhere is not read.
    Path(f"{db}-ledger.where").write_text(json.dumps([str(tmp_path / "theirs.jsonl"), "relative", 5]))
    (tmp_path / "theirs.jsonl").write_text(json.dumps(dataclasses.asdict(row(9))) + "\n")
    third = LedgerWriter(again, journal_dir=tmp_path / "b")
    assert third.replayed == 0
    third.close(5)
    again.close()
