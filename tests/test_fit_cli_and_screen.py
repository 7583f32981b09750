"""`fleetdeck fit` on the command line and the Fit screen through Pilot."""

from __future__ import annotations

import json

import pynvml
import pytest
from textual.widgets import DataTable, Input, Select, Static

from fleetdeck.cli import main
from tests.fakes.fake_nvml import MIB, FakeGpu, FakeNvml
from tests.tui_helpers import drain, make_app, ready, static_text, until
from tui.screens.fit import FitScreen

JSON_KEYS = {"model", "kv_bytes_per_token", "weights_gib", "available_kv_gib", "num_gpu_blocks", "block_size",
             "kv_tokens", "max_concurrency", "max_model_len", "fits", "reason", "max_model_len_that_fits"}


def test_fit_json_has_the_documented_keys_and_vllms_figures(capsys):
    code = main(["fit", "meta-llama/Llama-3.1-8B-Instruct", "--available-kv-gib", "58.11", "--max-model-len", "8192", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0 and JSON_KEYS <= doc.keys()
    assert doc["kv_bytes_per_token"] == 131072 and doc["block_size"] == 16
    assert doc["kv_tokens"] == pytest.approx(476016, rel=0.005)
    assert doc["fits"] is True and doc["reason"] is None


def test_fit_that_does_not_fit_exits_1_with_the_reason(capsys):
    code = main(["fit", "Qwen/Qwen2.5-32B-Instruct-AWQ", "--gpu-memory-gib", "23.99", "--max-model-len", "32768",
                 "--vllm-version", "0.19"])
    out = capsys.readouterr().out
    assert code == 1 and "DOES NOT FIT" in out and "estimated maximum model length" in out


def test_fit_against_a_live_gpu_uses_its_free_memory(monkeypatch, capsys):
    FakeNvml([FakeGpu(total=81559 * MIB, used=40 * 1024 * MIB)]).install(monkeypatch)
    code = main(["fit", "Qwen/Qwen3-8B", "--gpu", "0", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 1 and "another process holds 40.00 GiB" in doc["reason"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["fit", "acme/unknown-9b", "--gpu-memory-gib", "80"], "unknown model"),
        (["fit", "/nonexistent/model/folder", "--gpu-memory-gib", "80"], "not a model folder"),
        (["fit", "Qwen/Qwen3-8B"], "--gpu INDEX"),
        (["fit"], "name a MODEL"),
    ],
)
def test_fit_bad_input_exits_2_and_names_the_problem(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_fit_gpu_without_a_driver_says_to_size_by_hand(monkeypatch, capsys):
    FakeNvml([], init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND).install(monkeypatch)
    assert main(["fit", "Qwen/Qwen3-8B", "--gpu", "0"]) == 2
    assert "--gpu-memory-gib" in capsys.readouterr().err


def test_list_models(capsys):
    assert main(["fit", "--list-models"]) == 0
    assert "openai/gpt-oss-20b" in capsys.readouterr().out.splitlines()


async def _open_fit(app, pilot) -> FitScreen:
    await ready(app, pilot)
    await pilot.press("2")
    await pilot.pause()
    await drain(app)
    await pilot.pause()
    assert isinstance(app.screen, FitScreen)
    return app.screen


async def test_fit_screen_plans_against_the_simulated_fleet():
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await _open_fit(app, pilot)
        gpu = screen.query_one("#fit-gpu", Select).value
        assert gpu == "sim-h100-01/3"  # the GPU with the most free memory
        grid = screen.query_one("#fit-grid", DataTable)
        assert [r.key.value for r in grid.ordered_rows] == ["auto", "fp8", "nvfp4"]
        assert "FITS" in static_text(screen.query_one("#fit-verdict", Static))
        assert screen.last_result.kv_bytes_per_token == 131072


async def test_fit_screen_explains_a_failure_and_a_bad_model():
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await _open_fit(app, pilot)
        # A busy A10 (the simulated vLLM holds most of it): vLLM would refuse at start-up.
        screen.query_one("#fit-gpu", Select).value = "sim-a10-02/0"
        await pilot.pause()
        await drain(app)
        await pilot.pause()
        verdict = static_text(screen.query_one("#fit-verdict", Static))
        assert "DOES NOT FIT" in verdict and "less than desired GPU memory utilization" in verdict
        model = screen.query_one("#fit-model", Input)
        model.value = "acme/unknown-9b"
        await pilot.press("tab")  # leave the model field ...
        model.focus()
        await pilot.press("enter")  # ... and submit it
        await until(app, pilot, lambda: "unknown model" in static_text(screen.query_one("#fit-verdict", Static)))
        assert app.is_running


async def test_fit_screen_grid_turns_red_past_the_largest_context():
    app = make_app()
    async with app.run_test(size=(100, 30)) as pilot:
        screen = await _open_fit(app, pilot)
        screen.query_one("#fit-gpu", Select).value = "preset: RTX 4090 24GB (23.55 GiB)"
        await pilot.pause()
        await drain(app)
        await pilot.pause()
        grid = screen.query_one("#fit-grid", DataTable)
        auto = [str(c) for c in grid.get_row("auto")[1:]]
        assert auto[0].endswith("x") and auto[-1] == "no"  # 4k fits, 128k does not on 24 GB with bf16 KV


async def test_fit_screen_plans_the_models_default_length_and_refuses_past_its_limit():
    app = make_app()
    async with app.run_test(size=(100, 40)) as pilot:
        screen = await _open_fit(app, pilot)
        assert screen.query_one("#fit-len", Input).value == ""  # vLLM's default for the model
        assert screen.last_result.max_model_len == 131072 and not screen.last_result.max_model_len_given
        assert "vLLM's default for this model" in static_text(screen.query_one("#fit-verdict", Static))
        screen.query_one("#fit-model", Input).value = "Qwen/Qwen3-8B"
        screen.query_one("#fit-len", Input).value = "200000"
        screen.action_plan()
        await drain(app)
        await pilot.pause()
        verdict = static_text(screen.query_one("#fit-verdict", Static))
        assert "DOES NOT FIT" in verdict and "max_position_embeddings=40960" in verdict
        assert "max concurrency" not in verdict and "largest context" not in verdict.lower()
        assert "fits with:" in verdict and "40,960" in verdict
        grid = screen.query_one("#fit-grid", DataTable)
        auto = [str(c) for c in grid.get_row("auto")[1:]]
        assert auto[-2:] == ["> limit", "> limit"]  # 64k and 128k are past Qwen3-8B's 40,960


# -- bad input at the edges: one line, never a traceback, the dashboard keeps running -------------------------

import struct  # noqa: E402


@pytest.mark.parametrize("argv, message", [
    (["fit", "Qwen/Qwen3-8B", "--gpu-memory-gib", "80", "--vllm-version", "v0.19"], "expected a vLLM version"),  # was: 0.32 planned as "v0.19"
    (["fit", "Qwen/Qwen3-8B", "--gpu-memory-gib", "80", "--vllm-version", "latest"], "expected a vLLM version"),
    (["fit", "~no-such-user-here/model", "--gpu-memory-gib", "80"], "cannot read it as a model"),  # was: RuntimeError traceback
    (["fit", "/" + "a" * 5000, "--gpu-memory-gib", "80"], "File name too long"),  # was: OSError traceback
    (["fit", "Qwen/Qwen3-8B", "--gpu-memory-gib", "nan"], "not a finite number"),
    (["fit", "Qwen/Qwen3-8B", "--gpu-memory-gib", "80", "--util", "1.5"], "at most 1"),
    (["fit", "Qwen/Qwen3-8B", "--gpu-memory-gib", "80", "--util", "0"], "above 0"),
    (["fit", "Qwen/Qwen3-8B", "--gpu-memory-gib", "80", "--tp", "0"], "tensor parallel size"),
    (["fit", "Qwen/Qwen3-8B", "--gpu-memory-gib", "-1"], "above 0"),
    (["fit", "Qwen/Qwen3-8B", "--gpu", "0,1"], "a GPU index"),
])
def test_fit_bad_flags_and_names_are_one_line(argv, message, capsys):
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's usage error, as the console script ends with it
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("fleetdeck")]) == 1


def test_fit_a_folder_whose_weights_cannot_be_read_is_one_line(tmp_path, capsys):
    from engine.kvfit.catalogue import CATALOGUE

    (tmp_path / "config.json").write_text(json.dumps(CATALOGUE["Qwen/Qwen3-8B"]))
    (tmp_path / "model.safetensors").mkdir()  # was: IsADirectoryError traceback
    assert main(["fit", str(tmp_path), "--gpu-memory-gib", "80"]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors: cannot read it (Is a directory)" in err and "Traceback" not in err


def test_fit_a_tp_vllm_cannot_split_the_kv_heads_over_exits_1(capsys):
    code = main(["fit", "Qwen/Qwen2.5-14B-Instruct", "--gpu-memory-gib", "80", "--tp", "5", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 1 and doc["verdict"] == "DOES NOT FIT" and "Use --tp 1, 2, 4, 8." in doc["reason"]


async def _replan(app, pilot, screen) -> str:
    await drain(app)
    await pilot.pause()
    return static_text(screen.query_one("#fit-verdict", Static))


async def test_fit_screen_every_field_empty_spaces_letters_negative_and_enter_twice(tmp_path):
    """Each bad value gets one line in the verdict and the screen stays usable; Enter pressed twice plans once
    more, not twice at once; a model folder whose weights cannot be read is a line, not the end of the app."""
    from engine.kvfit.catalogue import CATALOGUE

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps(CATALOGUE["Qwen/Qwen3-8B"]))
    (broken / "model.safetensors").mkdir()
    app = make_app()
    async with app.run_test(size=(100, 40)) as pilot:
        screen = await _open_fit(app, pilot)
        fields = {k: screen.query_one(f"#fit-{k}", Input) for k in ("model", "tp", "util", "len")}
        good = {k: f.value for k, f in fields.items()}
        cases = [("model", "", "type a model name"), ("model", "   ", "type a model name"),
                 ("model", str(broken), "cannot read it (Is a directory)"),
                 ("model", "acme/" + "x" * 300, "unknown model"), ("model", "~no-such-user-here/m", "cannot read it as a model")]
        for key in ("tp", "util", "len"):
            cases += [(key, "", "must be numbers"), (key, "   ", "must be numbers"), (key, "abc", "must be numbers"),
                      (key, "-1", "must be positive"), (key, "nan" if key == "util" else "1.5", "")]
        cases += [("util", "0", "util between 0 and 1"), ("util", "1.01", "util between 0 and 1"), ("util", "inf", "util between")]
        for key, value, message in cases:
            if key == "len" and not value.strip():
                continue  # an empty max len (spaces too) is the model's default: a plan, not an error
            for name, field in fields.items():
                field.value = good[name]
            fields[key].value = value
            fields[key].focus()
            await pilot.press("enter")
            await pilot.press("enter")
            verdict = await _replan(app, pilot, screen)
            assert app.is_running and isinstance(app.screen, FitScreen)
            if message:
                assert message in verdict, (key, value, verdict)
                assert screen.error and "\n" not in screen.error and "Traceback" not in verdict, verdict
            else:
                assert screen.error, (key, value, verdict)  # "1.5" is no TP or length, "nan" no utilisation
        for name, field in fields.items():
            field.value = good[name]
        screen.action_plan()
        assert "FITS" in await _replan(app, pilot, screen) and screen.error is None


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tui.screens.fit import parse_fields  # noqa: E402

_FIELD_TEXT = st.one_of(st.text(max_size=12), st.integers(-(2**40), 2**40).map(str),
                        st.floats(allow_nan=True, allow_infinity=True).map(str),
                        st.sampled_from(["", " ", "1", "0.9", "1e-320", "nan", "inf", "-0", "1_0", " 4 ", "2147483648"]))


@settings(max_examples=300, deadline=None)
@given(_FIELD_TEXT, _FIELD_TEXT, _FIELD_TEXT)
def test_the_fit_screens_fields_are_values_in_range_or_one_line(tp, util, length):
    try:
        got_tp, got_util, got_len = parse_fields(tp, util, length)
    except ValueError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    assert 1 <= got_tp <= 1024 and 0 < got_util <= 1
    assert got_len is None if not length.strip() else 1 <= got_len <= 2**31 - 1


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(["--util", "--gpu-memory-gib", "--tp", "--max-model-len", "--vllm-version", "--max-num-seqs",
                        "--kv-cache-memory-bytes"]), _FIELD_TEXT.filter(lambda t: not t.startswith("-") or t[1:2].isdigit()))
def test_any_value_of_a_fit_flag_is_a_verdict_or_one_usage_line(flag, value):
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(["fit", "Qwen/Qwen3-8B", "--gpu-memory-gib", "80", "--max-model-len", "4096", flag, value])
        except SystemExit as exc:
            code = exc.code
    assert code in (0, 1, 2)
    if code == 2:
        lines = [line for line in err.getvalue().splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("fleetdeck"), lines
