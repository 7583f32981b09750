"""One meaning per flag: `--config` is the fleet config for every command and `--router-config` the router
config; every config a command reads is validated (one line, exit 2); read commands never create a store."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fleetdeck.cli import main
from store.db import open_store

ROUTER = """[pricing]
slm_gpu_hour_usd = 2.5
slm_gpus = 1

[[task]]
name = "t"
slm_base_url = "http://127.0.0.1:9/v1"
slm_model = "m"
threshold = 0.8
"""


def router_config(tmp: Path) -> Path:
    p = tmp / "router.toml"
    p.write_text(ROUTER)
    return p


def run_cli(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fleetdeck", *argv], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


@pytest.mark.parametrize("spelling", ["global", "after"])
def test_a_router_config_given_as_config_prices_the_slm_with_a_deprecation_line(tmp_path, spelling):
    cfg, db = router_config(tmp_path), tmp_path / "fd.db"
    open_store(db).close()
    new = run_cli("report", "--json", "--router-config", str(cfg), "--store", str(db), cwd=tmp_path)
    assert new.returncode == 0 and new.stderr == "", new.stderr
    argv = (["--config", str(cfg), "report"] if spelling == "global" else ["report", "--config", str(cfg)])
    old = run_cli(*argv, "--json", "--store", str(db), cwd=tmp_path)
    assert old.returncode == 0
    assert old.stderr.strip().count("\n") == 0 and "deprecated" in old.stderr and "--router-config" in old.stderr
    doc, reference = json.loads(old.stdout), json.loads(new.stdout)
    assert doc["slm_gpu_hour_usd"] == reference["slm_gpu_hour_usd"] == 2.5  # never the $0 of no router config
    assert doc["slm_gpus"] == reference["slm_gpus"] == 1 and doc["slm_cost_usd"] > 0


def test_a_router_config_is_refused_as_the_fleet_config_of_a_command_that_reads_none(tmp_path, capsys):
    assert main(["gpus", "--simulated", "--config", str(router_config(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert "is a router config; --config takes the fleet config" in err and err.count("\n") == 1


def _missing(tmp: Path) -> tuple[str, str]:
    return str(tmp / "nope.toml"), "nope.toml: file not found"


def _malformed(tmp: Path) -> tuple[str, str]:
    (tmp / "bad.toml").write_text("refresh_s = [\n")
    return str(tmp / "bad.toml"), "bad.toml: not valid TOML"


def _mistyped(tmp: Path) -> tuple[str, str]:
    (tmp / "typed.toml").write_text('refresh_s = "fast"\n')
    return str(tmp / "typed.toml"), "refresh_s"


COMMANDS = {
    "gpus": ["gpus", "--simulated"],
    "serve-ls": ["serve", "ls"],
    "report": ["report"],
    "fit": ["fit", "Qwen/Qwen3-8B", "--gpu-memory-gib", "80"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("make", [_missing, _malformed, _mistyped], ids=["missing", "malformed", "mistyped"])
def test_every_command_validates_the_fleet_config_it_is_given(command, make, tmp_path):
    path, text = make(tmp_path)
    db = tmp_path / "fd.db"
    open_store(db).close()
    p = run_cli(*COMMANDS[command], "--config", path, "--store", str(db), cwd=tmp_path)
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert text in p.stderr and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr, p.stderr
    assert p.stdout == ""


READS = {
    "audit": ["audit"],
    "audit-verify": ["audit", "verify"],
    "report": ["report"],
    "serve-ls": ["serve", "ls"],
    "serve-show": ["serve", "show", "x"],
    "finetune-ls": ["finetune", "ls"],
    "history": ["adapters", "history", "t"],
    "whatif": ["whatif", "t"],
}


@pytest.mark.parametrize("command", list(READS))
def test_a_read_command_never_creates_the_store_it_is_pointed_at(command, tmp_path, capsys):
    typo = tmp_path / "fleetdek.db"
    extra = ["--router-config", str(router_config(tmp_path))] if command == "whatif" else []
    assert main([*READS[command], *extra, "--store", str(typo)]) == 2
    err = capsys.readouterr().err
    assert f"no store at {typo}" in err and err.count("\n") == 1, err
    assert not typo.exists()


def test_a_command_that_starts_work_may_create_the_store(tmp_path, capsys, monkeypatch):
    from engine.vllm import launcher
    from tests.helpers import FAKE_VLLM_CMD

    monkeypatch.setenv("FLEETDECK_VLLM", FAKE_VLLM_CMD)
    monkeypatch.setenv("FLEETDECK_SIM_START_DELAY", "0.1")
    prof = tmp_path / "q.toml"
    prof.write_text('name = "q"\nmodel = "Qwen/Qwen3-8B"\nmax_model_len = 8192\n')
    db = tmp_path / "new.db"
    assert main(["serve", "start", str(prof), "--gpus", "3", "--simulated", "--store", str(db)]) == 0, capsys.readouterr()
    assert db.exists()
    store = open_store(db)
    for rec in launcher.list_servers(store):
        launcher.stop(store, rec, timeout=5)


# -- smaller things ---------------------------------------------------------------------------------------------


def test_no_help_shows_argparses_suppress_marker():
    import argparse

    from fleetdeck.cli import build_parser

    def walk(parser: argparse.ArgumentParser):
        yield parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for child in action.choices.values():
                    yield from walk(child)

    parsers = list(walk(build_parser()))
    assert len(parsers) > 20  # every subcommand, nested ones included
    for parser in parsers:
        assert "SUPPRESS" not in parser.format_help(), parser.prog


def test_serve_start_dry_run_prints_the_command_without_vllm_installed(tmp_path, monkeypatch):
    monkeypatch.delenv("FLEETDECK_VLLM", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no `vllm` anywhere on it
    prof = tmp_path / "q.toml"
    prof.write_text('name = "q"\nmodel = "Qwen/Qwen3-8B"\nmax_model_len = 8192\nvllm_command = ["vllm-not-here"]\n')
    p = subprocess.run([sys.executable, "-m", "fleetdeck", "serve", "start", str(prof), "--gpus", "3", "--simulated",
                        "--dry-run", "--store", str(tmp_path / "fd.db")], capture_output=True, text=True, cwd=tmp_path,
                       timeout=120, env={**__import__("os").environ, "PATH": str(tmp_path)})
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("command: vllm-not-here serve Qwen/Qwen3-8B --host 127.0.0.1 --port 8000")
    assert "--max-model-len 8192" in p.stdout and "FITS" in p.stdout
    assert "'vllm-not-here' is not installed here" in p.stderr
    assert not (tmp_path / "fd.db").exists()


def test_whatif_says_when_a_drifting_task_is_priced_at_the_month_to_date_rate(tmp_path, capsys):
    from tests.helpers import router_history

    db, cfg = router_history(tmp_path)
    common = ["--router-config", str(cfg), "--store", str(db)]
    assert main(["whatif", "triage-alerts", *common, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["drifting"] is True and doc["priced_at"] == "the month-to-date escalation rate"
    assert doc["recent_escalation_rate"] > doc["current_escalation_rate"]
    assert doc["monthly_cost_at_recent_rate_usd"] > doc["monthly_cost_usd"]
    assert main(["whatif", "triage-alerts", *common]) == 0
    out = capsys.readouterr().out
    assert "triage-alerts is drifting" in out and "prices the month at the month-to-date rate" in out
    assert main(["whatif", "ticket-routing", *common, "--json"]) == 0  # not drifting: nothing to say
    doc = json.loads(capsys.readouterr().out)
    assert doc["drifting"] is False and doc["monthly_cost_at_recent_rate_usd"] is None


def test_proxy_takes_a_router_config_given_as_config_and_says_it_is_deprecated(tmp_path, capsys):
    # --port 0 stops it after the configs are read: the router config was read as one (the fleet config's
    # validation would have refused its [[task]] table).
    assert main(["proxy", "--config", str(router_config(tmp_path)), "--port", "0", "--store", str(tmp_path / "fd.db")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("fleetdeck proxy: deprecated: --config") and "--router-config" in err[0]
    assert err[1] == "fleetdeck proxy: --port must be 1-65535"


def test_a_router_config_that_does_not_validate_is_one_line(tmp_path, capsys):
    bad = tmp_path / "router.toml"
    bad.write_text('[pricing]\nslm_gpus = "two"\n\n[[task]]\nname = "t"\nslm_base_url = "http://x/v1"\nslm_model = "m"\n'
                   'threshold = 2\n')
    db = tmp_path / "fd.db"
    open_store(db).close()
    for argv in (["report"], ["whatif", "t"], ["proxy", "--port", "0"]):
        assert main([*argv, "--router-config", str(bad), "--store", str(db)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "router.toml: invalid configuration: " in err and "slm_gpus" in err, err


def test_the_deprecated_spelling_keeps_the_nodes_read_only_fleet_config(tmp_path, capsys, monkeypatch):
    """`--config router.toml` must not stand in for the node's fleet config: its read_only still refuses."""
    fleet = tmp_path / "fleet.toml"
    fleet.write_text("read_only = true\n")
    monkeypatch.setenv("FLEETDECK_CONFIG", str(fleet))
    cfg = router_config(tmp_path)
    (tmp_path / "eval.jsonl").write_text('{"messages": [{"role": "user", "content": "x"}], "expected": "y"}\n')
    code = main(["calibrate", "t", "--eval", str(tmp_path / "eval.jsonl"), "--apply", "--config", str(cfg),
                 "--store", str(tmp_path / "fd.db")])
    err = capsys.readouterr().err
    assert code == 2 and "read-only" in err, err
    assert cfg.read_text() == ROUTER  # nothing written


@pytest.mark.parametrize("argv, says", [(["serve", "ls"], "no servers"), (["finetune", "ls"], "no jobs"),
                                        (["adapters", "ls", "--json"], '"adapters": []')])
def test_listing_on_a_fresh_install_creates_no_store(argv, says, capsys):
    from store.paths import default_store_path

    assert main(argv) == 0
    assert says in capsys.readouterr().out
    assert not default_store_path().exists()
