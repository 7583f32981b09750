"""The audit trail attacked from outside the store's SQL, and used clumsily: a writer killed mid-append,
writers racing from several processes, a key or checkpoint that is not private to fleetdeck (wrong mode,
another owner, a symlink planted at its path), a full disk, and hostile text in every field of a record
as `fleetdeck audit` prints it. Each case goes through the CLI's main() or a real process.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import stat
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.audit import chain
from engine.audit import trail as audit
from engine.audit.anchor import Anchor
from engine.audit.text import unstored
from fleetdeck.cli import main
from store.db import open_store

REPO = Path(__file__).resolve().parent.parent
NOBODY = 65534


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "XDG_STATE_HOME": str(tmp_path / "state"),
            "XDG_CONFIG_HOME": str(tmp_path / "config"), "XDG_DATA_HOME": str(tmp_path / "data")}


@pytest.fixture
def db(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    path = tmp_path / "fd.db"
    store = open_store(path)
    for i in range(3):
        audit.append(store, "server.stop", f"s{i}", "done", params={"server": f"s{i}"})
    store.close()
    return path


def _verify(db: Path, capsys, *extra: str) -> tuple[int, str]:
    rc = main(["audit", "verify", "--store", str(db), *extra])
    out = capsys.readouterr()
    return rc, out.out + out.err


def _count(db: Path) -> int:
    store = open_store(db)
    try:
        return int(store.execute("SELECT count(*) FROM audit")[0][0])
    finally:
        store.close()


# -- a writer killed mid-append ------------------------------------------------------------------------
# The child appends one record and is SIGKILLed at a chosen point: replacing the checkpoint (the record is
# committed), or committing the SQLite transaction (nothing is committed).
_KILL_AT_CHECKPOINT = """
import os, signal, sys
from engine.audit import trail as audit
from store.db import open_store
real = os.replace
def dying(src, dst, *a, **k):
    if str(dst).endswith(".checkpoint"):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst, *a, **k)
os.replace = dying
store = open_store(sys.argv[1])
audit.append(store, "server.stop", "killed", "done", params={"server": "killed"})
"""

_KILL_AT_COMMIT = """
import os, signal, sys
from contextlib import contextmanager
from engine.audit import trail as audit
from store.db import Store, open_store
@contextmanager
def dying(self):
    with self.lock:
        self.conn.execute("BEGIN IMMEDIATE")
        yield self.conn
        os.kill(os.getpid(), signal.SIGKILL)  # everything written and prepared, nothing committed
Store.transaction = dying
store = open_store(sys.argv[1])
audit.append(store, "server.stop", "killed", "done", params={"server": "killed"})
"""


def _killed(tmp_path: Path, db: Path, script: str) -> None:
    proc = subprocess.run([sys.executable, "-c", script, str(db)], env=_env(tmp_path), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr


def test_a_writer_killed_between_commit_and_checkpoint_is_no_false_alarm(db, tmp_path, capsys):
    _killed(tmp_path, db, _KILL_AT_CHECKPOINT)
    assert _count(db) == 4  # the record was committed
    rc, out = _verify(db, capsys)
    assert rc == 0 and out.startswith("intact: 4 record(s)") and "last record 4 anchored" in out, out
    # and the next writer neither complains nor leaves a note that verify repeats for ever
    store = open_store(db)
    audit.append(store, "server.stop", "next", "done", params={"server": "next"})
    store.close()
    rc, out = _verify(db, capsys)
    assert rc == 0 and "last record 5 anchored" in out, out


def test_a_writer_killed_before_its_commit_is_no_false_alarm(db, tmp_path, capsys):
    _killed(tmp_path, db, _KILL_AT_COMMIT)
    assert _count(db) == 3  # nothing was committed
    rc, out = _verify(db, capsys)
    assert rc == 0 and out.startswith("intact: 3 record(s)"), out
    store = open_store(db)
    audit.append(store, "server.stop", "next", "done", params={"server": "next"})
    store.close()
    rc, out = _verify(db, capsys)
    assert rc == 0 and "last record 4 anchored" in out, out


def test_after_a_killed_writer_a_deleted_tail_is_still_found(db, tmp_path, capsys):
    """The intent a dead writer left does not excuse anything else: its record deleted and another one
    before it too is still a deleted tail."""
    _killed(tmp_path, db, _KILL_AT_CHECKPOINT)
    import sqlite3

    conn = sqlite3.connect(db)
    conn.execute("DROP TRIGGER IF EXISTS audit_no_delete")
    conn.execute("DELETE FROM audit WHERE seq >= 3")
    conn.commit()
    conn.close()
    rc, out = _verify(db, capsys)
    assert rc == 1 and out.startswith("BROKEN: ") and "record 3" in out, out


def test_a_forged_record_is_not_excused_by_a_dead_writer_s_intent(db, tmp_path, capsys):
    """With the key, a record forged in place of the one a killed writer committed does not match the
    intent it left (its MAC is another), so it is reported."""
    _killed(tmp_path, db, _KILL_AT_CHECKPOINT)
    import sqlite3

    anchor = Anchor.of(db)
    key = anchor.key(create=False)
    rows = [dict(r) for r in _rows(db)]
    forged = {k: v for k, v in rows[-1].items() if k not in ("seq", "hash")}
    forged["target"] = "forged"
    forged["hash"] = chain.keyed_hash(key, forged["prev_hash"], forged)
    conn = sqlite3.connect(db)
    conn.execute("DROP TRIGGER IF EXISTS audit_no_update")
    conn.execute("UPDATE audit SET target = ?, hash = ? WHERE seq = 4", (forged["target"], forged["hash"]))
    conn.commit()
    conn.close()
    rc, out = _verify(db, capsys)
    assert rc == 1 and "record 4" in out, out


def _rows(db: Path) -> list:
    import sqlite3

    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return list(conn.execute("SELECT * FROM audit ORDER BY seq"))
    finally:
        conn.close()


# -- writers racing: two CLI processes and an agent --------------------------------------------------
_CLI_LOOP = """
import sys
from fleetdeck.cli import main
db, cfg, tag, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
for i in range(n):
    extra = ["--read-only"] if i % 2 else []
    rc = main(["serve", "stop", f"{tag}-{i}", "--store", db, "--config", cfg, *extra])
    assert rc == 2, rc
