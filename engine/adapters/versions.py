"""Adapter versions: immutable `NAME@vN` folders in the adapter roots, each with its content hash and provenance.

A version is never written again once registered: its files lose their write bits, its `fleetdeck.json`
carries the SHA-256 of everything else in the folder, and the served LoRA name is the folder's name, so
vLLM never sees a name reused for other weights (a replaced adapter under an old name can be answered from
stale prefix-cache blocks). A fine-tune registers its adapter as the next version of the spec's name;
`adapters import` registers a folder from anywhere else after the same checks.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import time
from pathlib import Path
from typing import Any

from engine.adapters.registry import VERSION_DIR as VERSION_RE
from engine.adapters.registry import METADATA, WEIGHT_FILES, Adapter, AdapterError, content_hash, read_adapter, scan
from engine.audit import trail as audit
from engine.audit.who import identity

NAME_RE = re.compile(r"^[A-Za-z0-9._-]+$")


def parse_ref(text: str) -> tuple[str, int | None]:
    """`NAME@vN` -> (NAME, N); a bare `NAME` -> (NAME, None). Anything else is refused."""
    m = VERSION_RE.match(text)
    if m:
        return m["name"], int(m["n"])
    if NAME_RE.match(text) and "@" not in text:
        return text, None
    raise AdapterError(f"{text!r} is not an adapter name or NAME@vN (letters, digits, . _ - only)")


def _file_sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def versions_of(roots: list[Path], name: str) -> list[Adapter]:
    """Every registered version of NAME in the roots, oldest first."""
    found, _ = scan(roots)
    return sorted((a for a in found if a.family == name and a.version is not None), key=lambda a: a.version or 0)


def _freeze(folder: Path) -> None:
    for p in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        p.chmod(stat.S_IMODE(p.stat().st_mode) & ~0o222)
    folder.chmod(stat.S_IMODE(folder.stat().st_mode) & ~0o222)


def provenance(source: Path, adapter: Adapter) -> dict[str, Any]:
    """What a version records of where it came from: the job's own metadata when a fine-tune made it."""
    meta = dict(adapter.metadata or {})
    base = meta.get("base_model") or adapter.base_model
    base_cfg = Path(str(base)) / "config.json" if base else None
    meta.update(
        base_model=base,
        base_config_sha256=_file_sha256(base_cfg) if base_cfg and base_cfg.is_file() else None,
        origin="job" if meta.get("job_id") else "import",
        source_path=str(source.resolve()),
        registered_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        registered_by=identity()["actor"],
    )
    return meta


def register(source: Path, root: Path, name: str, roots: list[Path] | None = None) -> Path:
    """Copy an adapter folder in as the next version of NAME; returns the new `NAME@vN` folder."""
    if not NAME_RE.match(name):
        raise AdapterError(f"adapter name {name!r}: use letters, digits, . _ - only (the version is added as @vN)")
    adapter = read_adapter(source)
    problems = adapter.vllm_problems
    if problems:
        raise AdapterError(f"{source}: vLLM would refuse this adapter: " + "; ".join(problems))
    root.mkdir(parents=True, exist_ok=True)
    meta = provenance(source, adapter)
    tmp = root / f".{name}.importing-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        for f in source.iterdir():
            # the adapter's own files only: checkpoints or tokenizer copies stay where they were
            if f.is_file() and (f.name in WEIGHT_FILES or f.name in ("adapter_config.json", "README.md")):
                shutil.copy2(f, tmp / f.name)
        meta["content_sha256"] = content_hash(tmp)
        known = [a.version or 0 for a in versions_of(list(roots or []) + [root], name)]
        n = max(known, default=0) + 1
        while True:
            target = root / f"{name}@v{n}"
            meta.update(name=name, version=n)
            (tmp / METADATA).write_text(json.dumps(meta, indent=2), encoding="utf-8")
            try:
                tmp.rename(target)  # atomic; fails if another registration took this number first
            except OSError:
                if not target.exists():
                    raise
                n += 1
                continue
            break
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _freeze(target)
    return target


def import_adapter(source: Path, name: str, roots: list[Path]) -> Path:
    """`adapters import`: audited, into the first adapter root."""
    if not roots:
        raise AdapterError("no adapter roots configured (set adapter_roots in the fleet config)")
    with audit.audited("adapter.import", name, refusals=(AdapterError,), path=str(source)) as entry:
        target = register(Path(source), Path(roots[0]), name, roots)
        entry.target = target.name
        entry.params["version"] = target.name
        return target
