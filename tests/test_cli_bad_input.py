"""What each bad input on the command line gets: one line naming the problem and exit 2 (1 where the
command's answer is "no", as `fit` says DOES NOT FIT), never a traceback.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from fleetdeck.cli import main
from store.db import APPLICATION_ID


def _foreign_store(tmp: Path) -> str:
    c = sqlite3.connect(tmp / "foreign.db")
    c.execute("CREATE TABLE notes (a)")
    c.commit()
    c.close()
    return str(tmp / "foreign.db")


def _newer_store(tmp: Path) -> str:
    c = sqlite3.connect(tmp / "newer.db")
    c.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    c.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at TEXT)")
    c.execute("INSERT INTO schema_version (version) VALUES (99)")
    c.commit()
    c.close()
    return str(tmp / "newer.db")


def _model(tmp: Path, **cfg) -> str:
    folder = tmp / "model"
    folder.mkdir()
    base = {"model_type": "llama", "hidden_size": 4096, "num_attention_heads": 32, "num_hidden_layers": 2,
            "vocab_size": 1000, "intermediate_size": 11008}
    (folder / "config.json").write_text(json.dumps({**base, **cfg}))
    return str(folder)


def _bad_fleet(tmp: Path) -> str:
    (tmp / "fleet.toml").write_text("adapter_roots = 5\n")
    return str(tmp / "fleet.toml")


def _spec_with(tmp: Path, line: str) -> str:
    (tmp / "ds.jsonl").write_text(line + "\n")
    (tmp / "spec.toml").write_text('name = "t"\nbase_model = "base"\ndataset = "ds.jsonl"\nbackend = "simulated"\n')
    (tmp / "base").mkdir()
    return str(tmp / "spec.toml")


def _fifo(tmp: Path, name: str) -> str:
    """A named pipe nothing writes: reading it blocks for ever, so the command must refuse it unread."""
    import os

    os.mkfifo(tmp / name)
    return str(tmp / name)


def _spec_on(tmp: Path, dataset: str) -> str:
    (tmp / "spec.toml").write_text(f'name = "t"\nbase_model = "base"\ndataset = "{dataset}"\nbackend = "simulated"\n')
    (tmp / "base").mkdir()
    return str(tmp / "spec.toml")


CASES = [
    ("adapters-ls-config-is-a-pipe", lambda t: ["adapters", "ls", "--config", _fifo(t, "fleet.toml")], 2,
     "fleet.toml: it is not a regular file (a pipe, socket or device)"),
    ("adapters-ls-config-is-a-folder", lambda t: ["adapters", "ls", "--config", str(t)], 2, "it is a folder"),
    ("finetune-check-dataset-is-a-pipe", lambda t: ["finetune", "check", _spec_on(t, _fifo(t, "ds.jsonl"))], 1,
     "ds.jsonl: it is not a regular file"),
    ("finetune-check-dataset-is-dev-zero", lambda t: ["finetune", "check", _spec_on(t, "/dev/zero")], 1,
     "/dev/zero: it is not a regular file"),
    ("finetune-start-on-a-gpu-this-host-lacks", lambda t: ["finetune", "start", _spec_with(
        t, '{"instruction": "q", "output": "a"}'), "--gpus", "99", "--force", "--store", str(t / "fd.db")], 2, "no GPU [99] on"),
    ("finetune-spec-is-a-pipe", lambda t: ["finetune", "check", _fifo(t, "spec.toml")], 2, "spec.toml: it is not a regular file"),
    # (id, argv builder, exit code, text the error line carries)
    ("serve-ls-foreign-store", lambda t: ["serve", "ls", "--store", _foreign_store(t)], 2, "SQLite database of another program"),
    ("finetune-ls-foreign-store", lambda t: ["finetune", "ls", "--store", _foreign_store(t)], 2, "another program"),
    ("serve-ls-newer-store", lambda t: ["serve", "ls", "--store", _newer_store(t)], 2, "written by a newer fleetdeck"),
    ("finetune-ls-newer-store", lambda t: ["finetune", "ls", "--store", _newer_store(t)], 2, "newer fleetdeck"),
    ("adapters-ls-bad-config", lambda t: ["adapters", "ls", "--config", _bad_fleet(t)], 2, "adapter_roots"),
    ("fit-gib-nan", lambda t: ["fit", "Qwen/Qwen3-8B", "--gpu-memory-gib", "nan"], 2, "not a finite number"),
    ("fit-gib-inf", lambda t: ["fit", "Qwen/Qwen3-8B", "--gpu-memory-gib", "inf"], 2, "not a finite number"),
    ("fit-gib-negative", lambda t: ["fit", "Qwen/Qwen3-8B", "--gpu-memory-gib=-80"], 2, "above 0"),
    ("fit-util-above-1", lambda t: ["fit", "Qwen/Qwen3-8B", "--gpu-memory-gib", "80", "--util", "1.5"], 2, "at most 1"),
    ("fit-hidden-size-text", lambda t: ["fit", _model(t, hidden_size="big"), "--gpu-memory-gib", "80"], 2,
     "`hidden_size` must be a whole number"),
    ("fit-zero-kv-heads", lambda t: ["fit", _model(t, num_key_value_heads=0), "--gpu-memory-gib", "80"], 2,
     "`num_key_value_heads` must be a whole number from 1 to 16,777,216, got 0"),
    ("fit-config-not-an-object", lambda t: ["fit", _model(t, text_config=[1]), "--gpu-memory-gib", "80"], 2,
     "`text_config` must be an object, got [1]"),
    ("fit-tp-not-dividing-heads", lambda t: ["fit", _model(t), "--gpu-memory-gib", "80", "--tp", "3"], 1,
     "must be divisible by tensor parallel size (3)"),
    ("finetune-check-role-list", lambda t: ["finetune", "check", _spec_with(
        t, '{"messages":[{"role":["user"],"content":"x"},{"role":"assistant","content":"y"}]}')], 1, "unknown role ['user']"),
    ("finetune-check-huge-int", lambda t: ["finetune", "check", _spec_with(
        t, '{"messages":[{"role":"user","content":' + "9" * 5000 + '}]}')], 1, "line 1: invalid JSON (Exceeds the limit"),
    ("serve-stop-wildcard", lambda t: ["serve", "stop", "%", "--store", str(t / "fd.db")], 2, "no server '%'"),
    ("whatif-negative-percent", lambda t: ["whatif", "t", "--frontier-price-change", "-50%", "--config", str(t / "none.toml"),
                                           "--store", str(t / "fd.db")], 2, "none.toml: file not found"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_each_bad_input_gets_one_line_and_its_exit_code(case, tmp_path, capsys, monkeypatch):
    _, build, code, text = case
    monkeypatch.chdir(tmp_path)
    try:
        got = main(build(tmp_path))
    except SystemExit as exc:  # argparse's usage errors end the process the same way
        got = exc.code
    assert got == code
    captured = capsys.readouterr()
    out = captured.err + captured.out
    assert text in out, out
    assert "Traceback" not in out