"""


def test_concurrent_writers_never_make_the_checkpoint_disagree(tmp_path, monkeypatch, capsys):
    from engine.nodes.agent import Agent
    from fleet.simulated import demo_fleet
    from tests.helpers import Pipe

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    db = tmp_path / "fd.db"
    cfg = tmp_path / "fleet.toml"
    cfg.write_text("")
    open_store(db).close()
    n = 6
    procs = [subprocess.Popen([sys.executable, "-c", _CLI_LOOP, str(db), str(cfg), tag, str(n)],
                              env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for tag in ("a", "b")]
    with audit.session(db, "agent"):
        pipe = Pipe(Agent(demo_fleet()[0], db, [], "9.9", interval_s=0.5))
        pipe.next("hello")
        for i in range(n):
            pipe.send({"v": 2, "type": "request", "id": i, "op": "stop_server", "args": {"id": f"agent-{i}"},
                       "operator": "alice@dash"})
            while (msg := pipe.next("response", timeout=120))["id"] != i:
                pass
            assert not msg["ok"], msg
        pipe.close()
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out
    assert _count(db) == 3 * n
    rc, out = _verify(db, capsys)
    assert rc == 0 and f"last record {3 * n} anchored" in out, out


# -- the key and the checkpoint must be fleetdeck's own ------------------------------------------------
def _cli_action(db: Path, capsys) -> tuple[int, str]:
    rc = main(["serve", "stop", "nope", "--store", str(db)])
    out = capsys.readouterr()
    return rc, out.out + out.err


@pytest.mark.parametrize("case", ["key-world-readable", "key-other-owner", "key-symlink", "checkpoint-writable",
                                  "checkpoint-other-owner", "checkpoint-symlink", "folder-other-owner",
                                  "folder-writable"])
def test_a_key_or_checkpoint_that_is_not_private_is_refused_and_named(db, tmp_path, capsys, case):
    anchor = Anchor.of(db)
    before = _count(db)
    what, _, how = case.partition("-")
    path = {"key": anchor.key_file, "checkpoint": anchor.checkpoint_file, "folder": anchor.key_file.parent}[what]
    if how == "world-readable":
        path.chmod(0o644)
    elif how == "writable":
        # A folder others could write is refused, not quietly chmodded back to 0700 by the writer's lock:
        # whoever could write it may already have swapped the key or checkpoint in it.
        path.chmod(0o777 if what == "folder" else 0o666)
    elif how == "other-owner":
        os.chown(path, NOBODY, NOBODY)
    else:  # an attacker's file at the path: a key they know, a checkpoint they write
        planted = tmp_path / f"planted-{what}"
        shutil.copy(path, planted)
        planted.chmod(0o600)
        path.unlink()
        path.symlink_to(planted)
    rc, out = _cli_action(db, capsys)  # a refusal: its record is not written with what others control
    assert rc == 2 and "not written" in out and str(path) in out and "Traceback" not in out, out
    with audit.session(db, "cli"), pytest.raises(audit.AuditUnavailable, match="its audit record cannot be written"):
        audit.check_writable("server.stop", "s1", server="s1")  # an action: refused before it happens
    assert _count(db) == before  # no record written with a key or checkpoint someone else controls
    rc, out = _verify(db, capsys)
    assert rc == 1 and out.startswith("BROKEN: ") and str(path) in out, out


# -- a full disk ---------------------------------------------------------------------------------------
@pytest.fixture
def tiny_fs(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a size-limited tmpfs")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_refuses_the_action_with_one_line_and_loses_no_record(tiny_fs, monkeypatch, capsys):
    monkeypatch.setenv("XDG_STATE_HOME", str(tiny_fs / "state"))
    db = tiny_fs / "fd.db"
    store = open_store(db)
    audit.append(store, "server.stop", "before", "done", params={"server": "before"})
    store.close()
    filler = tiny_fs / "filler"
    fd = os.open(filler, os.O_CREAT | os.O_WRONLY, 0o600)
    try:  # fill the filesystem to the last block
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    for _ in range(3):
        rc = main(["serve", "stop", "nope", "--store", str(db)])
        out = capsys.readouterr()
        text = out.out + out.err
        assert rc == 2 and "Traceback" not in text, text
    with audit.session(db, "cli"), pytest.raises(audit.AuditUnavailable, match="its audit record cannot be written"):
        audit.check_writable("server.stop", "s1", server="s1")  # an action would not happen
    capsys.readouterr()
    filler.unlink()
    rc, out = _verify(db, capsys)
    assert rc == 0 and out.startswith("intact: "), out


# -- hostile text in every field, as printed -----------------------------------------------------------
ODD = st.text(st.characters(codec=None, categories=("Cc", "Cf", "Cs", "Zl", "Zp", "Zs", "Mn", "Co", "Lo", "Ll", "Ps", "Pe", "Po", "Sm")),
              max_size=40)
FIELDS = ("actor", "origin", "on_behalf_of", "key_fingerprint", "node", "source", "target", "reason", "profile")
_ACTING = ("Cc", "Cf", "Cs", "Zl", "Zp")
_SERIAL = itertools.count()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.fixed_dictionaries({f: ODD for f in FIELDS}))
def test_any_value_in_any_field_is_printed_inert_and_exact_in_json(tmp_path, capsys, values):
    db = tmp_path / f"odd-{next(_SERIAL)}.db"
    key = tmp_path / "odd.key"
    store = open_store(db)
    anchor = Anchor.of(db, key)
    who = {k: values[k] for k in ("actor", "origin", "on_behalf_of", "key_fingerprint")}
    audit.append(store, "server.start", values["target"], "refused", values["reason"] or "r", source=values["source"],
                 node=values["node"], params={"profile": values["profile"]}, who=who, anchor=anchor)
    store.close()
    assert main(["audit", "--store", str(db)]) == 0
    out = capsys.readouterr()
    table = out.out
    assert not [c for c in table if c != "\n" and unicodedata.category(c) in _ACTING], repr(table)
    assert len(table.splitlines()) == 2, table  # the header and one record: no forged line
    assert main(["audit", "--json", "--store", str(db)]) == 0
    (rec,) = json.loads(capsys.readouterr().out)
    for f in FIELDS[:-1]:
        got = rec[f]
        if f in ("reason", "node") and not values[f]:  # no reason given; no node: this host's name
            continue
        assert unstored(got) == values[f] or (got is None and not values[f]), (f, got, values[f])
    assert unstored(rec["params"]["profile"]) == values["profile"]
    assert main(["audit", "verify", "--store", str(db), "--key", str(key)]) == 0
    capsys.readouterr()


# -- a writer stopped while holding the audit lock -----------------------------------------------------
def test_a_writer_stuck_holding_the_audit_lock_makes_actions_fail_closed_not_hang(db, monkeypatch, capsys):
    """A fleetdeck process suspended (Ctrl-Z) or hung mid-append holds the checkpoint's lock: every other
    writer and verify give up after the wait with a line naming the lock and its holder, instead of
    hanging for ever (the wait set to nothing here, so the test does not depend on time)."""
    import fcntl

    from engine.audit import anchor as audit_anchor

    monkeypatch.setattr(audit_anchor, "LOCK_WAIT_S", 0.0)
    anchor = Anchor.of(db)
    fd = os.open(anchor.lock_file, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.pwrite(fd, b"4242\n", 0)
        with audit.session(db, "cli"), pytest.raises(audit.AuditUnavailable, match="held by process 4242"):
            audit.check_writable("server.stop", "s1", server="s1")
        capsys.readouterr()
        rc, out = _verify(db, capsys)
        assert rc == 1 and str(anchor.lock_file) in out and "Traceback" not in out, out
    finally:
        os.close(fd)
    assert _count(db) == 3  # nothing written while the lock was held
    rc, out = _verify(db, capsys)
    assert rc == 0 and "last record 3 anchored" in out, out


# -- values of the wrong type planted in the store -----------------------------------------------------
@pytest.mark.parametrize("column,value", [("actor", b"\xff\x1b[31m"), ("params", "{"), ("params", "[1]"),
                                          ("utc", None), ("outcome", None), ("ts", "yesterday"), ("ts", None),
                                          ("seq", "x"), ("hash", None), ("prev_hash", 7)],
                         ids=lambda v: repr(v)[:12])
def test_a_value_of_the_wrong_type_planted_in_the_store_is_named_not_a_traceback(db, capsys, column, value):
    """sqlite3 stores whatever it is given (a BLOB, a NULL, text in a number's column; the table rebuilt
    without its constraints first): `audit verify` names record 2, and listing (table and --json) still
    prints every record, one line each, never a traceback."""
    import sqlite3

    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE loose AS SELECT * FROM audit")  # no NOT NULL, no INTEGER PRIMARY KEY
    conn.execute("DROP TABLE audit")
    conn.execute("ALTER TABLE loose RENAME TO audit")
    conn.execute(f"UPDATE audit SET {column} = ? WHERE seq = 2", (value,))
    conn.commit()
    conn.close()
    rc, out = _verify(db, capsys)
    assert rc == 1 and out.startswith("BROKEN: ") and "Traceback" not in out, out
    assert main(["audit", "--store", str(db)]) == 0
    out = capsys.readouterr()
    assert len(out.out.splitlines()) == 4 and "\x1b" not in out.out, out.out
    assert main(["audit", "--json", "--store", str(db)]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 3


async def test_the_audit_screen_lists_planted_values_of_the_wrong_type_and_says_broken(db):
    """The dashboard's Audit screen (key 7) survives what sqlite3 can plant: a NULL outcome and time, a
    BLOB actor, a seq repeated; every record listed, the verdict says the chain is broken."""
    import sqlite3

    from textual.widgets import DataTable, Static

    from tests.tui_helpers import make_app, open_screen, settle, static_text
    from tui.screens.audit import AuditScreen

    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE loose AS SELECT * FROM audit")
    conn.execute("DROP TABLE audit")
    conn.execute("ALTER TABLE loose RENAME TO audit")
    conn.execute("UPDATE audit SET outcome = NULL, utc = NULL, actor = ? WHERE seq = 2", (b"\x1b[31m",))
    conn.execute("UPDATE audit SET seq = 1 WHERE seq = 3")
    conn.commit()
    conn.close()
    app = make_app(store_path=db)
    async with app.run_test(size=(160, 24)) as pilot:
        screen = await open_screen(app, pilot, "7", AuditScreen)
        await settle(app, pilot)
        table = screen.query_one("#audit-table", DataTable)
        assert table.row_count == 3
        assert not any("\x1b" in str(c) for row in range(3) for c in table.get_row_at(row))
        assert "CHAIN BROKEN" in static_text(screen.query_one("#audit-verdict", Static))


def test_a_store_copied_to_another_host_points_at_its_key(db, tmp_path, monkeypatch, capsys):
    """A store carried to another host (or restored there) without its key and checkpoint: verify says
    the key is missing; written to there, the first record under the new host's key is named as written
    with another key. With the original's key and checkpoint named, the copy verifies."""
    original = Anchor.of(db)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    copy = elsewhere / "fd.db"
    shutil.copy(db, copy)
    monkeypatch.setenv("XDG_STATE_HOME", str(elsewhere / "state"))
    rc, out = _verify(copy, capsys, "--key", str(original.key_file), "--checkpoint", str(original.checkpoint_file))
    assert rc == 0 and "last record 3 anchored" in out, out
    rc, out = _verify(copy, capsys)
    assert rc == 1 and "record 1" in out and "key" in out and "missing" in out, out
    store = open_store(copy)
    audit.append(store, "server.stop", "there", "done", params={"server": "there"})
    store.close()
    rc, out = _verify(copy, capsys)
    assert rc == 1 and "record 1 was written with another key" in out and "from record 4 on with" in out, out


