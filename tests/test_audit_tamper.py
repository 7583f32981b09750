"""The audit chain under attack, through `fleetdeck audit verify` (main(), as the CLI runs it).

Each case is what someone with write access to the store (and, where said, the key or the checkpoint)
can do with sqlite3 and a copy of the file; each must end in exit 1 with the first bad record named.
Plus: a store from before the key keeps verifying (its records flagged unkeyed), and any text, however
odd, round-trips into a record while the chain stays intact (Hypothesis).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import shutil
import sqlite3
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.audit import chain
from engine.audit import trail as audit
from engine.audit.anchor import Anchor
from engine.audit.text import LIMIT, MARK, stored, unstored
from fleetdeck.cli import main
from store.db import open_store

N = 6


def _trail(db: Path, n: int = N, start: int = 0) -> None:
    store = open_store(db)
    for i in range(start, start + n):
        audit.append(store, "server.stop", f"s{i}", "done", params={"server": f"s{i}"})
    store.close()


def _sql(db: Path, *statements: str, params: tuple = ()) -> None:
    """sqlite3 on the file, around fleetdeck: the triggers dropped first, as an attacker would."""
    conn = sqlite3.connect(db)
    for trigger in ("audit_no_update", "audit_no_delete"):
        conn.execute(f"DROP TRIGGER IF EXISTS {trigger}")
    for sql in statements:
        conn.execute(sql, params if "?" in sql else ())
    conn.commit()
    conn.close()


def _rows(db: Path) -> list[dict]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    rows = [dict(r) for r in conn.execute("SELECT * FROM audit ORDER BY seq")]
    conn.close()
    return rows


def _rewrite(db: Path, rows: list[dict]) -> None:
    conn = sqlite3.connect(db)
    conn.execute("DROP TRIGGER IF EXISTS audit_no_update")
    for r in rows:
        conn.execute("UPDATE audit SET target = ?, ts = ?, prev_hash = ?, hash = ? WHERE seq = ?",
                     (r["target"], r["ts"], r["prev_hash"], r["hash"], r["seq"]))
    conn.commit()
    conn.close()


def _verify(db: Path, capsys) -> tuple[int, str]:
    rc = main(["audit", "verify", "--store", str(db)])
    out = capsys.readouterr()
    return rc, out.out + out.err


def _broken(db: Path, capsys, seq: int, *words: str) -> str:
    rc, out = _verify(db, capsys)
    assert rc == 1 and out.startswith("BROKEN: ") and f"record {seq}" in out, out
    for w in words:
        assert w in out, out
    # --json names the same record
    assert main(["audit", "verify", "--json", "--store", str(db)]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False and doc["first_broken"] == seq, doc
    return out


@pytest.fixture
def db(tmp_path) -> Path:
    path = tmp_path / "fd.db"
    _trail(path)
    return path


def test_an_untouched_trail_verifies_and_its_head_is_anchored(db, capsys):
    rc, out = _verify(db, capsys)
    assert rc == 0 and out.startswith(f"intact: {N} record(s), chain intact") and f"last record {N} anchored" in out
    assert all(r["hash"].startswith("hmac1:") for r in _rows(db))
    key = Anchor.of(db).key_file
    assert key.stat().st_mode & 0o777 == 0o600 and Anchor.of(db).checkpoint_file.stat().st_mode & 0o777 == 0o600


def test_an_edited_field_is_found(db, capsys):
    _sql(db, "UPDATE audit SET outcome = 'refused' WHERE seq = 3")
    _broken(db, capsys, 3, "changed after it was written")


def test_a_deleted_middle_record_is_found(db, capsys):
    _sql(db, "DELETE FROM audit WHERE seq = 3")
    _broken(db, capsys, 4, "does not follow record 2")


def test_a_deleted_first_record_is_found(db, capsys):
    _sql(db, "DELETE FROM audit WHERE seq = 1")
    _broken(db, capsys, 2, "follows records that are gone", "no prune record")


def test_a_deleted_tail_is_found(db, capsys):
    _sql(db, f"DELETE FROM audit WHERE seq >= {N - 1}")
    _broken(db, capsys, N - 1, "missing", f"checkpoint holds record {N}", "rolled back or its tail deleted")


def test_a_forged_record_appended_without_the_key_is_found(db, capsys):
    last = _rows(db)[-1]
    forged = {**last, "seq": N + 1, "target": "s-forged", "prev_hash": last["hash"]}
    forged["hash"] = chain.plain_hash(forged["prev_hash"], forged)  # the old, unkeyed way: all one can do without it
    cols = list(forged)
    _sql(db, f"INSERT INTO audit ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
         params=tuple(forged[c] for c in cols))
    _broken(db, capsys, N + 1, "no MAC but follows keyed records")


def test_a_forged_record_with_a_guessed_key_is_found(db, capsys):
    last = _rows(db)[-1]
    kid = last["hash"].split(":")[1]  # the key's id is public; the key is not
    forged = {**last, "seq": N + 1, "target": "s-forged", "prev_hash": last["hash"]}
    body = b"fleetdeck-audit-1\0" + forged["prev_hash"].encode() + b"\0" + chain.canonical(forged)
    forged["hash"] = f"hmac1:{kid}:" + hmac.new(b"guess" * 8, body, hashlib.sha256).hexdigest()
    cols = list(forged)
    _sql(db, f"INSERT INTO audit ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
         params=tuple(forged[c] for c in cols))
    _broken(db, capsys, N + 1, "changed after it was written")


def test_a_forged_record_appended_with_the_key_is_found_by_the_checkpoint(db, capsys):
    """Store and key in the attacker's hands: the record verifies, but the checkpoint never saw it."""
    key = Anchor.of(db).key(create=False)
    last = _rows(db)[-1]
    forged = {**last, "seq": N + 1, "target": "s-forged", "prev_hash": last["hash"]}
    forged["hash"] = chain.keyed_hash(key, forged["prev_hash"], forged)
    cols = list(forged)
    _sql(db, f"INSERT INTO audit ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
         params=tuple(forged[c] for c in cols))
    _broken(db, capsys, N + 1, "appended without updating the checkpoint")


