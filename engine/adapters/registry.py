"""LoRA adapters: the registry on disk, compatibility with a server, and hot-swap through vLLM's API."""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from engine.audit import trail as audit
from engine.vllm.record import ServerState
from engine.io.http_auth import bearer
from store.json_text import JsonTextError, parse_json, shown

WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
# A bound against absurd ranks in a folder from elsewhere, well above any vLLM serves (max_lora_rank <= 512).
MAX_RANK = 4096
# A registered version's own file (engine/adapters/versions.py): its content hash and provenance.
METADATA = "fleetdeck.json"


class AdapterError(Exception):
    """An adapter cannot be used; the message names the folder or the server's refusal."""


@dataclass
class Adapter:
    name: str
    path: str
    rank: int
    alpha: float | None
    target_modules: list[str]
    base_model: str | None
    size_bytes: int
    metadata: dict[str, Any] | None = None
    family: str = ""  # NAME of a `NAME@vN` version folder; the folder name otherwise
    version: int | None = None
    vllm_problems: list[str] = field(default_factory=list)  # what vLLM's PEFTHelper refuses in the config

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


VERSION_DIR = re.compile(r"^(?P<name>[A-Za-z0-9._-]+)@v(?P<n>[1-9][0-9]{0,5})$")
# vLLM 0.32 (vllm/lora/peft_helper.py) refuses these PEFT features when it loads an adapter.
_VLLM_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")


def vllm_problems(cfg: dict[str, Any]) -> list[str]:
    """What vLLM would refuse in an adapter_config.json, found before a server is asked."""
    problems = []
    saved = [m for m in (cfg.get("modules_to_save") or []) if m not in ("classifier", "score")]
    if saved:
        problems.append(f"modules_to_save {saved} (vLLM serves no fully trained modules such as lm_head or "
                        "embed_tokens; train without modules_to_save)")
    targets = cfg.get("target_modules") or []
    if isinstance(targets, list) and any(str(t).endswith("lm_head") for t in targets):
        problems.append("lm_head among target_modules (vLLM serves LoRA on the transformer layers only)")
    for key, what in (("use_dora", "DoRA"), ("lora_bias", "LoRA bias"), ("use_qalora", "QALoRA"),
                      ("layer_replication", "layer_replication"), ("alora_invocation_tokens", "Activated LoRA")):
        if cfg.get(key):
            problems.append(f"{what} ({key})")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in _VLLM_INITS:
        problems.append(f"init_lora_weights={init!r} (it changes the base weights; convert it to a plain LoRA first)")
    return problems


def effective_rank(cfg: dict[str, Any], rank: int) -> int:
    """The largest rank any module uses: `rank_pattern` can raise it above `r`."""
    pattern = cfg.get("rank_pattern") or {}
    ranks = [v for v in pattern.values() if isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_RANK] \
        if isinstance(pattern, dict) else []
    return max([rank, *ranks])


def read_adapter(folder: Path) -> Adapter:
    cfg_path = folder / "adapter_config.json"
    if not cfg_path.is_file():
        raise AdapterError(f"{folder}: no adapter_config.json (not a PEFT LoRA adapter folder)")
    weights = [folder / w for w in WEIGHT_FILES if (folder / w).is_file()]
    if not weights:
        raise AdapterError(f"{folder}: no adapter_model.safetensors or adapter_model.bin next to adapter_config.json")
    try:
        cfg = parse_json(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, JsonTextError) as exc:
        raise AdapterError(f"{cfg_path}: not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{cfg_path}: expected a JSON object")
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise AdapterError(f"{cfg_path}: peft_type {shown(cfg.get('peft_type'))} is not LORA")
    # An adapter folder can come from anywhere (`adapters import`): its numbers are checked, not trusted.
    rank = cfg.get("r")
    if isinstance(rank, float) and rank.is_integer():
        rank = int(rank)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= MAX_RANK:
        raise AdapterError(f"{cfg_path}: `r` (the LoRA rank) must be an integer from 1 to {MAX_RANK} (got {shown(rank)})")
    alpha = cfg.get("lora_alpha")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))
                              or not 0 < alpha < float("inf")):
        raise AdapterError(f"{cfg_path}: `lora_alpha` must be a positive number (got {shown(alpha)})")
    targets = cfg.get("target_modules") or []
    if isinstance(targets, str):
        targets = [targets]
    if not isinstance(targets, list):
        raise AdapterError(f"{cfg_path}: `target_modules` must be a list of module names (got {shown(targets)})")
    base = cfg.get("base_model_name_or_path")
    meta = None
    meta_path = folder / METADATA
    if meta_path.is_file():
        try:
            meta = parse_json(meta_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, JsonTextError):
            meta = None
        if not isinstance(meta, dict):
            meta = None  # fleetdeck's own notes; a folder without readable ones is still an adapter
    version = VERSION_DIR.match(folder.name)
    return Adapter(
        name=folder.name, path=str(folder.resolve()), rank=effective_rank(cfg, rank),
        alpha=float(alpha) if alpha is not None else None,
        target_modules=sorted(str(t) for t in targets), base_model=base if isinstance(base, str) else None,
        size_bytes=sum(f.stat().st_size for f in folder.iterdir() if f.is_file()), metadata=meta,
        family=version["name"] if version else folder.name, version=int(version["n"]) if version else None,
        vllm_problems=vllm_problems(cfg),
    )


