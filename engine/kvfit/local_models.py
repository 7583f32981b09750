"""Models where vLLM finds them, offline: a hub id resolved through the local Hugging Face cache (as the hub
client lays it out: models--ORG--NAME/refs/main names the revision, snapshots/REV/ holds the files, each
a symlink into blobs/) and through the fleet config's `[models] roots`.

vLLM run with HF_HUB_OFFLINE=1 serves `Qwen/Qwen2-7B-Instruct` from that cache; the planner must read
the same config.json, not say "unknown model". The cache folder is the hub client's: HF_HUB_CACHE, else
HF_HOME/hub, else XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub. A model root holds
model folders as ORG/NAME/ or NAME/ (each with a config.json), or is itself laid out as a hub cache.
Nothing here reaches the network; nothing is written.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_CACHE_DIR = re.compile(r"^models--([A-Za-z0-9][A-Za-z0-9._-]*)--([A-Za-z0-9][A-Za-z0-9._-]*)$")


def hub_cache_dir() -> Path:
    """The hub client's cache folder, from the same variables in the same order it reads them."""
    env = os.environ
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    xdg = env.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "huggingface" / "hub"


def _snapshot(repo_dir: Path) -> Path | None:
    """The snapshot refs/main names (what the hub client loads offline), or the only snapshot there is."""
    try:
        with open(repo_dir / "refs" / "main", "rb") as fh:
            rev = fh.read(256).decode("utf-8").strip()  # a commit hash; more is not a ref the client wrote
    except ValueError:  # not UTF-8: the hub client cannot read that ref either, so nothing here loads
        return None
    except OSError:
        rev = ""
    snaps = repo_dir / "snapshots"
    if rev and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", rev) and (snaps / rev / "config.json").is_file():
        return snaps / rev
    if rev:
        return None  # refs/main names a snapshot that is not here: the client would not load another
    try:
        found = [p for p in snaps.iterdir() if (p / "config.json").is_file()]
    except OSError:
        return None
    return found[0] if len(found) == 1 else None


def in_hub_cache(repo_id: str, cache: Path) -> Path | None:
    """The snapshot folder of `repo_id` in a hub cache (the exact id first, then ignoring case)."""
    org, _, name = repo_id.partition("/")
    exact = cache / f"models--{org}--{name}"
    if exact.is_dir():
        return _snapshot(exact)
    try:
        for d in cache.iterdir():
            if d.name.lower() == exact.name.lower() and d.is_dir():
                return _snapshot(d)
    except OSError:
        return None
    return None


def _in_root(repo_id: str, root: Path) -> Path | None:
    org, _, name = repo_id.partition("/")
    for candidate in (root / org / name, root / name):
        if (candidate / "config.json").is_file():
            return candidate
    return in_hub_cache(repo_id, root)


def find_local(name: str, roots: Sequence[Path] = ()) -> Path | None:
    """A hub id's folder on this host, where vLLM would find it offline (None: not here)."""
    if not HUB_ID.match(name.strip()):
        return None
    repo_id = name.strip()
    found = in_hub_cache(repo_id, hub_cache_dir())
    if found is not None:
        return found
    for root in roots:
        found = _in_root(repo_id, Path(root))
        if found is not None:
            return found
    return None


def vllm_model_arg(name: str, roots: Sequence[Path]) -> str:
    """What to hand vLLM as the model: the hub id itself when the hub cache has it (vLLM finds it there,
    offline), else the folder a model root holds for it (vLLM does not read fleetdeck's roots), else the
    name unchanged (a path, or a model vLLM will report missing)."""
    stripped = name.strip()
    if not HUB_ID.match(stripped) or in_hub_cache(stripped, hub_cache_dir()) is not None:
        return name
    found = find_local(stripped, roots)
    return str(found) if found is not None else name


def configured_roots() -> list[Path]:
    """`[models] roots` of this host's fleet config (FLEETDECK_CONFIG or the default file); none if it
    cannot be read (the command that reads the config itself says why)."""
    from fleet.config import load_fleet_config
    from store.config_files import ConfigError

    try:
        return list(load_fleet_config(None).models.roots)
    except ConfigError:
        return []


@dataclass(frozen=True)
class LocalModel:
    """One model on disk, as `models ls` shows it."""

    name: str  # the hub id for a cached or ORG/NAME model, else the folder
    path: str
    source: str  # hub-cache | root
    architecture: str | None
    model_type: str | None
    dtype: str | None
    quantization: str | None
    size_bytes: int
    context_limit: int | None
    error: str | None = None  # a config.json that does not parse: listed, with why

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: Any) -> "LocalModel":
        """One entry of an agent's answer; a field of the wrong kind is a ValueError, never trusted."""
        from pydantic import TypeAdapter

        return TypeAdapter(cls).validate_python(doc)


