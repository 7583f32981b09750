"""The store: creation, permissions, refusals of files that are not ours, migrations, history tiers."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import stat
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest

from fleetdeck.cli import main
from store.db import APPLICATION_ID, StoreError, open_store
from store.gpu_history import downsample, history, record_samples
from store.schema import SCHEMA_VERSION
from fleet.model import GpuSnapshot


def test_a_new_store_is_private_wal_and_at_the_current_schema(tmp_path):
    path = tmp_path / "sub" / "fd.db"
    store = open_store(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert store.execute("PRAGMA journal_mode")[0][0] == "wal"
    assert store.execute("PRAGMA application_id")[0][0] == APPLICATION_ID
    assert store.schema_version() == SCHEMA_VERSION
    store.close()
    again = open_store(path)  # reopening migrates nothing and keeps working
    assert again.schema_version() == SCHEMA_VERSION


@pytest.mark.parametrize("sql", ["CREATE TABLE notes (x)", "PRAGMA user_version = 7"],
                         ids=["with-tables", "empty-with-header"])  # no application id either way
def test_an_sqlite_file_of_another_program_is_refused_and_left_untouched(tmp_path, sql):
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute(sql)
    conn.commit()
    conn.close()
    before = path.read_bytes()
    with pytest.raises(StoreError, match="another program"):
        open_store(path)
    assert path.read_bytes() == before


def test_a_file_that_is_not_sqlite_is_refused(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello, this is not a database\n" * 100)
    with pytest.raises(StoreError, match="not a fleetdeck store"):
        open_store(path)


def test_a_store_from_a_newer_fleetdeck_is_refused(tmp_path):
    path = tmp_path / "fd.db"
    open_store(path).close()
    conn = sqlite3.connect(path)
    conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION + 5,))
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="newer fleetdeck"):
        open_store(path)


def test_an_unusable_path_says_what_to_do(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match="--store"):
        open_store(blocker / "fd.db")
    with pytest.raises(StoreError, match="is a directory"):
        open_store(tmp_path)


def _gpu(util: float, used: int) -> GpuSnapshot:
    return GpuSnapshot(
        node="n", index=0, name="g", uuid="u", utilization_gpu_pct=util,
        memory_used_bytes=used, memory_total_bytes=1000,
    )


def test_history_is_averaged_into_coarser_rows_as_it_ages(tmp_path):
    store = open_store(tmp_path / "fd.db")
    now = 3600 * 3000.0  # on a bucket edge of every tier
    # Two hours of samples every 5 s: the older hour becomes one-minute averages.
    for i in range(0, 7200, 5):
        ts = now - 7200 + i
        record_samples(store, ts, [_gpu(util=50 + (i // 5) % 2 * 10, used=100)])
    assert store.execute("SELECT count(*) FROM gpu_samples")[0][0] == 1440
    removed = downsample(store, now)
    raw = store.execute("SELECT count(*) FROM gpu_samples WHERE res = 0")[0][0]
    minute = store.query("SELECT ts, util_pct FROM gpu_samples WHERE res = 60 ORDER BY ts")
    assert raw == 720  # the last hour stays raw
    assert len(minute) == 60
    assert all(row["util_pct"] == pytest.approx(55.0) for row in minute)  # 50/60 alternating
    assert removed == 720 - 60
    assert downsample(store, now) == 0  # averaging is idempotent
    assert len(history(store, "n", "u", now - 600)) == 120


def test_history_past_retention_is_deleted(tmp_path):
    store = open_store(tmp_path / "fd.db")
    now = 3600 * 30000.0
    record_samples(store, now - 91 * 86400, [_gpu(10, 1)])
    record_samples(store, now - 8 * 86400, [_gpu(10, 1)])
    downsample(store, now)
    rows = store.query("SELECT res FROM gpu_samples")
    assert [r["res"] for r in rows] == [3600]


def test_run_state_kept_in_the_spec_by_older_stores_moves_to_its_own_columns(tmp_path, monkeypatch):
    """Schema 9: a job's folder, Slurm's hold and what it produced leave the spec (what was asked)."""
    import json

    import store.db as db
    from engine.finetune import jobs
    from engine.vllm import launcher

    path = tmp_path / "fd.db"
    monkeypatch.setattr(db, "SCHEMA_VERSION", 8)
    old = open_store(path)
    slurm = {"id": "17", "options": ["sbatch", "--gres=gpu:1"], "state": "COMPLETED", "conf": "/etc/slurm/slurm.conf",
             "bin_dir": None, "node": "gpu-3", "host": "10.0.0.3"}
    common = {"name": "t", "node": "n", "pid": None, "create_time": None, "argv": "[]", "env": "{}", "gpus": "0",
              "port": None, "log_path": "/x.log", "reason": None, "started_at": 1.0}
    old.db["managed"].insert_all([
        {**common, "kind": "job", "id": "ft-1", "state": "finished",
         "spec": json.dumps({"name": "t", "lora_rank": 16, "_workdir": "/jobs/ft-1", "_slurm": slurm,
                             "_adapter_path": "/adapters/t@v1", "_final_loss": 0.25, "_gpu_peak_reserved_bytes": 7})},
        {**common, "kind": "server", "id": "q-1", "state": "ready", "port": 8000,
         "spec": json.dumps({"model": "m", "_slurm": slurm})},
    ])
    old.close()
    monkeypatch.undo()
    store = open_store(path)
    assert store.schema_version() == SCHEMA_VERSION
    (job,) = jobs.list_jobs(store)
    assert job.spec == {"name": "t", "lora_rank": 16}
    assert (job.workdir, job.slurm.id, job.slurm.node) == ("/jobs/ft-1", "17", "gpu-3")
    assert (job.outputs.adapter_path, job.outputs.final_loss, job.outputs.gpu_peak_reserved_bytes) == ("/adapters/t@v1", 0.25, 7)
    (server,) = launcher.list_servers(store)
    assert server.spec == {"model": "m"} and server.base_url == "http://10.0.0.3:8000"
    assert json.loads(json.dumps(job.to_json()))["slurm"]["options"] == ["sbatch", "--gres=gpu:1"]


def test_every_environment_override_is_read_in_one_place(tmp_path, monkeypatch):
    from engine.vllm.command import vllm_command
    from engine.vllm.profile import Profile, profile_roots
    from store import paths

    for name in ("STORE", "CONFIG", "ROUTER_CONFIG", "PROFILES", "VLLM"):
        monkeypatch.setenv(f"FLEETDECK_{name}", "")  # empty is unset: the defaults apply
    assert paths.default_store_path().name == "fleetdeck.db" and paths.default_router_config().name == "router.toml"
    monkeypatch.setenv("FLEETDECK_STORE", str(tmp_path / "s.db"))
    monkeypatch.setenv("FLEETDECK_CONFIG", str(tmp_path / "f.toml"))
    monkeypatch.setenv("FLEETDECK_ROUTER_CONFIG", str(tmp_path / "r.toml"))
    monkeypatch.setenv("FLEETDECK_PROFILES", f"{tmp_path / 'a'}:{tmp_path / 'b'}")
    monkeypatch.setenv("FLEETDECK_VLLM", "/bin/echo serve-it")
    assert (paths.default_store_path(), paths.default_fleet_config(), paths.default_router_config()) == (
        tmp_path / "s.db", tmp_path / "f.toml", tmp_path / "r.toml")
    assert profile_roots()[:2] == [tmp_path / "a", tmp_path / "b"]
    assert vllm_command(Profile(name="p", model="m")) == ["/bin/echo", "serve-it"]


# -- a file is identified before anything about it changes ------------------------------------------------
def _foreign_sqlite(path, wal: bool) -> None:
    conn = sqlite3.connect(path)
    if wal:
        conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("CREATE TABLE notes (x)")
    conn.commit()
    conn.close()


@pytest.mark.parametrize("kind", ["text", "sqlite", "sqlite-wal", "short"])
def test_a_foreign_file_keeps_its_mode_and_content(tmp_path, kind, capsys):
    path = tmp_path / "passwd"
    if kind == "text":
        path.write_text("root:x:0:0:root:/root:/bin/bash\n")
    elif kind == "short":
        path.write_bytes(b"SQLite format 3\x00")  # the magic, and nothing after it
    else:
        _foreign_sqlite(path, wal=kind == "sqlite-wal")
    path.chmod(0o644)
    before, files = path.read_bytes(), sorted(tmp_path.iterdir())
    with pytest.raises(StoreError, match="untouched"):
        open_store(path)
    assert main(["serve", "ls", "--store", str(path)]) == 2  # `--store FILE` on the command line, the same
    assert "untouched" in capsys.readouterr().err
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert path.read_bytes() == before
    assert sorted(tmp_path.iterdir()) == files  # no -wal, -shm or journal made beside it


@pytest.mark.parametrize("journal", ["delete", "wal"])
def test_a_newer_schema_store_is_refused_with_its_bytes_and_mode_unchanged(tmp_path, journal):
    path = tmp_path / "fd.db"
    open_store(path).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA journal_mode = {journal}")  # a newer fleetdeck may keep it in another journal mode
    conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION + 1,))
    conn.commit()
    conn.close()
    path.chmod(0o640)
    before = path.read_bytes()
    with pytest.raises(StoreError, match="newer fleetdeck"):
        open_store(path)
    assert path.read_bytes() == before  # journal mode (header bytes 18-19) included
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    # Before: the refusal left a -wal and a -shm beside it (made by the mode=ro look at its schema); run as
    # root on a user's store, root's own, which then locked the user out of the store.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fd.db"]


def test_a_store_held_here_is_never_reopened_with_plain_open(tmp_path, monkeypatch):
    """Closing any descriptor of a file drops this process's POSIX locks on it, SQLite's included: a second
    Store on a file this process already holds identifies it through SQLite only."""
    import builtins

    import store.db as db

    path = tmp_path / "fd.db"
    first = open_store(path)
    opened: list[str] = []

    def spy(file, *a, **kw):
        opened.append(str(file))
        return builtins.open(file, *a, **kw)

    monkeypatch.setattr(db, "open", spy, raising=False)
    second = open_store(path)
    assert opened == []
    second.close()
    first.close()
    open_store(path).close()  # held by nobody now: its header is read again
    assert opened == [str(path)]


# -- a damaged store: one line that says so and what to do ---------------------------------------------------
def _store_with_data(path) -> None:
    import time

    from engine.audit import trail as audit
    from engine.router.demo import backfill
    from engine.managed import LocalGpus
    from engine.vllm.record import ServerRecord, ServerState

    store = open_store(path)
    backfill(store, time.time(), days=3, daily_only_days=5)
    for i in range(40):
        audit.append(store, "server.stop", f"srv-{i}", "done", params={"server": f"srv-{i}"})
        ServerRecord(id=f"q-{i:04d}", name="q", node="n", pid=None, create_time=None, argv=["vllm"], env={},
                     gpus=LocalGpus((0,)), port=18000 + i, log_path="/nonexistent.log", spec={}, state=ServerState.STOPPED, reason=None,
                     started_at=time.time()).save(store)
    store.close()


def _damage(path, table: str | None) -> None:
    """Overwrite the start of one b-tree page: the table's root, or (None) the schema's, on page 1 after the
    file header."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (table,)).fetchone()[0] if table else 1
    conn.close()
    with open(path, "r+b") as f:
        f.seek((root - 1) * page_size + (100 if root == 1 else 0))
        f.write(b"\xee" * 64)


