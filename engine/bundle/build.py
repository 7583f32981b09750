"""`fleetdeck bundle --out DIR`: everything a host with no package index needs to install this fleetdeck.

Run where an index (or a mirror, or a local wheelhouse: `--find-links DIR --no-index`) is reachable. The
folder holds wheels/ (fleetdeck's own wheel, every wheel it and the chosen extras need for the target
Python and platform, and pip's own wheel to install with), requirements.txt (each wheel pinned with its
SHA-256, for pip's hash-checking mode), manifest.json (versions, target, when, and every file's SHA-256)
and install.sh / install.py (engine/bundle/install_script.py: verifies, makes a venv, installs with
`--no-index --require-hashes`). It is written next to DIR and renamed into place, so a half-made bundle
never looks like a bundle.
"""

from __future__ import annotations

import json
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from engine.bundle import install_script
from engine.bundle.wheels import WheelError, normalize, own_wheel

EXTRAS = ("proxy", "train", "serve")
INSTALL_SH = """#!/bin/sh
# fleetdeck's offline install: checks every file of this bundle against manifest.json, then installs into
# a virtual environment with no package index. FLEETDECK_PYTHON picks the Python (default: python3).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
exec "${FLEETDECK_PYTHON:-python3}" "$here/install.py" "$@"
"""


class BundleError(Exception):
    """The bundle could not be made; the message is for the operator."""


class BundleFile(BaseModel):
    model_config = ConfigDict(frozen=True)
    name: str = Field(pattern=r"^[A-Za-z0-9._+/-]+$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class Manifest(BaseModel):
    """manifest.json, read back by install.py (plain JSON there) and by `nodes install` (this model)."""

    model_config = ConfigDict(frozen=True, extra="ignore")
    format: int = 1
    fleetdeck: str = Field(pattern=r"^[A-Za-z0-9.+!_-]+$")
    extras: list[str]
    python: str = Field(pattern=r"^3\.\d+$")
    platforms: list[str]
    implementation: str = "cp"
    created: str
    built_by: str
    bootstrap_pip: str
    files: list[BundleFile]

    def wheels(self) -> list[str]:
        return [f.name for f in self.files if f.name.startswith("wheels/")]


def read_manifest(bundle: Path) -> Manifest:
    """The bundle's manifest, typed; BundleError when the folder is not a bundle."""
    try:
        return Manifest.model_validate(install_script.read_manifest(bundle))
    except install_script.Refused as exc:
        raise BundleError(str(exc)) from None
    except ValueError as exc:
        raise BundleError(f"{bundle / install_script.MANIFEST}: not a fleetdeck bundle manifest ({exc})") from None


def _wheel_name_version(filename: str) -> tuple[str, str]:
    parts = filename[:-len(".whl")].split("-")
    if len(parts) < 5:
        raise BundleError(f"{filename}: not a wheel file name")
    return normalize(parts[0]), parts[1]


def _pip_download(dest: Path, requirements: list[str], python: str | None, platforms: list[str],
                  find_links: list[Path], no_index: bool) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--quiet", "--dest", str(dest),
           "--only-binary", ":all:"]
    if python:
        cmd += ["--python-version", python, "--implementation", "cp"]
    for plat in platforms:
        cmd += ["--platform", plat]
    if no_index:
        cmd.append("--no-index")
    for link in find_links:
        cmd += ["--find-links", str(link)]
    done = subprocess.run([*cmd, *requirements], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        lines = [line.strip() for line in done.stdout.splitlines() if line.strip()]
        why = next((line for line in reversed(lines) if line.startswith("ERROR")), lines[-1] if lines else "")
        raise BundleError(f"pip download failed: {why}")


def build(out: Path, version: str, extras: list[str], python: str | None = None, platforms: list[str] | None = None,
          find_links: list[Path] | None = None, no_index: bool = False) -> Manifest:
    """Make the bundle of fleetdeck `version` (the running code's) in `out` (which must not exist yet, or be
    empty)."""
    platforms = list(platforms or [])
    if platforms and not python:
        raise BundleError("--platform needs --python too (pip downloads for a target it is told in full)")
    unknown = sorted(set(extras) - set(EXTRAS))
    if unknown:
        raise BundleError(f"unknown extra(s) {', '.join(unknown)}; known: {', '.join(EXTRAS)}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BundleError(f"{out} exists and is not an empty folder; pick a new one")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        wheels = work / install_script.WHEELS
        wheels.mkdir()
        own_dir = work / "own"
        own_dir.mkdir()
        try:
            own = own_wheel(own_dir, version)
        except WheelError as exc:
            raise BundleError(str(exc)) from None
        # A direct reference to the wheel just built: an index's own "fleetdeck" can never stand in for it.
        spec = f"fleetdeck[{','.join(extras)}] @ {own.as_uri()}" if extras else f"fleetdeck @ {own.as_uri()}"
        _pip_download(wheels, [spec, "pip"], python, platforms, list(find_links or []), no_index)
        shutil.rmtree(own_dir)
        if not (wheels / own.name).is_file():
            raise BundleError(f"pip did not take fleetdeck's own wheel {own.name} (another fleetdeck {version} "
                              "in --find-links or the index?)")
        pins: list[str] = []
        files: list[BundleFile] = []
        pip_wheel = None
        for whl in sorted(wheels.glob("*.whl")):
            name, ver = _wheel_name_version(whl.name)
            digest = install_script.sha256_of(whl)
            pins.append(f"{name}=={ver} --hash=sha256:{digest}")
            files.append(BundleFile(name=f"{install_script.WHEELS}/{whl.name}", sha256=digest, size=whl.stat().st_size))
            if name == "pip":
                pip_wheel = whl.name
        strays = sorted(p.name for p in wheels.iterdir() if not p.name.endswith(".whl"))
        if strays:
            raise BundleError(f"pip left files that are not wheels: {', '.join(strays)}")
        if pip_wheel is None:
            raise BundleError("no pip wheel was found for the target; the far side installs with it")
        here = f"{sys.version_info.major}.{sys.version_info.minor}"
        texts = {
            install_script.REQUIREMENTS: "# fleetdeck bundle: every wheel, pinned with its SHA-256 (pip --require-hashes)\n"
                                         + "\n".join(pins) + "\n",
            "install.py": Path(install_script.__file__).read_text(encoding="utf-8"),
            "install.sh": INSTALL_SH,
        }
        for name, text in texts.items():
            path = work / name
            path.write_text(text, encoding="utf-8")
            files.append(BundleFile(name=name, sha256=install_script.sha256_of(path), size=path.stat().st_size))
        (work / "install.sh").chmod(0o755)
        manifest = Manifest(
            fleetdeck=version, extras=list(extras), python=python or here,
            platforms=platforms or [_host_platform()], created=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            built_by=f"fleetdeck {version} on Python {platform.python_version()}", bootstrap_pip=pip_wheel,
            files=sorted(files, key=lambda f: f.name))
        (work / install_script.MANIFEST).write_text(json.dumps(manifest.model_dump(), indent=2) + "\n", encoding="utf-8")
        if out.exists():
            out.rmdir()
        work.rename(out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return manifest


def _host_platform() -> str:
    """This host's platform as pip names it (what `pip download` targets when told none)."""
    import sysconfig

    return re.sub(r"[-.]", "_", sysconfig.get_platform())


def digest(bundle: Path) -> str:
    return install_script.bundle_digest(bundle)