def scan(roots: list[Path]) -> tuple[list[Adapter], list[str]]:
    """Every adapter under the roots (one level deep), and a message for each folder that is not one."""
    adapters, problems = [], []
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            problems.append(f"{root}: adapter root does not exist")
            continue
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            if not (folder / "adapter_config.json").exists():
                continue
            try:
                adapters.append(read_adapter(folder))
            except AdapterError as exc:
                problems.append(str(exc))
    return adapters, problems


def _same_model(a: str | None, b: str | None) -> bool:
    if not a or not b:
        return True  # unknown on one side: vLLM will judge
    return a.rstrip("/").split("/")[-1].lower() == b.rstrip("/").split("/")[-1].lower()


def compatibility_problems(adapter: Adapter, base_model: str, lora_enabled: bool, max_lora_rank: int) -> list[str]:
    problems = []
    if not lora_enabled:
        problems.append("the server was started without LoRA (set [lora] enable = true in its profile)")
    problems += [f"vLLM refuses {p}" for p in adapter.vllm_problems]
    if adapter.rank > max_lora_rank:
        problems.append(f"adapter rank {adapter.rank} is above the server's max LoRA rank {max_lora_rank}")
    if not _same_model(adapter.base_model, base_model):
        problems.append(f"adapter was trained on {adapter.base_model}, the server runs {base_model}")
    return problems


# What vLLM's worker says when it cannot take an adapter (vLLM 0.32 answers these with a 500 from
# /v1/load_lora_adapter), and what it means for the operator.
_REFUSALS = (
    (re.compile(r"LoRA rank (\d+) is greater than max_lora_rank (\d+)"),
     "the adapter's rank is above the server's max_lora_rank: raise [lora] max_lora_rank in the profile and restart, "
     "or train at a lower rank"),
    (re.compile(r"The size of tensor a \(\d+\) must match the size of tensor b \(\d+\)"),
     "the adapter's shapes do not match the served model: it was trained on another base model"),
    (re.compile(r"has already been loaded"), "unload it first, or load the new version under a new name"),
)


def content_hash(folder: Path) -> str:
    """SHA-256 over every file of the folder but the metadata, by relative path, in a fixed order."""
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != METADATA):
        rel = f.relative_to(folder).as_posix().encode()
        h.update(len(rel).to_bytes(4, "big") + rel)
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def integrity_problem(adapter: Adapter) -> str | None:
    """Why a registered version can no longer be trusted (its files changed), or None."""
    if adapter.version is None:
        return None
    expected = (adapter.metadata or {}).get("content_sha256")
    if not expected:
        return f"{adapter.name}: no content hash in {METADATA}; import it again as a new version"
    actual = content_hash(Path(adapter.path))
    if actual != expected:
        return (f"{adapter.name}: its files changed after it was registered (content hash {actual[:12]}, "
                f"registered {expected[:12]}); import the folder again as a new version")
    return None


def by_name(roots: list[Path], name: object) -> Adapter:
    """An adapter of the adapter roots by its folder name (never a path): `NAME@vN` exactly, or a bare
    NAME, which is that folder if there is one, else NAME's newest version."""
    found, _ = scan(roots)
    match = next((a for a in found if isinstance(name, str) and a.name == name), None)
    if match is None and isinstance(name, str) and "@" not in name:
        newest = sorted((a for a in found if a.family == name and a.version is not None), key=lambda a: a.version or 0)
        match = newest[-1] if newest else None
    if match is None:
        names = ", ".join(sorted(a.name for a in found)) or "none"
        raise AdapterError(f"no adapter {name!r} in the adapter roots (they hold: {names})")
    return match


