"""The KV-cache and VRAM planner: pure functions, no GPU, no network."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from engine.kvfit.arch import ArchError, ModelArch, arch_from_config
from engine.kvfit.catalogue import catalogue_arch, list_models
from engine.kvfit.kv_cache import KV_DTYPES
from engine.kvfit.plan import FIT_LENGTHS, FitRequest, FitResult, fit_table, plan

__all__ = [
    "ArchError", "ModelArch", "FitRequest", "FitResult", "FIT_LENGTHS", "KV_DTYPES",
    "fit_table", "list_models", "load_model", "plan",
]


def load_model(spec: str, model_roots: Sequence[Path] | None = None) -> tuple[ModelArch, int | None]:
    """A local model folder (config.json, exact weight bytes from safetensors), a hub id found where vLLM
    finds it offline (the Hugging Face cache, then `model_roots`: by default the fleet config's
    `[models] roots`; engine/kvfit/local_models.py), or a catalogue name.

    Returns the shape and the exact weight bytes when the weights are on disk.
    """
    from engine.kvfit.local_models import configured_roots, find_local
    from engine.kvfit.weights import folder_weight_bytes

    path = Path(spec).expanduser()
    local = None
    if not (path.exists() or spec.startswith(("/", "./", "../", "~"))):
        # What is on disk wins over the catalogue: it is what vLLM will load.
        local = find_local(spec, configured_roots() if model_roots is None else model_roots)
    if local is not None:
        path = local
    if local is not None or path.exists() or spec.startswith(("/", "./", "../", "~")):
        if not path.is_dir():
            raise ArchError(f"{path}: not a model folder (expected a folder holding config.json)")
        config = path / "config.json"
        if not config.is_file():
            raise ArchError(f"{path}: no config.json in this folder; a Hugging Face model folder is needed")
        try:
            cfg = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ArchError(f"{config}: cannot read it as JSON ({exc})") from exc
        if not isinstance(cfg, dict):
            raise ArchError(f"{config}: expected a JSON object")
        arch = arch_from_config(cfg, name=spec.strip() if local is not None else str(path))
        return arch, folder_weight_bytes(path)
    try:
        return catalogue_arch(spec), None
    except ArchError as exc:
        from engine.kvfit.local_models import HUB_ID, hub_cache_dir

        if HUB_ID.match(spec.strip()):  # say where it was looked for, as vLLM would look offline
            raise ArchError(f"{exc}; it is not in the Hugging Face cache ({hub_cache_dir()}) or the fleet "
                            "config's [models] roots either") from None
        raise