DAMAGE = [  # (command, the table whose page is damaged: None is the schema, which every command reads)
    (["audit"], "audit"), (["serve", "ls"], "managed"), (["report"], "rollup_day"),
    (["audit"], None), (["serve", "ls"], None), (["report"], None), (["finetune", "ls"], None),
]


@pytest.mark.parametrize("argv,table", DAMAGE, ids=[f"{' '.join(a)}-{t or 'schema'}" for a, t in DAMAGE])
def test_a_damaged_store_gives_one_line_saying_what_to_do(tmp_path, capsys, argv, table):
    path = tmp_path / "fd.db"
    _store_with_data(path)
    _damage(path, table)
    capsys.readouterr()
    assert main([*argv, "--store", str(path)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.out, captured
    assert f"the store {path} is damaged" in lines[0] and "restore it from a backup" in lines[0].lower()
    assert f"sqlite3 {path} .recover" in lines[0]


def test_the_proxy_on_a_damaged_store_says_so_in_one_line(tmp_path):
    import os
    import subprocess
    import sys

    from engine.router.demo import free_port

    path = tmp_path / "fd.db"
    _store_with_data(path)
    _damage(path, None)
    cfg = tmp_path / "router.toml"
    cfg.write_text('[[task]]\nname = "t"\nslm_base_url = "http://127.0.0.1:1/v1"\nslm_model = "m"\nthreshold = 0.8\n')
    # The proxy refuses to start; the ceiling only keeps a regression from hanging the suite.
    done = subprocess.run([sys.executable, "-m", "fleetdeck", "proxy", "--router-config", str(cfg), "--store", str(path),
                           "--port", str(free_port())], capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert done.returncode == 2, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"the store {path} is damaged" in lines[0] and ".recover" in lines[0], done


def test_a_migration_another_process_applied_while_we_waited_is_not_applied_twice(tmp_path):
    # Two dashboards (or agents) opening the same new store at once: both read version 0, one takes the write
    # lock and migrates, the other gets the lock afterwards with its stale version in hand.
    from store.db import Store, _migrate

    path = tmp_path / "fd.db"
    open_store(path).close()
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    late = Store(path, conn)
    _migrate(late, 0)  # what the second opener does with the version it read before the first one migrated
    assert late.schema_version() == SCHEMA_VERSION
    assert conn.execute("SELECT COUNT(*) FROM schema_version").fetchone()[0] == SCHEMA_VERSION
    conn.close()


def _open_when_told(path: str, go: str) -> int:
    import os
    import time as _t

    while not os.path.exists(go):  # all start together (a file the parent creates), not at a time
        _t.sleep(0.001)
    store = open_store(__import__("pathlib").Path(path))
    version = store.schema_version()
    store.close()
    return version


def test_several_processes_opening_one_new_store_at_once_all_succeed(tmp_path):
    import concurrent.futures
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(4, mp_context=ctx) as pool:
        for round_ in range(3):
            path, go = tmp_path / f"fd{round_}.db", tmp_path / f"go{round_}"
            futures = [pool.submit(_open_when_told, str(path), str(go)) for _ in range(4)]
            go.touch()
            assert [f.result(timeout=120) for f in futures] == [SCHEMA_VERSION] * 4


def test_spec_folders_from_the_environment_are_searched_first(tmp_path, monkeypatch):
    from engine.finetune.spec import spec_roots

    monkeypatch.setenv("FLEETDECK_SPECS", f"{tmp_path / 'a'}:{tmp_path / 'b'}")
    assert spec_roots()[:2] == [tmp_path / "a", tmp_path / "b"]
    monkeypatch.setenv("FLEETDECK_SPECS", "")  # empty is unset
    assert tmp_path / "a" not in spec_roots()


# --- read-only opening, and a store changed outside fleetdeck (wt-books) ---------------------------------------


def _evidence(tmp_path: Path, journal: str = "delete") -> Path:
    """A store as an auditor receives a copy: another journal mode and mode 0644 than fleetdeck leaves."""
    path = tmp_path / "copy.db"
    store = open_store(path)
    store.execute("INSERT INTO schema_version (version) VALUES (-1)")  # something to read back
    store.close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA journal_mode = {journal}")
    conn.close()
    path.chmod(0o644)
    return path


def _fingerprint(path: Path) -> tuple[str, int, list[str]]:
    return (hashlib.sha256(path.read_bytes()).hexdigest(), stat.S_IMODE(path.stat().st_mode),
            sorted(p.name for p in path.parent.iterdir()))


@pytest.mark.parametrize("journal", ["delete", "wal"])
def test_a_read_only_open_changes_nothing_of_the_file_or_its_folder(tmp_path, journal, capsys, monkeypatch):
    """Before: every open, `audit verify`'s and `report`'s included, made the file 0600, switched it to WAL and
    wrote it (a verified copy no longer had the bytes it was handed with)."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    path = _evidence(tmp_path, journal)
    before = _fingerprint(path)
    for argv in (["audit", "verify"], ["--read-only", "audit"], ["report", "--json"]):
        assert main([*argv, "--store", str(path)]) == 0, capsys.readouterr()
        assert _fingerprint(path) == before, argv
    store = open_store(path, read_only=True)
    assert store.execute("SELECT count(*) FROM schema_version WHERE version = -1")[0][0] == 1
    with pytest.raises(sqlite3.OperationalError):
        store.execute("DELETE FROM schema_version")
    store.close()
    assert _fingerprint(path) == before  # no byte, mode, -wal or -shm


@contextmanager
def _read_only_mount(tmp_path: Path):
    mnt = tmp_path / "ro"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a tmpfs read-only (CI and this machine run tests as root)")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_store_on_a_read_only_mount_is_read_and_a_write_open_says_why_not(tmp_path, capsys):
    """Before: `audit verify`, `report` and every listing refused a store on read-only media ("not writable")."""
    with _read_only_mount(tmp_path) as mnt:
        store = open_store(tmp_path / "fd.db")
        store.execute("INSERT INTO schema_version (version) VALUES (-1)")
        store.close()
        (mnt / "fd.db").write_bytes((tmp_path / "fd.db").read_bytes())
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        db = mnt / "fd.db"
        ro = open_store(db, read_only=True)
        assert ro.execute("SELECT count(*) FROM schema_version WHERE version = -1")[0][0] == 1
        ro.close()
        assert main(["report", "--json", "--store", str(db)]) == 0
        assert main(["audit", "verify", "--store", str(db)]) == 0
        capsys.readouterr()
        assert main(["audit", "--store", str(db)]) == 0  # listed, not pruned (said), never refused
        err = capsys.readouterr().err
        assert "not pruned" in err and "not writable here" in err and "Traceback" not in err, err
        with pytest.raises(StoreError, match="not writable"):
            open_store(db)


def test_a_read_only_open_refuses_what_it_cannot_read_as_ours_in_one_line(tmp_path):
    with pytest.raises(StoreError, match="no store at"):
        open_store(tmp_path / "absent.db", read_only=True)
    (tmp_path / "empty.db").touch()
    with pytest.raises(StoreError, match="empty file"):
        open_store(tmp_path / "empty.db", read_only=True)
    old = tmp_path / "old.db"
    open_store(old).close()
    conn = sqlite3.connect(old)
    conn.execute("DELETE FROM schema_version WHERE version > 7")
    conn.commit()
    conn.close()
    before = _fingerprint(old)
    with pytest.raises(StoreError, match=f"schema 7, older than this fleetdeck's {SCHEMA_VERSION}"):
        open_store(old, read_only=True)
    open_store(old, read_only=True, oldest=7).close()  # a reader that needs only what schema 7 has
    assert _fingerprint(old) == before


DROPS = {"requests": "DROP TABLE requests", "audit": "DROP TABLE audit",
         "column": "ALTER TABLE requests DROP COLUMN slm_bound"}


@pytest.mark.parametrize("drop", list(DROPS))
def test_a_store_missing_a_table_or_column_of_its_schema_gets_one_line_not_a_traceback(tmp_path, capsys, drop):
    """Before: `fleetdeck audit` and `audit verify` on a store whose audit table was dropped ended in SQLite's
    "no such table" traceback, and a proxy on a store without `requests` held every row for ever."""
    db = tmp_path / "fd.db"
    open_store(db).close()
    conn = sqlite3.connect(db)
    conn.execute(DROPS[drop])
    conn.commit()
    conn.close()
    for argv in (["report"], ["serve", "ls"], ["audit"]):
        assert main([*argv, "--store", str(db)]) == 2, argv
        err = capsys.readouterr().err
        assert "changed outside fleetdeck" in err and err.count("\n") == 1 and "Traceback" not in err, err
    rc = main(["audit", "verify", "--store", str(db)])
    out = capsys.readouterr().out
    if drop == "audit":  # the trail's own table gone: what verify is for
        assert rc == 1 and out.startswith("BROKEN: ") and "no table audit" in out, out
    else:  # the trail is whole: verify checks it, whatever else was dropped
        assert rc == 0 and out.startswith("intact: "), out
    with pytest.raises(StoreError, match="changed outside fleetdeck"):
        open_store(db)


def test_report_on_a_store_of_an_older_schema_still_reports_after_migrating_it(tmp_path, capsys):
    """`report` reads without writing, except on a store an older fleetdeck wrote (the first command after an
    upgrade, a cron job say): that one is migrated, as every command does, rather than refused."""
    import sqlite_utils

    from store.db import APPLICATION_ID
    from store.schema import MIGRATIONS

    old = tmp_path / "old.db"
    conn = sqlite3.connect(old, isolation_level=None)
    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    conn.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at TEXT DEFAULT CURRENT_TIMESTAMP)")
    for version in range(1, SCHEMA_VERSION):  # the store as the fleetdeck before this one left it
        MIGRATIONS[version](sqlite_utils.Database(conn))
        conn.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
    conn.close()
    with pytest.raises(StoreError, match="older than this fleetdeck's"):
        open_store(old, read_only=True)
    assert main(["report", "--json", "--store", str(old)]) == 0, capsys.readouterr()
    assert open_store(old, read_only=True).schema_version() == SCHEMA_VERSION
