"""`fleetdeck bundle --out DIR`: the offline bundle to carry across the air gap (engine/bundle/build.py)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any


def extras(text: str) -> list[str]:
    from engine.bundle.build import EXTRAS

    names = [e.strip() for e in text.split(",") if e.strip()]
    unknown = [e for e in names if e not in EXTRAS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown extra {unknown[0]!r}; known: {', '.join(EXTRAS)} (or '' for none)")
    return names


def python_version(text: str) -> str:
    if not re.fullmatch(r"3\.\d{1,2}", text):
        raise argparse.ArgumentTypeError(f"expected a Python version such as 3.11, got {text!r}")
    return text


def register(sub: Any) -> None:
    p = sub.add_parser("bundle", parents=[sub.common], help="make the offline install bundle (run where an index is reachable)",
                       description="Every wheel fleetdeck and the chosen extras need for a target Python and platform, "
                                   "fleetdeck's own wheel, a requirements file with SHA-256 hashes, a manifest and an "
                                   "install script. Carry DIR across the air gap; `sh DIR/install.sh` installs it "
                                   "there, and `fleetdeck nodes install NODE --bundle DIR` pushes it to a node.")
    p.add_argument("--out", required=True, metavar="DIR", help="the folder to write (new or empty)")
    p.add_argument("--extras", type=extras, default=["proxy"], metavar="LIST",
                   help="comma-separated extras (proxy, train, serve; '' for none; default: proxy)")
    p.add_argument("--python", type=python_version, metavar="X.Y", help="the target Python (default: this one)")
    p.add_argument("--platform", action="append", default=[], metavar="TAG",
                   help="a target platform tag, e.g. manylinux2014_x86_64 (repeatable; default: this host's)")
    p.add_argument("--find-links", action="append", default=[], type=Path, metavar="DIR",
                   help="also take wheels from this folder (a mirror or local wheelhouse; repeatable)")
    p.add_argument("--no-index", action="store_true", help="use only --find-links, no package index")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from engine.bundle.build import BundleError, build, digest
    from fleetdeck import __version__
    from fleetdeck.cmdutil import err

    for link in args.find_links:
        if not link.is_dir():
            return err(f"--find-links {link}: no such folder")
    if args.no_index and not args.find_links:
        return err("--no-index needs --find-links DIR (where else would the wheels come from?)")
    out = Path(args.out).expanduser()
    try:
        manifest = build(out, __version__, args.extras, args.python, args.platform, args.find_links, args.no_index)
    except BundleError as exc:
        return err(f"bundle: {exc}")
    size = sum(f.size for f in manifest.files)
    print(f"bundle of fleetdeck {manifest.fleetdeck} (extras: {', '.join(manifest.extras) or 'none'}) for Python "
          f"{manifest.python} on {', '.join(manifest.platforms)}: {len(manifest.wheels())} wheels, "
          f"{size / 2**20:.1f} MiB in {out}")
    print(f"digest (SHA-256 of manifest.json, to compare on the far side): {digest(out)}")
    print(f"install there: sh {out.name}/install.sh    or push to a node: fleetdeck nodes install NODE --bundle {out}")
    return 0
