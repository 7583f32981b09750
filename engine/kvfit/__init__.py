"""The KV-cache and VRAM planner: pure functions, no GPU, no network."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

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
    from engine.kvfit.local_models import configured_roots, find_local, read_config
    from engine.kvfit.weights import folder_weight_bytes

    try:
        return _load_model(spec, model_roots, configured_roots, find_local, read_config, folder_weight_bytes)
    except (OSError, RuntimeError) as exc:
        # A path the OS refuses (a name too long, ~user with no such user, a folder that cannot be listed):
        # one line naming it, never a traceback.
        raise ArchError(f"{_short(spec)}: cannot read it as a model ({getattr(exc, 'strerror', None) or exc})") from None


def _short(spec: str) -> str:
    return spec if len(spec) <= 120 else spec[:117] + "..."


def _load_model(spec: str, model_roots: Sequence[Path] | None, configured_roots: Callable[[], list[Path]],
                find_local: Callable[[str, Sequence[Path]], Path | None], read_config: Callable[[Path], dict[str, Any]],
                folder_weight_bytes: Callable[[Path], int | None]) -> tuple[ModelArch, int | None]:
    if "\x00" in spec:
        raise ArchError("the model name holds a NUL character")
    looks_like_path = spec.startswith(("/", "./", "../", "~"))
    path = Path(spec).expanduser()
    local = None
    if not (path.exists() or looks_like_path):
        # What is on disk wins over the catalogue: it is what vLLM will load.
        local = find_local(spec, configured_roots() if model_roots is None else model_roots)
    if local is not None:
        path = local
    if local is not None or path.exists() or looks_like_path:
        if not path.is_dir():
            raise ArchError(f"{_short(str(path))}: not a model folder (expected a folder holding config.json)")
        cfg = read_config(path / "config.json")
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