def _size(folder: Path) -> int:
    """Bytes on disk, following the snapshot's symlinks into blobs/ (each blob counted once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, _, files in os.walk(folder):
        for f in files:
            try:
                st = os.stat(os.path.join(dirpath, f))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


# A config.json is a few KiB (the largest multimodal ones tens of KiB): past this it is not a model's config,
# and reading it whole would hold the planner (or a node's agent listing its models) on one damaged file.
MAX_CONFIG_BYTES = 16 * 1024 * 1024


def read_config(config: Path) -> dict[str, Any]:
    """A model folder's config.json as a dict; ArchError naming the file and what is wrong with it."""
    import stat

    from engine.kvfit.arch import ArchError

    try:
        st = config.stat()
    except FileNotFoundError:
        raise ArchError(f"{config.parent}: no config.json in this folder; a Hugging Face model folder is needed") from None
    except OSError as exc:  # a symlink loop, a permission, a name too long
        raise ArchError(f"{config}: cannot read it ({exc.strerror or exc})") from None
    if stat.S_ISDIR(st.st_mode):
        raise ArchError(f"{config}: is a folder, not a file; a Hugging Face model folder holds a config.json file")
    if not stat.S_ISREG(st.st_mode):
        raise ArchError(f"{config}: not a regular file (a device or a pipe); expected the model's JSON config")
    if st.st_size > MAX_CONFIG_BYTES:
        raise ArchError(f"{config}: {st.st_size / 1024**2:.0f} MiB, not a model config (those are a few KiB)")
    try:
        with open(config, "rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise ArchError(f"{config}: over {MAX_CONFIG_BYTES // 1024**2} MiB, not a model config (those are a few KiB)")
        cfg = json.loads(raw.decode("utf-8"))
    except OSError as exc:
        raise ArchError(f"{config}: cannot read it ({exc.strerror or exc})") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ArchError(f"{config}: cannot read it as JSON ({str(exc)[:120]})") from None
    if not isinstance(cfg, dict):
        raise ArchError(f"{config}: expected a JSON object")
    return cfg


def describe(name: str, folder: Path, source: str) -> LocalModel:
    from engine.kvfit.arch import ArchError, arch_from_config

    arch_name = model_type = dtype = quant = error = None
    limit = None
    try:
        cfg = read_config(folder / "config.json")
        archs = cfg.get("architectures")
        arch_name = str(archs[0]) if isinstance(archs, list) and archs else None
        text_config = cfg.get("text_config")
        text = text_config if isinstance(text_config, dict) else cfg
        raw = cfg.get("torch_dtype") or cfg.get("dtype") or text.get("torch_dtype") or text.get("dtype")
        dtype = str(raw) if raw else None
        arch = arch_from_config(cfg, name=name)
        model_type = arch.model_type
        quant = arch.quantization.label if arch.quantization.method != "none" else None
        limit = arch.derived_max_model_len
    except (OSError, ValueError, ArchError) as exc:
        error = str(exc)[:200]
    return LocalModel(name, str(folder), source, arch_name, model_type, dtype, quant, _size(folder), limit, error)


def _cache_models(cache: Path, source: str) -> Iterable[LocalModel]:
    try:
        entries = sorted(cache.iterdir())
    except OSError:
        return
    for d in entries:
        m = _CACHE_DIR.match(d.name)
        if m and d.is_dir():
            snap = _snapshot(d)
            if snap is not None:
                yield describe(f"{m.group(1)}/{m.group(2)}", snap, source)


def list_local(roots: Sequence[Path] = ()) -> list[LocalModel]:
    """Every model this host holds: the hub cache's, then each root's (folders with a config.json, one or
    two levels down, and a hub-cache layout inside the root)."""
    out = list(_cache_models(hub_cache_dir(), "hub-cache"))
    for root in roots:
        root = Path(root)
        out += _cache_models(root, "root")
        try:
            level1 = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(("models--", ".")))
        except OSError:
            continue
        for d in level1:
            if (d / "config.json").is_file():
                out.append(describe(str(d), d, "root"))
                continue
            try:
                subs = sorted(p for p in d.iterdir() if p.is_dir() and (p / "config.json").is_file())
            except OSError:  # a folder this user cannot list holds nothing it can serve
                continue
            for sub in subs:
                out.append(describe(f"{d.name}/{sub.name}", sub, "root"))
    return out