@pytest.mark.parametrize("start", [1, 3])
def test_hashes_recomputed_after_an_edit_without_the_key_are_found(db, capsys, start):
    rows = _rows(db)
    rows[start - 1]["target"] = "someone-else"
    prev = rows[start - 2]["hash"] if start > 1 else chain.GENESIS
    for r in rows[start - 1:]:
        r["prev_hash"] = prev
        r["hash"] = prev = chain.plain_hash(prev, r)
    _rewrite(db, rows)
    # From record 3: an unkeyed record after keyed ones. From record 1: every record unkeyed; the first was
    # written as the key was made (it cannot be told from a record of just before), the second is dated
    # after it (and the checkpoint holds another MAC).
    _broken(db, capsys, max(start, 2), "no MAC")


def test_hashes_recomputed_with_old_dates_are_still_found_by_the_checkpoint(db, capsys):
    rows = _rows(db)
    prev = chain.GENESIS
    for i, r in enumerate(rows):
        r["ts"] = 1_500_000_000.0 + i  # before any key existed
        r["prev_hash"] = prev
        r["hash"] = prev = chain.plain_hash(prev, r)
    _rewrite(db, rows)
    _broken(db, capsys, N, "not the one the checkpoint holds")


def test_a_prune_outside_the_retention_is_found(db, capsys):
    _sql(db, "INSERT INTO audit_prune (cutoff, at) VALUES (strftime('%s','now'), strftime('%s','now'))",
         "DELETE FROM audit WHERE seq < 4")
    _broken(db, capsys, 4, "younger than the retention")


def test_records_cut_past_the_last_prune_are_found(tmp_path, capsys):
    db = tmp_path / "fd.db"
    store = open_store(db)
    now = 2_000_000_000.0
    for i, age in enumerate((3000, 2500, 10, 5, 1)):
        audit.append(store, "job.cancel", f"j{i}", "done", ts=now - age * 86400)
    assert audit.prune(store, retention_days=6 * 365, now=now) == 2
    assert audit.verify(store, now=now).ok
    store.close()
    _sql(db, "DELETE FROM audit WHERE seq = 3")  # one more than the retention allowed
    verdict = audit.verify(open_store(db), now=now)
    assert not verdict.ok and verdict.first_broken == 4 and "kept every record from 3 on" in verdict.message


def test_a_store_rolled_back_to_an_older_copy_is_found(db, tmp_path, capsys):
    backup = tmp_path / "backup.db"
    shutil.copy(db, backup)  # closed stores are one file (the WAL checkpointed on close)
    _trail(db, 3, start=N)
    for side in ("-wal", "-shm"):
        Path(f"{db}{side}").unlink(missing_ok=True)
    shutil.copy(backup, db)
    _broken(db, capsys, N + 1, f"checkpoint holds record {N + 3}")
    # ... and written to again afterwards: the next writer notes it, and the note stays.
    _trail(db, 1, start=N + 3)
    _broken(db, capsys, N + 1, "were gone", "the checkpoint keeps it")


