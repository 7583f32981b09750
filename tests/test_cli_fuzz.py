"""Every command of the CLI, attacked as a clumsy operator (or a script gone wrong) would: each subcommand with
its positionals and any of its options given values of every kind (empty, spaces, options where values go,
negative and 30-digit numbers, `nan`, paths out of every folder, shell syntax, escape sequences, another
node's ids, 5,000 characters). The answer is an exit code (0, 1 for "no", 2 for refused, 3 for `report`'s
drift) and words for the operator, never a traceback and never an exception out of main().

Left out: the commands that run until stopped or reach beyond this host (demo, demo-backend, agent, proxy,
bundle) and `kill`, whose argument is a real pid on this machine.
"""

from __future__ import annotations

import argparse
import os
import signal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetdeck.cli import build_parser, main

SKIP = {("demo",), ("demo-backend",), ("agent",), ("proxy",), ("bundle",), ("kill",)}
HOSTILE = ["", " ", "-", "--", "x", "0", "-1", "1" + "0" * 30, "1e999", "nan", "inf", "0,0", "0,-1", "cpu",
           "slurm:2", "../../etc/passwd", "/etc/passwd", "~root", "a b", "'", '"', "$(id)", "`id`", "; id", "%s%n",
           "\x1b[31mred", "名前", "@sim-remote-04:1", "tickets", "Qwen/Qwen3-8B", "2026-13", "YYYY-MM", "x" * 5000,
           "--help-not", "-v", "/dev/null", "/", "/proc/self/status"]


def _leaves(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
        return
    for action in subs:
        for name, child in action.choices.items():
            yield from _leaves(child, path + (name,))


LEAVES = [(path, p) for path, p in _leaves(build_parser()) if path[:1] not in SKIP]


@st.composite
def command_lines(draw):
    path, parser = draw(st.sampled_from(LEAVES))
    argv = list(path)
    value = st.sampled_from(HOSTILE)
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if not action.option_strings:  # a positional: always given, hostile
            argv.append(draw(value))
            continue
        if not draw(st.booleans()):
            continue
        flag = draw(st.sampled_from(action.option_strings))
        if action.nargs == 0:
            argv.append(flag)
        elif action.choices and draw(st.booleans()):
            argv += [flag, str(draw(st.sampled_from(list(action.choices))))]
        else:
            argv += [flag, draw(value)]
    return argv


class _Hung(Exception):
    pass


def _alarm(signum, frame):
    raise _Hung()


# FUZZ_EXAMPLES raises the count, to search deeper by hand; the suite runs 250.
@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "250")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(argv=command_lines())
def test_any_command_line_is_an_exit_code_and_words_never_a_traceback(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no ./configs of the checkout: no name here reaches a real profile or spec
    monkeypatch.setenv("FLEETDECK_STORE", str(tmp_path / "fd.db"))
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(60)  # a command that waits on nothing for a minute is a finding, not a hung suite
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own refusals (usage + one error line) and --help
        code = exc.code if isinstance(exc.code, int) else 2
    except _Hung:
        pytest.fail(f"fleetdeck {argv!r} still running after 60 s")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    out, err = capsys.readouterr()
    assert code in (0, 1, 2, 3), (argv, code, err[-500:])
    assert "Traceback" not in err and "Traceback" not in out, (argv, err[-2000:])
