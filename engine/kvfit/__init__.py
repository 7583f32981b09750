"""The KV-cache and VRAM planner: pure functions, no GPU, no network."""

from __future__ import annotations

import json
from pathlib import Path

from engine.kvfit.arch import ArchError, ModelArch, arch_from_config
from engine.kvfit.catalogue import catalogue_arch, list_models
from engine.kvfit.plan import FIT_LENGTHS, KV_DTYPES, FitRequest, FitResult, fit_table, plan

__all__ = [
    "ArchError", "ModelArch", "FitRequest", "FitResult", "FIT_LENGTHS", "KV_DTYPES",
    "fit_table", "list_models", "load_model", "plan",
]


def load_model(spec: str) -> tuple[ModelArch, int | None]:
    """A local model folder (config.json, exact weight bytes from safetensors) or a catalogue name.

    Returns the shape and the exact weight bytes when the weights are on disk.
    """
    from engine.kvfit.weights import folder_weight_bytes

    path = Path(spec).expanduser()
    if path.exists() or spec.startswith(("/", "./", "../", "~")):
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
        arch = arch_from_config(cfg, name=str(path))
        return arch, folder_weight_bytes(path)
    return catalogue_arch(spec), None
