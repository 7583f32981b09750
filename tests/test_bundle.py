"""Air-gapped from day 0: a bundle built with no index (from this environment's own distributions, re-packed),
installed in a network namespace with no network, refused when one byte of one wheel changes, pushed to a
fresh node over the real sshd (bootstrap, no-op, upgrade), and `nodes ls` on versions and protocols."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import FAKE_VLLM_CMD, kill_processes_mentioning, local_wheelhouse, sshd_server, wait_for

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def fleetdeck(*args: str, root: Path = ROOT, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The CLI of the code at `root`, in a child (it builds wheels and runs pip: no in-process state)."""
    full = {**os.environ, "PYTHONPATH": str(root), **(env or {})}
    return subprocess.run([PY, "-m", "fleetdeck", *args], cwd=root, env=full, capture_output=True, text=True,
                          timeout=300)


def _offline_prefix() -> list[str]:
    """`unshare -n`: a network namespace with no network at all (root only); [] if it cannot be made."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return []
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True)
    return ["unshare", "-n"] if probe.returncode == 0 else []


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A wheelhouse re-packed from this environment, and bundles of fleetdeck 0.1.0 and 0.1.0+test2 built
    from it with --no-index (the second from a copy of the checkout with a newer local version)."""
    base = tmp_path_factory.mktemp("bundles")
    wheelhouse = local_wheelhouse(base / "wheelhouse")
    first = fleetdeck("bundle", "--out", str(base / "b1"), "--extras", "", "--find-links", str(wheelhouse), "--no-index")
    assert first.returncode == 0, first.stderr
    assert "bundle of fleetdeck 0.1.0" in first.stdout and "digest" in first.stdout
    newer = base / "src"
    newer.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, newer / name)
    for pkg in ("fleetdeck", "tui", "engine", "fleet", "store"):
        shutil.copytree(ROOT / pkg, newer / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    for rel, old, new in (("pyproject.toml", 'version = "0.1.0"', 'version = "0.1.0+test2"'),
                          ("fleetdeck/__init__.py", '__version__ = "0.1.0"', '__version__ = "0.1.0+test2"')):
        text = (newer / rel).read_text()
        assert old in text
        (newer / rel).write_text(text.replace(old, new))
    second = fleetdeck("bundle", "--out", str(base / "b2"), "--extras", "", "--find-links", str(wheelhouse),
                       "--no-index", root=newer)
    assert second.returncode == 0, second.stderr
    return base / "b1", base / "b2"


def test_the_bundle_holds_hashed_wheels_a_manifest_and_its_install_step(built):
    b1, _ = built
    manifest = json.loads((b1 / "manifest.json").read_text())
    assert manifest["fleetdeck"] == "0.1.0" and manifest["python"] == f"{sys.version_info[0]}.{sys.version_info[1]}"
    names = {f["name"] for f in manifest["files"]}
    assert {"install.sh", "install.py", "requirements.txt"} <= names
    wheels = sorted(p.name for p in (b1 / "wheels").iterdir())
    assert {f"wheels/{w}" for w in wheels} <= names and any(w.startswith("fleetdeck-0.1.0-") for w in wheels)
    assert manifest["bootstrap_pip"] in wheels
    pins = [line for line in (b1 / "requirements.txt").read_text().splitlines() if not line.startswith("#")]
    assert len(pins) == len(wheels) and all("==" in p and " --hash=sha256:" in p for p in pins)
    assert any(p.startswith("textual==") for p in pins) and any(p.startswith("pydantic_core==") for p in pins)


def test_bad_bundle_arguments_are_one_line(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    for args, expect in ((["--out", str(tmp_path / "full"), "--no-index", "--find-links", str(tmp_path)], "not an empty folder"),
                         (["--out", str(tmp_path / "o"), "--extras", "gpu"], "unknown extra 'gpu'"),
                         (["--out", str(tmp_path / "o"), "--no-index"], "--no-index needs --find-links"),
                         (["--out", str(tmp_path / "o"), "--python", "three"], "expected a Python version")):
        done = fleetdeck("bundle", *args)
        assert done.returncode == 2 and expect in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr


def test_installs_with_no_network_and_refuses_a_changed_wheel_by_name(built, tmp_path):
    offline = _offline_prefix()
    if not offline:
        pytest.skip("no network namespace: `unshare -n` needs root (CI runs as root); the install is not proven offline here")
    b1, _ = built
    prefix = tmp_path / "fd"
    done = subprocess.run([*offline, "sh", str(b1 / "install.sh"), "--prefix", str(prefix)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "installed fleetdeck 0.1.0" in done.stdout
    agent = prefix / "current" / "bin" / "fleetdeck"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path / "d")}  # nothing of this checkout
    version = subprocess.run([*offline, str(agent), "--version"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert version.stdout.strip() == "fleetdeck 0.1.0"
    gpus = subprocess.run([*offline, str(agent), "gpus", "--json"], capture_output=True, text=True, env=env,
                          cwd=tmp_path)
    assert gpus.returncode == 0 and json.loads(gpus.stdout)["nvml"] in ("ok", "unavailable")
    # The installed code is the bundle's, not this checkout's.
    where = subprocess.run([str(prefix / "current" / "bin" / "python"), "-c", "import fleetdeck; print(fleetdeck.__file__)"],
                           capture_output=True, text=True, env=env, cwd=tmp_path)
    assert str(prefix) in where.stdout or str(prefix.resolve()) in where.stdout
    again = subprocess.run([*offline, "sh", str(b1 / "install.sh"), "--prefix", str(prefix)], capture_output=True, text=True)
    assert again.returncode == 0 and "already at 0.1.0" in again.stdout

    # One byte of one wheel flipped: refused by name, before anything is installed.
    bad = tmp_path / "bad"
    shutil.copytree(b1, bad)
    wheel = next((bad / "wheels").glob("rich-*.whl"))
    data = bytearray(wheel.read_bytes())
    data[len(data) // 2] ^= 0x01
    wheel.write_bytes(bytes(data))
    refused = subprocess.run([*offline, "sh", str(bad / "install.sh"), "--prefix", str(tmp_path / "fd2")],
                             capture_output=True, text=True)
    assert refused.returncode == 3
    assert f"wheels/{wheel.name}: changed" in refused.stderr and "nothing was installed" in refused.stderr
    assert not (tmp_path / "fd2").exists()
    # A manifest edited to match the changed wheel: pip's hash-checking mode refuses it in turn.
    manifest = json.loads((bad / "manifest.json").read_text())
    import hashlib

    for f in manifest["files"]:
        if f["name"] == f"wheels/{wheel.name}":
            f["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
    (bad / "manifest.json").write_text(json.dumps(manifest))
    refused = subprocess.run([*offline, "sh", str(bad / "install.sh"), "--prefix", str(tmp_path / "fd2")],
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 3 and "pip refused" in refused.stderr, refused.stderr
    assert not (tmp_path / "fd2" / "current").exists() and not any((tmp_path / "fd2" / "venvs").iterdir())


@pytest.fixture
def fresh_node(tmp_path):
    """The real sshd, whose sessions get a fresh HOME (no fleetdeck anywhere in it or on PATH)."""
    home = tmp_path / "node-home"
    home.mkdir()
    # The node's vLLM is the simulator behind vLLM's command line (its own interpreter: not the node's fleetdeck).
    yield from sshd_server(tmp_path, f"SetEnv HOME={home} XDG_CONFIG_HOME={home}/.config "
                                     f"XDG_DATA_HOME={home}/.local/share XDG_STATE_HOME={home}/.local/state "
                                     f'"FLEETDECK_VLLM={FAKE_VLLM_CMD}" FLEETDECK_SIM_START_DELAY=0.2\n')


def test_a_node_is_bootstrapped_reinstalled_and_upgraded_over_ssh(built, fresh_node, tmp_path):
    b1, b2 = built
    dest, opts = fresh_node
    home = tmp_path / "node-home"
    (home / ".config" / "fleetdeck" / "profiles").mkdir(parents=True)
    # This host has no GPU, and a node's agent starts servers only on GPUs the node has: a profile for vLLM's CPU
    # build (its KV space given) runs on none.
    (home / ".config" / "fleetdeck" / "profiles" / "q.toml").write_text(
        'name = "q"\nmodel = "Qwen/Qwen3-8B"\n[env]\nVLLM_CPU_KVCACHE_SPACE = "4"\n')
    hello_v1 = json.dumps({"v": 1, "type": "hello", "fleetdeck": "0.0.9"})
    config = tmp_path / "fleet.toml"
    config.write_text("# the site's fleet: keep this comment\n"
                      f"[[node]]\nname = \"gpu1\"  # the first box\nssh = \"{dest}\"\nssh_options = {json.dumps(opts)}\n\n"
                      f"[[node]]\nname = \"old\"\nssh = \"{dest}\"\nssh_options = {json.dumps(opts)}\n"
                      f"agent_command = [\"python3\", \"-c\", {json.dumps(f'print({hello_v1!r}, flush=True)')}]\n")
    store = tmp_path / "dash.db"
    common = ["--config", str(config), "--store", str(store)]

    before = json.loads(fleetdeck("nodes", "ls", "--json", *common).stdout)
    rows = {r["node"]: r for r in before["nodes"]}
    assert rows["gpu1"]["state"] == "unreachable" and "nodes install gpu1" in rows["gpu1"]["note"]
    assert rows["old"]["state"] == "incompatible" and rows["old"]["fleetdeck"] == "0.0.9" and rows["old"]["protocol"] == 1
    text = fleetdeck("nodes", "ls", *common).stdout
    assert "INCOMPATIBLE: upgrade with `fleetdeck nodes install old --bundle DIR`" in text

    refused = fleetdeck("nodes", "install", "gpu1", "--bundle", str(b1), "--read-only", *common)
    assert refused.returncode == 2 and "read-only" in refused.stderr and not (home / ".local" / "share" / "fleetdeck").exists()

    done = fleetdeck("nodes", "install", "gpu1", "--bundle", str(b1), *common)
    assert done.returncode == 0, done.stderr
    assert "gpu1: installed 0.1.0; its agent answers as fleetdeck 0.1.0" in done.stdout
    agent = str(home / ".local" / "share" / "fleetdeck" / "current" / "bin" / "fleetdeck")
    after = config.read_text()
    assert "# the site's fleet: keep this comment" in after and "# the first box" in after
    assert f'agent_command = ["{agent}", "agent", "--stdio"]' in after
    rows = {r["node"]: r for r in json.loads(fleetdeck("nodes", "ls", "--json", *common).stdout)["nodes"]}
    assert (rows["gpu1"]["state"], rows["gpu1"]["fleetdeck"], rows["gpu1"]["protocol"]) == ("connected", "0.1.0", 2)

    # The node's models, read by its (installed) agent from its own Hugging Face cache.
    snap = home / ".cache" / "huggingface" / "hub" / "models--acme--Tiny" / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("a" * 40)
    (snap / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                                  "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 1,
                                                  "intermediate_size": 128, "vocab_size": 100,
                                                  "max_position_embeddings": 4096, "torch_dtype": "float16"}))
    listed = fleetdeck("models", "ls", "--node", "gpu1", "--json", *common)
    assert listed.returncode == 0, listed.stderr
    assert [(m["name"], m["context_limit"]) for m in json.loads(listed.stdout)] == [("acme/Tiny", 4096)]

    # A server the node runs across the upgrade (started by its agent, from the node's own profile).
    started = fleetdeck("serve", "start", "q", "--gpus", "0", "--force", "--node", "gpu1", *common)
    assert started.returncode == 0, started.stderr

    def servers() -> list[dict]:
        done = fleetdeck("serve", "ls", "--json", "--node", "gpu1", *common)
        return json.loads(done.stdout) if done.returncode == 0 else []

    assert wait_for(lambda: [s["state"] for s in servers()] == ["ready"], timeout=60), servers()
    (server,) = servers()

    # A changed bundle is refused here, naming the file, before anything reaches the node.
    bad = tmp_path / "bad-bundle"
    shutil.copytree(b1, bad)
    (bad / "install.py").write_text((bad / "install.py").read_text() + "\n# changed\n")
    refused = fleetdeck("nodes", "install", "gpu1", "--bundle", str(bad), *common)
    assert refused.returncode == 2 and "install.py: changed" in refused.stderr

    again = fleetdeck("nodes", "install", "gpu1", "--bundle", str(b1), *common)
    assert again.returncode == 0 and "gpu1: already at 0.1.0; nothing changed" in again.stdout
    assert config.read_text() == after

    up = fleetdeck("nodes", "install", "gpu1", "--bundle", str(b2), *common)
    assert up.returncode == 0, up.stderr
    assert "gpu1: upgraded 0.1.0 -> 0.1.0+test2" in up.stdout
    rows = {r["node"]: r for r in json.loads(fleetdeck("nodes", "ls", "--json", *common).stdout)["nodes"]}
    assert rows["gpu1"]["fleetdeck"] == "0.1.0+test2"
    # The node's own config survived the upgrade; the previous environment is kept for agents still running.
    assert (home / ".config" / "fleetdeck" / "profiles" / "q.toml").is_file()
    assert len(list((home / ".local" / "share" / "fleetdeck" / "venvs").iterdir())) == 2
    # ... and so did its server, which the new agent finds in the node's store.
    try:
        (after_up,) = servers()
        assert (after_up["id"], after_up["state"]) == (server["id"], "ready")
        assert fleetdeck("serve", "stop", server["id"], "--node", "gpu1", *common).returncode == 0
    finally:
        kill_processes_mentioning(str(home))  # anything left on the node (its server, an agent) ends by pid

    audit = json.loads(fleetdeck("audit", "--json", "--action", "node.install", *common).stdout)
    outcomes = [(r["target"], r["outcome"]) for r in reversed(audit)]
    assert outcomes == [("gpu1", "refused"), ("gpu1", "done"), ("gpu1", "refused"), ("gpu1", "done"), ("gpu1", "done")]


@pytest.mark.skipif(not os.environ.get("FLEETDECK_TEST_BUNDLE_PROXY"),
                    reason="the proxy extra's bundle is ~90 MiB (litellm and its deps) and takes minutes to re-pack and "
                           "install on 2 cores; FLEETDECK_TEST_BUNDLE_PROXY=1 runs it")
def test_the_default_bundle_with_the_proxy_extra_installs_offline_and_imports_it(tmp_path):
    offline = _offline_prefix()
    if not offline:
        pytest.skip("no network namespace: `unshare -n` needs root")
    wheelhouse = local_wheelhouse(tmp_path / "wheelhouse", extras=("proxy",))
    made = fleetdeck("bundle", "--out", str(tmp_path / "b"), "--find-links", str(wheelhouse), "--no-index")
    assert made.returncode == 0 and "extras: proxy" in made.stdout, made.stderr
    done = subprocess.run([*offline, "sh", str(tmp_path / "b" / "install.sh"), "--prefix", str(tmp_path / "fd")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    imported = subprocess.run([*offline, str(tmp_path / "fd" / "current" / "bin" / "python"), "-c",
                               "import litellm, starlette, uvicorn; print('ok')"], capture_output=True, text=True,
                              cwd=tmp_path, env={"LITELLM_LOCAL_MODEL_COST_MAP": "True", "PATH": "/usr/bin:/bin"})
    assert imported.stdout.strip() == "ok", imported.stderr


@settings(max_examples=80, deadline=None)
@given(names=st.lists(st.one_of(st.text(max_size=30), st.sampled_from(["../outside", "/etc/passwd", "wheels/../../x",
                                                                        "install.py", "wheels/a.whl"])), max_size=5),
       digests=st.lists(st.text(alphabet="0123456789abcdef", min_size=0, max_size=64), max_size=5))
def test_the_verifier_names_every_mismatch_and_reads_nothing_outside_the_bundle(names, digests):
    """Whatever a manifest lists, verify() answers with one line per problem, never an exception, and a
    listed name that leaves the bundle is refused, not read."""
    import tempfile

    from engine.bundle import install_script

    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "b"
        (bundle / "wheels").mkdir(parents=True)
        (bundle / "wheels" / "a.whl").write_bytes(b"wheel")
        (bundle / "install.py").write_text("print()")
        (Path(tmp) / "outside").write_text("secret")
        files = [{"name": n, "sha256": d} for n, d in zip(names, digests + ["0" * 64] * len(names))]
        problems = install_script.verify(bundle, {"files": files, "fleetdeck": "0"})
        for entry in files:
            name = entry["name"]
            if not name or name.startswith("/") or ".." in Path(name).parts:
                assert any(p.startswith(repr(name)) and "not a file inside the bundle" in p for p in problems)
        assert all(isinstance(p, str) and "\n" not in p for p in problems)
        good = {"files": [{"name": "wheels/a.whl", "sha256": install_script.sha256_of(bundle / "wheels" / "a.whl")},
                          {"name": "install.py", "sha256": install_script.sha256_of(bundle / "install.py")}],
                "fleetdeck": "0"}
        assert install_script.verify(bundle, good) == []


_json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=10),
                            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                            max_leaves=8)


@settings(max_examples=60, deadline=None)
@given(entries=st.lists(_json_values | st.fixed_dictionaries({"name": _json_values, "sha256": _json_values}), max_size=4),
       nest=st.sampled_from([0, 0, 100_000]))
def test_a_manifest_of_any_shape_is_refused_or_verified_in_one_line_each(entries, nest):
    """A manifest comes from across the air gap: an entry that is not an object, a name that is not text, or a
    file nested 100,000 deep is a line naming it (or a refusal), never an exception in the install script."""
    import tempfile

    from engine.bundle import install_script

    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp)
        text = json.dumps({"files": entries, "fleetdeck": "0"})
        (bundle / install_script.MANIFEST).write_text("[" * nest + text + "]" * nest)
        try:
            manifest = install_script.read_manifest(bundle)
        except install_script.Refused as exc:
            assert nest and "nested too deeply" in str(exc) and "\n" not in str(exc)
            return
        problems = install_script.verify(bundle, manifest)
        assert all(isinstance(p, str) and "\n" not in p for p in problems)
        assert len(problems) >= sum(1 for e in entries if not isinstance(e, dict))