# -- `fleetdeck audit anchor`: the operator accepts the head after a cause they know ------------------
def _anchor_cli(db: Path, capsys, *extra: str) -> tuple[int, str]:
    rc = main(["audit", "anchor", "--store", str(db), *extra])
    out = capsys.readouterr()
    return rc, out.out + out.err


def test_audit_anchor_after_a_lost_checkpoint_is_recorded_and_verify_says_so(db, capsys):
    Anchor.of(db).checkpoint_file.unlink()  # lost with its disk, say
    store = open_store(db)
    audit.append(store, "server.stop", "after", "done", params={"server": "after"})  # noted for good
    store.close()
    rc, out = _verify(db, capsys)
    assert rc == 1 and "checkpoint was missing" in out, out
    rc, out = _anchor_cli(db, capsys)
    assert rc == 2 and "--reason" in out, out  # who and why, or nothing
    rc, out = _anchor_cli(db, capsys, "--reason", "state disk replaced\x1b[31m")
    assert rc == 0 and "re-anchored at record 5" in out, out
    rc, out = _verify(db, capsys)
    assert rc == 0 and "re-anchored at record 5" in out and "state disk replaced\\x1b[31m" in out, out
    assert "checkpoint then held record 4" in out and "notes cleared" in out, out
    (rec,) = [r for r in _rows(db) if r["action"] == "audit.anchor"]
    assert rec["outcome"] == "done" and rec["actor"] and rec["reason"] == "state disk replaced\x1b[31m"
    # what it found stays in the chain: deleting the tail after it is still found
    store = open_store(db)
    audit.append(store, "server.stop", "later", "done", params={"server": "later"})
    store.close()
    import sqlite3

    conn = sqlite3.connect(db)
    conn.execute("DROP TRIGGER IF EXISTS audit_no_delete")
    conn.execute("DELETE FROM audit WHERE seq = 6")
    conn.commit()
    conn.close()
    rc, out = _verify(db, capsys)
    assert rc == 1 and "record 6" in out, out


