"""Files people and other tools write, attacked: fine-tune datasets and evaluation sets (JSON Lines), config
files (TOML), adapter folders' adapter_config.json. Whatever they hold, the answer is the data read as the
file means it, or errors of one line each that name the line or key; never an exception.

The case that started this file: JSON allows U+2028, U+0085 and the ASCII separators raw inside a string
(`json.dumps(ensure_ascii=False)` writes them), and `str.splitlines()` split a valid line there, so a valid
dataset was refused as "invalid JSON" and every later line number was off against the editor's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from engine.adapters.registry import AdapterError, read_adapter
from engine.finetune.dataset import check_dataset, load_examples
from engine.finetune.spec import JobSpec
from engine.router.calibrate import EvalSetError, load_eval_set
from fleetdeck.cli import main
from store.config_files import ConfigError, parse_toml_model
from store.json_text import jsonl_lines

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
# Text with the characters splitlines() breaks on and JSON keeps inside strings.
BREAKERS = "\u2028\u2029\x85\x1c\x1d\x1e\x0b\x0c\r"
texts = st.text(alphabet=st.characters(codec="utf-8") | st.sampled_from(BREAKERS), min_size=1, max_size=40).filter(
    lambda t: t.strip())


@st.composite
def examples(draw):
    if draw(st.booleans()):
        turns = [{"role": "user", "content": draw(texts)}, {"role": "assistant", "content": draw(texts)}]
        if draw(st.booleans()):
            turns.insert(0, {"role": "system", "content": draw(texts)})
        return {"messages": turns}
    return {"instruction": draw(texts), "input": draw(st.sampled_from(["", "context"])) , "output": draw(texts)}


@st.composite
def jsonl_files(draw):
    """(bytes of a JSON Lines file, the examples in it): ASCII or raw text, LF or CRLF, blank lines, a BOM."""
    rows = draw(st.lists(examples(), min_size=1, max_size=6))
    ascii_only = draw(st.booleans())
    end = draw(st.sampled_from(["\n", "\r\n"]))
    lines = []
    for row in rows:
        lines.append(json.dumps(row, ensure_ascii=ascii_only))
        if draw(st.booleans()):
            lines.append(draw(st.sampled_from(["", "  ", "\t"])))
    text = end.join(lines) + draw(st.sampled_from(["", end]))
    bom = "\ufeff" if draw(st.booleans()) else ""
    return (bom + text).encode("utf-8"), rows


@SETTINGS
@given(jsonl_files())
def test_any_valid_dataset_is_read_whole_as_written(tmp_path, case):
    data, rows = case
    path = tmp_path / "d.jsonl"
    path.write_bytes(data)
    report = check_dataset(path)
    assert report.ok, report.errors
    assert report.examples == len(rows)
    assert load_examples(path.read_bytes()) == rows  # what the trainer reads is what the check passed


@SETTINGS
@given(jsonl_files(), st.integers(min_value=0), st.sampled_from(["{not json", '{"text": "x"}', "[" * 5000, "1" * 5000,
                                                                   '{"messages": [{"role": "' + "r" * 5000 + '", "content": "x"}]}']))
def test_a_broken_line_is_named_by_the_number_an_editor_shows(tmp_path, case, pick, broken):
    data, rows = case
    lines = data.decode("utf-8").split("\n")
    filled = [i for i, line in enumerate(lines) if line.strip().lstrip("\ufeff")]
    at = filled[pick % len(filled)]
    lines[at] = ("\ufeff" if at == 0 and lines[0].startswith("\ufeff") else "") + broken
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8")
    report = check_dataset(path)
    assert not report.ok and report.examples == len(rows) - 1
    (error,) = report.errors
    assert error.startswith(f"line {at + 1}: ") and "\n" not in error and len(error) < 200


@SETTINGS
@given(st.binary(max_size=300) | jsonl_files().map(lambda c: c[0]).flatmap(
    lambda b: st.integers(0, max(len(b) - 1, 0)).map(lambda i: b[:i] + b"\x00\xff{[" + b[i + 1:])))
def test_any_bytes_are_a_report_never_an_exception(tmp_path, data):
    path = tmp_path / "d.jsonl"
    path.write_bytes(data)
    report = check_dataset(path)
    assert report.ok or report.errors
    assert all("\n" not in e and len(e) < 200 for e in report.errors)


@SETTINGS
@given(jsonl_files())
def test_an_eval_set_reads_its_lines_as_the_dataset_does(tmp_path, case):
    data, rows = case
    items = [{"messages": r.get("messages") or [{"role": "user", "content": r["instruction"]}], "expected": "billing"}
             for r in rows]
    text = data.decode("utf-8")
    for row, item in zip(rows, items):
        text = text.replace(json.dumps(row, ensure_ascii=True), json.dumps(item, ensure_ascii=True), 1)
        text = text.replace(json.dumps(row, ensure_ascii=False), json.dumps(item, ensure_ascii=False), 1)
    path = tmp_path / "eval.jsonl"
    path.write_text(text, encoding="utf-8")
    got = load_eval_set(path)
    assert [i.messages for i in got] == [i["messages"] for i in items]
    assert [i.line for i in got] == [n for n, _ in jsonl_lines(text)]


def test_a_deeply_nested_eval_line_is_one_named_error(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "q"}], "expected": "a"}\n' + "[" * 100_000 + "\n")
    with pytest.raises(EvalSetError, match="line 2: invalid JSON \\(nested too deeply\\)"):
        load_eval_set(path)


# TOML values of every shape, for every key of a fine-tune spec and some that are not.
scalars = (st.integers(min_value=-(2**70), max_value=2**70) | st.floats(allow_nan=True) | st.booleans()
           | st.text(max_size=30))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3), max_leaves=6)


def toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if v != v else ("inf" if v == float("inf") else "-inf" if v == float("-inf") else repr(v))
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return json.dumps(v)  # an int, or a string (JSON's escapes are TOML's, bar surrogates: a TOML error then)


@SETTINGS
@given(st.dictionaries(st.sampled_from([*JobSpec.model_fields, "unknown_key", "lora rank"]), values, max_size=8))
def test_any_spec_is_a_spec_or_errors_that_name_the_key(doc):
    text = "\n".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in doc.items())
    try:
        parse_toml_model("job.toml", text, JobSpec)
    except ConfigError as exc:
        head, *lines = str(exc).split("\n")
        assert head.startswith("job.toml: ")
        assert all(len(line) < 300 for line in lines)
        assert all(line.startswith("  ") for line in lines)


@pytest.mark.parametrize("text, said", [
    ("name = " + "[" * 3000 + "]" * 3000, "nested too deeply"),
    ("name = " + "{a = " * 3000 + "1" + "}" * 3000, "nested too deeply"),
    ('name = "' + "x " * 50_000 + '"', "String should match pattern"),
    ("name = 1" + "0" * 5000, "Exceeds the limit (4300 digits)"),
], ids=["nested arrays", "nested tables", "a 100 KB string", "a 5,000-digit integer"])
def test_a_hostile_spec_is_named_in_short_lines(text, said):
    with pytest.raises(ConfigError) as caught:
        parse_toml_model("job.toml", text, JobSpec)
    assert said in str(caught.value) and max(len(line) for line in str(caught.value).split("\n")) < 300


def test_a_hostile_spec_through_the_cli_is_one_line_not_a_traceback(tmp_path, capsys):
    spec = tmp_path / "job.toml"
    spec.write_text("name = " + "[" * 3000 + "]" * 3000 + "\n")
    assert main(["finetune", "check", str(spec), "--store", str(tmp_path / "fd.db")]) == 2
    err = capsys.readouterr().err
    assert "nested too deeply" in err and "Traceback" not in err


adapter_values = st.recursive(st.none() | scalars, lambda inner: st.lists(inner, max_size=3)
                              | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8)


@SETTINGS
@given(st.dictionaries(st.sampled_from(["r", "lora_alpha", "target_modules", "peft_type", "rank_pattern",
                                        "base_model_name_or_path"]), adapter_values)
       | adapter_values.map(lambda v: {"r": v}))
def test_any_adapter_config_is_an_adapter_or_one_named_refusal(tmp_path_factory, cfg):
    folder: Path = tmp_path_factory.mktemp("adapter")
    (folder / "adapter_model.safetensors").write_bytes(b"\x00" * 8)
    (folder / "adapter_config.json").write_text(json.dumps(cfg, allow_nan=True))
    try:
        adapter = read_adapter(folder)
    except AdapterError as exc:
        assert "\n" not in str(exc) and len(str(exc)) < 300 + len(str(folder))
    else:
        assert 1 <= adapter.rank and (adapter.alpha is None or adapter.alpha > 0)
        assert all(isinstance(t, str) for t in adapter.target_modules)


def test_an_adapter_config_nested_too_deeply_or_not_utf8_is_refused_by_name(tmp_path):
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x00" * 8)
    cfg = tmp_path / "adapter_config.json"
    cfg.write_text("[" * 100_000)
    with pytest.raises(AdapterError, match="nested too deeply"):
        read_adapter(tmp_path)
    cfg.write_text('{"r": 8, "lora_alpha": 16}')
    (tmp_path / "fleetdeck.json").write_bytes(b"\xff\xfe not utf-8")
    assert read_adapter(tmp_path).metadata is None  # its notes unreadable; the adapter itself stands


# Launch profiles: every key of a profile with values of every shape. One that loads must give a command line
# exec can run (no NUL, no empty program) and a planner's CPU cache size, or the loader names the key.
profile_values = values | st.dictionaries(st.sampled_from(["VLLM_CPU_KVCACHE_SPACE", "OMP_NUM_THREADS", "1BAD"]),
                                          st.sampled_from(["4", "1e400", "inf", "nan", "-1", "x", "2\x00"]), max_size=2)


@SETTINGS
@given(st.fixed_dictionaries({"name": st.just("p"), "model": st.sampled_from(["Qwen/Qwen3-8B", "m\x00"])}),
       st.dictionaries(st.sampled_from(["vllm_command", "extra_args", "env", "served_model_name", "max_model_len",
                                        "gpu_memory_utilization", "port", "host", "quantization", "kv_cache_dtype"]),
                       profile_values | st.sampled_from(["vllm 'serve", "", "  ", "vllm serve"]), max_size=5))
def test_any_profile_is_a_launchable_command_line_or_errors_that_name_the_key(base, doc):
    from engine.vllm.command import LaunchError, build_launch
    from engine.vllm.profile import Profile

    text = "\n".join(f"{json.dumps(k)} = {toml_value(v) if not isinstance(v, dict) else '{' + ', '.join(f'{json.dumps(a)} = {json.dumps(b)}' for a, b in v.items()) + '}'}"
                     for k, v in {**base, **doc}.items())
    try:
        profile = parse_toml_model("p.toml", text, Profile)
    except ConfigError as exc:
        assert all(len(line) < 300 for line in str(exc).split("\n"))
        return
    assert profile.cpu_kv_cache_bytes is None or profile.cpu_kv_cache_bytes > 0
    try:
        argv, env = build_launch(profile, [0], 8000, {}, require_installed=False)
    except LaunchError:
        return
    assert argv and argv[0].strip()
    assert not any("\x00" in a for a in argv) and not any("\x00" in k + v for k, v in env.items())


def test_a_fleetdeck_vllm_that_is_not_a_command_line_is_named(monkeypatch):
    from engine.vllm.command import LaunchError, vllm_command
    from engine.vllm.profile import Profile

    monkeypatch.setenv("FLEETDECK_VLLM", "vllm 'serve")
    with pytest.raises(LaunchError, match="FLEETDECK_VLLM is not a command line"):
        vllm_command(Profile(name="p", model="m"), require_installed=False)


numbers = st.sampled_from(["inf", "-inf", "nan", "1e308", "0", "-1", "1" + "0" * 30, "2.5", "36500"])


@SETTINGS
@given(st.dictionaries(st.sampled_from(["retention_days", "max_body_bytes", "frontier_timeout_s"]), numbers, max_size=3),
       st.dictionaries(st.sampled_from(["slm_gpu_hour_usd", "slm_gpus"]), numbers, max_size=2),
       st.dictionaries(st.sampled_from(["threshold", "baseline_days", "recent_hours", "drift_threshold_pp",
                                        "frontier_input_usd_per_mtok", "frontier_output_usd_per_mtok",
                                        "slm_first_token_timeout_s", "slm_total_timeout_s"]), numbers, max_size=4))
@example({"max_body_bytes": "1" + "0" * 30}, {}, {}).via("a 30-digit body limit")
@example({}, {"slm_gpus": "1" + "0" * 30}, {}).via("a 30-digit GPU count")
@example({"retention_days": "inf"}, {}, {"recent_hours": "inf"}).via("the report's NaN")
def test_a_router_config_that_loads_holds_only_numbers_every_figure_can_use(proxy, pricing, task):
    """`inf` and 30-digit integers are valid TOML: a router config with them loaded, and `fleetdeck report`
    then said "cannot convert float NaN to integer". Every number a config holds is finite and in range."""
    from engine.router.config import RouterConfig

    def table(d):
        return "\n".join(f"{k} = {v}" for k, v in d.items())

    text = (f"[proxy]\n{table(proxy)}\n[pricing]\n{table(pricing)}\n[[task]]\nname = \"t\"\n"
            f"slm_base_url = \"http://127.0.0.1:9/v1\"\nslm_model = \"m\"\n{table({'threshold': '0.5', **task})}\n")
    try:
        config = parse_toml_model("router.toml", text, RouterConfig)
    except ConfigError:
        return
    import math

    for model in (config.proxy, config.pricing, *config.task):
        for value in model.model_dump().values():
            if isinstance(value, float):
                assert math.isfinite(value)
            if isinstance(value, int):
                assert abs(value) < 2**53  # a float's exact integers: every cost and window multiplies them


@SETTINGS
@given(st.binary(max_size=2048) | st.lists(st.sampled_from([b"\n", b"\r\n", b"\xef\xbb\xbf", b"\xff", b"{}", b" ",
                                                                b'{"instruction": "q", "output": "a"}', b"\xe2\x80\xa8"]),
                                               max_size=30).map(b"".join))
def test_any_bytes_get_a_report_whose_hash_is_of_every_byte(tmp_path, data):
    """The check reads a line at a time; whatever the bytes, it reports (never raises), and its SHA-256 is the
    file's, which the runner holds its own read against."""
    import hashlib

    path = tmp_path / "d.jsonl"
    path.write_bytes(data)
    report = check_dataset(path)
    assert report.sha256 == hashlib.sha256(data).hexdigest()
    assert report.ok == (not report.errors and report.examples > 0)
    if report.ok:
        assert len(load_examples(data)) == report.examples
