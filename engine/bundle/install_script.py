"""The bundle's own install step, copied into every bundle as `install.py` and run on the far side of the
air gap by the node's own Python (`sh install.sh`, or `fleetdeck nodes install` over SSH).

Standard library only: nothing else exists there yet. It checks every file of the bundle against the
manifest's SHA-256 before anything is installed (a changed or unexpected file is refused by name), makes a
virtual environment per bundle under PREFIX/venvs/, installs with pip run from the bundle's own pip wheel,
passing `--no-index --require-hashes` itself (the far side has no pip configuration to lean on, and pip's
hash-checking mode refuses a changed wheel a second time), checks the installed `fleetdeck --version`, and
only then points PREFIX/current at the new environment. The same bundle again is "already at VERSION" and
touches nothing; a newer one leaves the previous environment in place (an agent or server still running
from it keeps its files) and removes older ones. Configuration, profiles and the store live in the XDG
folders, which this never touches.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
REQUIREMENTS = "requirements.txt"
WHEELS = "wheels"
MARKER = "fleetdeck-bundle.json"  # written into a venv last: a venv without it is an unfinished install
# What may sit in a bundle besides the files the manifest lists (the manifest cannot hash itself).
UNLISTED = {MANIFEST}


class Refused(Exception):
    """The bundle or this host cannot be installed; the message names the file or the mismatch."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(bundle: Path) -> dict[str, Any]:
    try:
        doc = json.loads((bundle / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise Refused(f"{bundle / MANIFEST}: cannot read the bundle's manifest ({str(exc)[:200]})") from None
    except RecursionError:
        raise Refused(f"{bundle / MANIFEST}: cannot read the bundle's manifest (nested too deeply)") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("files"), list) or not isinstance(doc.get("fleetdeck"), str):
        raise Refused(f"{bundle / MANIFEST}: not a fleetdeck bundle manifest")
    return doc


def bundle_digest(bundle: Path) -> str:
    """The bundle's identity: the SHA-256 of its manifest, which holds every other file's SHA-256."""
    return sha256_of(bundle / MANIFEST)


def verify(bundle: Path, manifest: dict[str, Any]) -> list[str]:
    """Every problem with the bundle's files, one line each naming the file; empty when all match."""
    problems: list[str] = []
    listed: set[str] = set()
    for entry in manifest["files"]:
        if not isinstance(entry, dict):
            problems.append(f"{str(entry)[:60]!r}: not a file entry (the manifest lists {{name, sha256}} objects)")
            continue
        name = str(entry.get("name", ""))
        listed.add(name)
        shown = name if name.isprintable() else repr(name)  # one line per problem, whatever the manifest says
        path = bundle / name
        if not name or name.startswith("/") or ".." in Path(name).parts or "\0" in name:
            problems.append(f"{name!r}: not a file inside the bundle")
        else:
            try:
                ok = path.is_file() and sha256_of(path) == entry.get("sha256")
                missing = not path.is_file()
            except (OSError, ValueError):  # a name no file system here can hold
                ok, missing = False, True
            if missing:
                problems.append(f"{shown}: missing")
            elif not ok:
                problems.append(f"{shown}: changed (its SHA-256 is not the one the manifest records)")
    for path in sorted(bundle.rglob("*")):
        rel = path.relative_to(bundle).as_posix()
        if path.is_file() and rel not in listed and rel not in UNLISTED and "__pycache__" not in path.parts:
            problems.append(f"{rel}: not part of the bundle (unexpected file)")
    return problems


def _venv_version(venv: Path) -> str | None:
    try:
        marker = json.loads((venv / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return str(marker.get("fleetdeck")) if isinstance(marker, dict) else None


def _say(message: str, as_json: bool, **doc: Any) -> None:
    if as_json:
        print(json.dumps({"message": message, **doc}), flush=True)
    else:  # a refusal is an error for whoever runs the script by hand
        print(message, file=sys.stderr if doc.get("status") in ("refused", "failed") else sys.stdout, flush=True)


def install(bundle: Path, prefix: Path, as_json: bool = False) -> dict[str, Any]:
    manifest = read_manifest(bundle)
    version = manifest["fleetdeck"]
    want = str(manifest.get("python", ""))
    have = f"{sys.version_info.major}.{sys.version_info.minor}"
    if want and want != have:
        raise Refused(f"this bundle is for Python {want}; {sys.executable} is Python {have} "
                      f"(make one for it: fleetdeck bundle --python {have})")
    problems = verify(bundle, manifest)
    if problems:
        raise Refused("refused, nothing was installed: " + "; ".join(problems))
    digest = bundle_digest(bundle)
    name = f"{version}-{digest[:12]}"
    venvs = prefix / "venvs"
    target = venvs / name
    current = prefix / "current"
    agent = current / "bin" / "fleetdeck"
    previous_dir = Path(os.readlink(current)) if current.is_symlink() else None
    previous = _venv_version(venvs / previous_dir.name) if previous_dir is not None else None
    on_path = shutil.which("fleetdeck")
    result = {"version": version, "previous": previous, "agent": str(agent.absolute()),
              "on_path": on_path is not None and os.path.realpath(on_path) == os.path.realpath(agent)}
    if previous_dir is not None and previous_dir.name == name and _venv_version(target) == version:
        return {**result, "status": "already"}

    venvs.mkdir(parents=True, exist_ok=True)
    if target.exists():
        shutil.rmtree(target)  # an unfinished earlier try of this very bundle (no marker): start it again
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(target)], check=True)
    pip_wheel = bundle / WHEELS / str(manifest["bootstrap_pip"])
    # pip runs from its own wheel (no ensurepip needed on the host), told everything on its command line.
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INPUT": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("PIP_INDEX_URL", None)
    env.pop("PIP_EXTRA_INDEX_URL", None)
    env.pop("PIP_FIND_LINKS", None)
    cmd = [str(target / "bin" / "python"), str(pip_wheel / "pip"), "install", "--no-index", "--require-hashes",
           "--only-binary", ":all:", "--no-cache-dir", "--find-links", str(bundle / WHEELS),
           "-r", str(bundle / REQUIREMENTS)]
    done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        shutil.rmtree(target, ignore_errors=True)
        tail = [line for line in done.stdout.splitlines() if line.strip()][-3:]
        raise Refused("pip refused the install, nothing changed: " + " | ".join(tail))
    check = subprocess.run([str(target / "bin" / "fleetdeck"), "--version"], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    if check.returncode != 0 or check.stdout.split()[-1:] != [version]:
        shutil.rmtree(target, ignore_errors=True)
        raise Refused(f"the installed fleetdeck does not run as {version}: {check.stdout.strip()[-300:]}")
    (target / MARKER).write_text(json.dumps({"fleetdeck": version, "digest": digest,
                                             "python": have, "manifest": manifest.get("created")}), encoding="utf-8")
    # The switch is one rename: an agent started a moment before or after sees a whole environment.
    tmp = prefix / "current.new"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(Path("venvs") / name, tmp)
    os.replace(tmp, current)
    keep = {name, previous_dir.name if previous_dir else ""}
    for old in venvs.iterdir():  # keep this one and the one before (still running agents use its files)
        if old.name not in keep and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    if bundle.parent == prefix / "bundles":  # pushed by `nodes install`: its folders are named as the venvs
        for old in bundle.parent.iterdir():
            if old.name not in keep and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
    return {**result, "status": "upgraded" if previous else "installed"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="install.py", description="Install this fleetdeck bundle, offline.")
    parser.add_argument("--prefix", default=os.path.join(os.path.expanduser("~"), ".local", "share", "fleetdeck"),
                        help="where the environments go (default: ~/.local/share/fleetdeck)")
    parser.add_argument("--json", action="store_true", help="print the outcome as one JSON line")
    parser.add_argument("--verify-only", action="store_true", help="check the bundle's files and stop")
    args = parser.parse_args(argv)
    bundle = Path(__file__).resolve().parent
    try:
        if args.verify_only:
            problems = verify(bundle, read_manifest(bundle))
            if problems:
                raise Refused("; ".join(problems))
            _say(f"bundle intact: {bundle}", args.json, status="intact")
            return 0
        result = install(bundle, Path(args.prefix).absolute(), args.json)
    except Refused as exc:
        _say(f"install: {exc}", args.json, status="refused")
        return 3
    except (OSError, subprocess.CalledProcessError) as exc:
        _say(f"install: failed: {exc}", args.json, status="failed")
        return 1
    words = {"already": f"already at {result['version']}", "installed": f"installed fleetdeck {result['version']}",
             "upgraded": f"upgraded fleetdeck {result['previous']} -> {result['version']}"}
    _say(f"{words[result['status']]}; agent: {result['agent']}", args.json, **result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