def test_audit_anchor_after_a_corrupt_checkpoint_lets_actions_happen_again(db, capsys):
    Anchor.of(db).checkpoint_file.write_text("{garbage")
    with audit.session(db, "cli"), pytest.raises(audit.AuditUnavailable):
        audit.check_writable("server.stop", "s1", server="s1")  # fail closed
    capsys.readouterr()
    rc, out = _anchor_cli(db, capsys, "--reason", "checkpoint corrupted by fsck")
    assert rc == 0 and "unreadable" in out, out
    with audit.session(db, "cli"):
        audit.check_writable("server.stop", "s1", server="s1")
    rc, out = _verify(db, capsys)
    assert rc == 0 and "re-anchored at record 4" in out, out


def test_audit_anchor_without_the_key_is_found(db, tmp_path, monkeypatch, capsys):
    """Someone who can write the store (and their own state folder) but not read the node's key: their
    re-anchoring is keyed with their own key, and verify with the node's key reports it."""
    node_key = Anchor.of(db).key_file
    import sqlite3

    conn = sqlite3.connect(db)
    conn.execute("DROP TRIGGER IF EXISTS audit_no_delete")
    conn.execute("DELETE FROM audit WHERE seq = 3")  # the tail they want gone
    conn.commit()
    conn.close()
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "attacker-state"))
    rc, out = _anchor_cli(db, capsys, "--reason", "nothing to see")
    assert rc == 0, out
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    rc, out = _verify(db, capsys)
    assert rc == 1 and out.startswith("BROKEN: "), out
    assert Anchor.of(db).key_file == node_key