def test_a_deleted_checkpoint_is_found_and_stays_found(db, capsys):
    Anchor.of(db).checkpoint_file.unlink()
    _broken(db, capsys, N, "checkpoint", "is missing")
    _trail(db, 1, start=N)  # a later append makes a new checkpoint, noting the loss
    _broken(db, capsys, N, "was missing", "the checkpoint keeps it")


def test_a_deleted_key_is_found(db, capsys):
    Anchor.of(db).key_file.unlink()
    _broken(db, capsys, 1, "keyed but the audit key", "is missing")


def test_a_store_from_before_the_key_keeps_verifying_its_old_records_flagged_unkeyed(tmp_path, capsys):
    db = tmp_path / "old.db"
    store = open_store(db)
    prev = chain.GENESIS
    with store.transaction() as conn:  # what fleetdeck wrote before keys: plain SHA-256, a year ago
        for i in range(3):
            rec = audit._build("job.cancel", f"j{i}", "done", None, "cli", "n", {"job": f"j{i}"}, None,
                               1_700_000_000.0 + i)
            rec["prev_hash"] = prev
            rec["hash"] = chain.plain_hash(prev, rec)
            prev = rec["hash"]
            cols = list(rec)
            conn.execute(f"INSERT INTO audit ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                         [rec[c] for c in cols])
    rc, out = _verify(db, capsys)
    assert rc == 0 and "3 unkeyed" in out, out  # and no key was made by verifying
    assert not Anchor.of(db).key_file.exists()
    audit.append(store, "job.cancel", "j3", "done", params={"job": "j3"})
    store.close()
    rc, out = _verify(db, capsys)
    assert rc == 0 and "4 record(s), chain intact" in out and "3 unkeyed" in out, out
    _sql(db, "UPDATE audit SET target = 'x' WHERE seq = 2")  # an old record is still protected by its hash
    _broken(db, capsys, 2, "changed after it was written")


def test_a_copy_is_verified_with_the_original_s_checkpoint(db, tmp_path, capsys):
    copy = tmp_path / "copy.db"
    shutil.copy(db, copy)
    assert main(["audit", "verify", "--store", str(copy)]) == 1  # no checkpoint of its own
    capsys.readouterr()
    assert main(["audit", "verify", "--store", str(copy), "--checkpoint", str(Anchor.of(db).checkpoint_file)]) == 0


# -- any text ----------------------------------------------------------------------------------------
ODD = st.sampled_from(["\x00", "\x1b", "\x1b[31m", "\n", "\r", "\x7f", "\x85", "\u2028", "\u202e", "\\", "\\~",
                       MARK, "\\x00", "\ufeff", "é", "\U0001f600"])
SURROGATE = st.integers(0xD800, 0xDFFF).map(chr)
TEXT = st.lists(st.one_of(st.characters(), ODD, SURROGATE), max_size=40).map("".join)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(operator=TEXT, target=TEXT, profile=TEXT)
def test_any_text_round_trips_into_a_record_and_the_chain_stays_intact(tmp_path, operator, target, profile):
    db = tmp_path / "any.db"
    store = open_store(db)
    rec = audit.append(store, "server.start", target, "done", params={"profile": profile},
                       who={"on_behalf_of": operator, "actor": operator})
    (row,) = store.query("SELECT * FROM audit WHERE seq = ?", (rec["seq"],))
    for field, value in (("on_behalf_of", operator), ("actor", operator), ("target", target)):
        text = row[field]
        if value:
            assert unstored(text) == value and "\x00" not in text
            text.encode("utf-8")  # what SQLite holds is valid UTF-8
    assert unstored(json.loads(row["params"])["profile"]) == profile
    verdict = audit.verify(store)
    assert verdict.ok, verdict
    store.close()


def test_a_huge_value_is_cut_with_its_length_and_hash_kept():
    value = "x" * (LIMIT + 10_000) + "\udcff"
    kept = stored(value)
    assert kept.startswith(MARK) and len(kept) < LIMIT + 200
    assert "10001 more characters" in kept
    assert hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest() in kept
    assert unstored(kept) == value[:LIMIT]