def load_into(server: Any, adapter: Adapter, name: str | None = None, old: str | None = None) -> str:
    """Load (or, with `old`, swap in) an adapter after the checks vLLM would fail on; a refusal is
    audited and raised as AdapterError. `server` is a ready engine.vllm.record.ServerRecord."""
    name = name or adapter.name
    action = "adapter.load" if old is None else "adapter.swap"

    refusal = f"{server.id} is {server.state}, not ready" if server.state != ServerState.READY else None
    if refusal is None and adapter.version is not None and name != adapter.name:
        # a version's served name is its own: a name reused for other weights can hit stale prefix-cache blocks
        refusal = f"{adapter.name} is served as {adapter.name} only (a version's name is never given to other weights)"
    if refusal is None:
        refusal = integrity_problem(adapter)
    if refusal is None:
        lora = server.spec.get("lora", {})
        problems = compatibility_problems(adapter, server.spec.get("model", ""), lora.get("enable", False),
                                          lora.get("max_lora_rank", 16))
        refusal = f"not loading {adapter.name} into {server.id}: " + "; ".join(problems) if problems else None
    if refusal is not None:
        audit.refuse_if_read_only(action, name, server=server.id, adapter=name, path=adapter.path, old=old)
        audit.record(action, name, "refused", refusal, server=server.id, adapter=name, path=adapter.path, old=old)
        raise AdapterError(refusal)
    if old is None:
        return load(server.base_url, name, adapter.path, server.api_key, server=server.id)
    return swap(server.base_url, old, name, adapter.path, server.api_key, server=server.id)


def refusal_hint(message: str) -> str | None:
    return next((hint for pattern, hint in _REFUSALS if pattern.search(message)), None)


def error_message(r: httpx.Response) -> str:
    """vLLM's error text: `{"error": {"message": ...}}` (0.9 on) or the older flat `{"message": ...}`."""
    try:
        body = r.json()
    except ValueError:
        return r.text
    if isinstance(body, dict):
        inner = body.get("error")
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
        if body.get("message"):
            return str(body["message"])
    return r.text


def _post(base_url: str, path: str, body: dict[str, Any], api_key: str | None) -> str:
    try:
        r = httpx.post(f"{base_url}{path}", json=body, headers=bearer(api_key), timeout=120, trust_env=False)
    except httpx.HTTPError as exc:
        raise AdapterError(f"server at {base_url} did not answer: {exc}") from exc
    if r.status_code != 200:
        message = error_message(r)
        hint = refusal_hint(message)
        raise AdapterError(f"vLLM refused ({r.status_code}): {message}" + (f" ({hint})" if hint else ""))
    return r.text


def load(base_url: str, name: str, path: str, api_key: str | None = None, *, server: str | None = None) -> str:
    with audit.audited("adapter.load", name, refusals=(AdapterError,), server=server or base_url, adapter=name, path=path):
        return _load(base_url, name, path, api_key)


def _load(base_url: str, name: str, path: str, api_key: str | None) -> str:
    return _post(base_url, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path}, api_key)


def unload(base_url: str, name: str, api_key: str | None = None, *, server: str | None = None) -> str:
    with audit.audited("adapter.unload", name, refusals=(AdapterError,), server=server or base_url, adapter=name):
        return _unload(base_url, name, api_key)


def _unload(base_url: str, name: str, api_key: str | None) -> str:
    return _post(base_url, "/v1/unload_lora_adapter", {"lora_name": name}, api_key)


def loaded(base_url: str, api_key: str | None = None) -> list[dict[str, Any]]:
    r = httpx.get(f"{base_url}/v1/models", headers=bearer(api_key), timeout=5, trust_env=False)
    r.raise_for_status()
    return [m for m in r.json().get("data", []) if m.get("parent")]


def swap(base_url: str, old: str, new_name: str, new_path: str, api_key: str | None = None, *,
         server: str | None = None) -> str:
    """Load the new adapter first and only then unload the old one, so a task never points at nothing."""
    with audit.audited("adapter.swap", new_name, refusals=(AdapterError,), server=server or base_url, old=old,
                       adapter=new_name, path=new_path):
        _load(base_url, new_name, new_path, api_key)
        try:
            _unload(base_url, old, api_key)
        except AdapterError as exc:
            return f"{new_name} loaded; {old} could not be unloaded: {exc}"
        return f"{new_name} loaded, then {old} unloaded"