def test_audit_anchor_is_refused_and_recorded_when_read_only(db, capsys):
    rc, out = _anchor_cli(db, capsys, "--reason", "x", "--read-only")
    assert rc == 2 and "refused, fleetdeck is read-only" in out, out
    rec = _rows(db)[-1]
    assert (rec["action"], rec["outcome"]) == ("audit.anchor", "refused")
    rc, out = _verify(db, capsys)
    assert rc == 0 and "re-anchored" not in out, out


# -- read-only, through the real agent process --------------------------------------------------------
def test_a_read_only_agent_process_refuses_every_change_and_records_it(tmp_path):
    """`fleetdeck agent --stdio --read-only`, as ssh starts it: each mutating op answered with an error,
    recorded as refused on behalf of the dashboard, nothing started."""
    from engine.nodes.agent import MUTATING_OPS

    db = tmp_path / "fd.db"
    proc = subprocess.Popen([sys.executable, "-m", "fleetdeck", "agent", "--stdio", "--simulated", "--read-only",
                             "--store", str(db)], env=_env(tmp_path), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        for i, op in enumerate(MUTATING_OPS):
            proc.stdin.write(json.dumps({"v": 2, "type": "request", "id": i, "op": op, "operator": "eve@dash",
                                         "args": {"id": "x", "profile": "q", "spec": "sim", "gpus": [0]}}) + "\n")
        proc.stdin.flush()
        answers = {}
        for line in proc.stdout:
            msg = json.loads(line)
            if msg.get("type") == "response":
                answers[msg["id"]] = msg
                if len(answers) == len(MUTATING_OPS):
                    break
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert all(not a["ok"] for a in answers.values()), answers
    recs = [dict(r) for r in _rows(db)]
    assert sorted(r["action"] for r in recs) == sorted(MUTATING_OPS.values())
    assert all(r["outcome"] == "refused" and r["on_behalf_of"] == "eve@dash" and "read-only" in r["reason"]
               for r in recs), recs
    store = open_store(db)
    assert store.execute("SELECT count(*) FROM managed")[0][0] == 0
    store.close()


# -- the checkpoint itself, rewritten by someone without the key ---------------------------------------
@pytest.mark.parametrize("where", ["checkpoint", "intent"])
def test_a_checkpoint_or_intent_rewritten_without_the_key_to_hide_a_deleted_tail_is_found(db, capsys, where):
    """Someone who can write the store and the checkpoint's file (not read the key) deletes the last
    record and points the checkpoint (or plants an intent) at the one before: the checkpoint is keyed
    too, so theirs is named as not written with this node's key."""
    import sqlite3

    anchor = Anchor.of(db)
    second = _rows(db)[1]
    conn = sqlite3.connect(db)
    conn.execute("DROP TRIGGER IF EXISTS audit_no_delete")
    conn.execute("DELETE FROM audit WHERE seq = 3")
    conn.commit()
    conn.close()
    path = anchor.checkpoint_file if where == "checkpoint" else anchor.pending_file
    doc = json.loads(anchor.checkpoint_file.read_text())
    doc.update(seq=2, mac=second["hash"], notes=[])
    path.write_text(json.dumps(doc))
    path.chmod(0o600)
    rc, out = _verify(db, capsys)
    assert rc == 1 and out.startswith("BROKEN: ") and str(path) in out, out


# -- not a file where the lock goes (wt-books) ---------------------------------------------------------
@pytest.mark.parametrize("planted", ["fifo", "device"])
def test_a_fifo_or_device_at_the_locks_name_is_named_never_waited_on(db, tmp_path, capsys, planted):
    """Before: a FIFO at the checkpoint's lock made `audit verify` wait for ever (a read-only open of a FIFO
    waits for a writer). Now verify, and every writer, names the lock and goes on (verify in a process of its
    own, so a hang fails the test at the ceiling instead of hanging the run)."""
    anchor = Anchor.of(db)
    anchor.lock_file.unlink()
    if planted == "fifo":
        os.mkfifo(anchor.lock_file, 0o600)
    else:
        os.mknod(anchor.lock_file, 0o600 | stat.S_IFCHR, os.makedev(1, 3))  # /dev/null's numbers (root: CI's user)
    done = subprocess.run([sys.executable, "-m", "fleetdeck.cli", "audit", "verify", "--store", str(db)],
                          env=_env(tmp_path), capture_output=True, text=True, timeout=120)  # a ceiling: the hang
    out = done.stdout + done.stderr
    assert done.returncode == 1 and out.startswith("BROKEN: ") and str(anchor.lock_file) in out, out
    assert "not a regular file" in out and "Traceback" not in out
    with audit.session(db, "cli"), pytest.raises(audit.AuditUnavailable, match="not a regular file"):
        audit.check_writable("server.stop", "s1", server="s1")  # an action: refused, never through the FIFO
    capsys.readouterr()
    assert _count(db) == 3
    anchor.lock_file.unlink()  # the operator removes it, as the line says
    rc, out = _verify(db, capsys)
    assert rc == 0 and "last record 3 anchored" in out, out
