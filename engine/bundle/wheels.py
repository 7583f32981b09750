"""Wheels for a bundle: fleetdeck's own (built from the checkout this code runs from, or re-packed from the
installed distribution when there is no checkout), and a re-packed wheel of any installed distribution.

Re-packing exists because an installed fleetdeck must be able to make a bundle (a dashboard host installed
from a bundle has no checkout to build from): the files an installation's RECORD lists, under
site-packages, are exactly the wheel's contents, minus the console scripts (which the installer makes
again from entry_points.txt) and the byte-code. The same function lets a site (and the tests) make a
local wheelhouse from an environment that already works, with no index at all.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

PACKAGES = ("fleetdeck", "tui", "engine", "fleet", "store")  # pyproject's [tool.setuptools.packages.find]
# Installer bookkeeping that is not part of a wheel (RECORD is written afresh).
_NOT_IN_WHEEL = {"RECORD", "INSTALLER", "REQUESTED", "direct_url.json"}


class WheelError(Exception):
    """A wheel could not be made; the message says which distribution and why."""


def normalize(name: str) -> str:
    """A distribution name as wheel file names spell it (PEP 427/503)."""
    return re.sub(r"[-_.]+", "_", name).lower()


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _wheel_tag(wheel_file: str) -> str:
    tags = [line.split(":", 1)[1].strip() for line in wheel_file.splitlines() if line.startswith("Tag:")]
    if not tags:
        return "py3-none-any"
    parts = [t.split("-") for t in tags]
    return "-".join(".".join(sorted({p[i] for p in parts})) for i in range(3))


def is_editable(dist: metadata.Distribution) -> bool:
    text = dist.read_text("direct_url.json")
    if not text:
        return False
    try:
        return bool(json.loads(text).get("dir_info", {}).get("editable"))
    except ValueError:
        return False


def repack_installed(name: str, out_dir: Path) -> Path:
    """A wheel of the installed distribution `name`, from the files its RECORD lists."""
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        raise WheelError(f"{name} is not installed here") from None
    if is_editable(dist):
        raise WheelError(f"{name} is installed editable (from a checkout): build it from the checkout instead")
    files = dist.files
    if not files:
        raise WheelError(f"{name} {dist.version}: its installation lists no files (no RECORD)")
    site = Path(str(dist.locate_file("")))
    info_dir = next((f.parts[0] for f in files if f.parts[0].endswith(".dist-info")), None)
    if info_dir is None:
        raise WheelError(f"{name} {dist.version}: no .dist-info folder among its files")
    wheel_meta = dist.read_text("WHEEL") or "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    target = out_dir / f"{normalize(dist.metadata['Name'])}-{dist.version}-{_wheel_tag(wheel_meta)}.whl"
    out_dir.mkdir(parents=True, exist_ok=True)
    record: list[str] = []
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(files, key=str):
            rel = f.as_posix()
            if rel.startswith("..") or "__pycache__" in f.parts or rel.endswith(".pyc"):
                continue  # scripts outside site-packages come back from entry_points.txt; byte-code is rebuilt
            if f.parts[0] == info_dir and f.name in _NOT_IN_WHEEL:
                continue
            path = site / f
            if not path.is_file():
                raise WheelError(f"{name} {dist.version}: {rel} is listed but missing from {site}")
            data = path.read_bytes()
            info = zipfile.ZipInfo(rel, date_time=(1980, 1, 1, 0, 0, 0))  # the same bytes every time
            info.external_attr = (path.stat().st_mode & 0o777 | 0o100000) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
            record.append(f"{rel},{_record_hash(data)},{len(data)}")
        record.append(f"{info_dir}/RECORD,,")
        zf.writestr(zipfile.ZipInfo(f"{info_dir}/RECORD", date_time=(1980, 1, 1, 0, 0, 0)), "\n".join(record) + "\n")
    return target


def checkout_root() -> Path | None:
    """The source tree this fleetdeck runs from, when it runs from one (a clone, an editable install).
    Found from this package (the engine may not import the command line; they ship together)."""
    root = Path(__file__).resolve().parents[2]
    pyproject = root / "pyproject.toml"
    try:
        if pyproject.is_file() and re.search(r'(?m)^name\s*=\s*"fleetdeck"', pyproject.read_text(encoding="utf-8")):
            return root
    except OSError:
        return None
    return None


def own_wheel(out_dir: Path, running_version: str) -> Path:
    """fleetdeck's own wheel, of the code that is running (`running_version`, fleetdeck.__version__): built
    from its checkout (`pip wheel --no-deps`, on a copy, so the checkout gets no build/ or egg-info), or
    re-packed from the installed distribution."""
    root = checkout_root()
    if root is None:
        wheel = repack_installed("fleetdeck", out_dir)
    else:
        with tempfile.TemporaryDirectory(prefix="fleetdeck-src-") as tmp:
            src = Path(tmp) / "src"
            src.mkdir()
            for name in ("pyproject.toml", "README.md", "LICENSE"):
                if (root / name).is_file():
                    shutil.copy2(root / name, src / name)
            for pkg in PACKAGES:
                shutil.copytree(root / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check",
                   "--quiet", "-w", str(out_dir), str(src)]
            if _has_setuptools():
                cmd[4:4] = ["--no-build-isolation", "--no-index"]  # build with what is here: no index needed
            done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            if done.returncode != 0:
                tail = " | ".join(line for line in done.stdout.splitlines()[-3:] if line.strip())
                raise WheelError(f"building fleetdeck's wheel from {root} failed: {tail}")
        found = sorted(out_dir.glob("fleetdeck-*.whl"))
        if not found:
            raise WheelError(f"pip built no fleetdeck wheel from {root}")
        wheel = found[-1]
    version = wheel.name.split("-")[1]
    if version != running_version:
        raise WheelError(f"the wheel is fleetdeck {version} but the running code says {running_version}: "
                         "pyproject.toml's version and fleetdeck/__init__.py's __version__ must agree")
    return wheel


def _has_setuptools() -> bool:
    import importlib.util

    return importlib.util.find_spec("setuptools") is not None
