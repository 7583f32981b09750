"""Weight bytes: exactly from safetensors headers when the model is on disk, else from the shape.

A safetensors file starts with an 8-byte little-endian header length and a JSON header that gives every
tensor's byte range, so the exact size is known without reading a single tensor.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from engine.kvfit.arch import ArchError, ModelArch, param_count

MAX_HEADER_BYTES = 100 * 1024 * 1024


def safetensors_bytes(path: Path) -> int:
    """Sum of the tensor byte ranges of one .safetensors file, read from its header only. ArchError, naming the
    file, for one that cannot be read or whose header is not the format's."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) != 8:
                raise ArchError(f"{path}: too short to be a safetensors file")
            (length,) = struct.unpack("<Q", head)
            if length > MAX_HEADER_BYTES:
                raise ArchError(f"{path}: safetensors header claims {length} bytes; the file is damaged")
            raw = fh.read(length)
    except OSError as exc:
        raise ArchError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ArchError(f"{path}: safetensors header is not valid JSON ({str(exc)[:80]})") from None
    if not isinstance(header, dict):
        raise ArchError(f"{path}: safetensors header is not a JSON object")
    total = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise ArchError(f"{path}: tensor {name[:80]!r} has no valid data_offsets (two byte positions, start <= end)")
        total += offsets[1] - offsets[0]
    return total


def _index_files(folder: Path) -> set[str] | None:
    """The weight files model.safetensors.index.json names, or None without a usable index. vLLM loads only
    those (filter_duplicate_safetensors_files): a repo that also ships consolidated.safetensors (Mistral's own
    format) holds every weight twice on disk, once in memory."""
    index = folder / "model.safetensors.index.json"
    try:
        if not index.is_file() or index.stat().st_size > MAX_HEADER_BYTES:
            return None
        doc = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        return None
    return {str(f) for f in weight_map.values()}


def folder_weight_bytes(folder: Path) -> int | None:
    """Exact weight bytes of a model folder (the files vLLM loads), or None when it holds no safetensors files."""
    try:
        files = sorted(folder.glob("*.safetensors"))
    except OSError as exc:
        raise ArchError(f"{folder}: cannot list it ({exc.strerror or exc})") from None
    named = _index_files(folder)
    if named is not None:
        files = [f for f in files if f.name in named] or files
    if not files:
        return None
    return sum(safetensors_bytes(f) for f in files)


def _bytes_per_quantized_weight(arch: ModelArch) -> float:
    q = arch.quantization
    if q.method in ("awq", "gptq"):
        # packed 4/8-bit values + an fp16 scale and a packed zero point per group; group size 0 is GPTQ's
        # per-channel scheme (group_size -1: one scale per output column, a negligible share of the bytes)
        return q.bits / 8 + ((2 + q.bits / 8) / q.group_size if q.group_size > 0 else 0.0)
    if q.method == "fp8":
        return 1.0
    if q.method == "mxfp4":
        return 0.5 + 1 / 32  # 4-bit values + one e8m0 scale per 32
    if q.method == "bnb4":
        return 0.5 + 4 / 64  # nf4 + an fp32 absmax per 64 (before double quantization)
    if q.method == "bnb8":
        return 1.0
    return 2.0


def estimated_weight_bytes(arch: ModelArch) -> int:
    """Total checkpoint bytes from the shape: quantized decoder matrices, 16-bit everything else.

    MoE experts are counted whole (every expert is resident). For gpt-oss only the experts are MXFP4.
    """
    p = param_count(arch)
    q_bytes = _bytes_per_quantized_weight(arch)
    if arch.quantization.method == "mxfp4" and arch.is_moe:
        expert = 3 * arch.hidden_size * arch.moe_intermediate_size * arch.num_experts * max(0, arch.num_layers - arch.first_dense_layers)
        linear = (p["linear"] - expert) * 2 + expert * q_bytes
    else:
        linear = p["linear"] * q_bytes
    return int(linear + 2 * (p["embed"] + p["head"] + p["other"]))


def weight_bytes_per_gpu(total: int, arch: ModelArch, tp: int) -> int:
    """Per GPU under tensor parallelism. Embeddings and matrices split; norms are replicated."""
    if tp <= 1:
        return total
    # never more than the checkpoint holds (exact bytes of a tiny or partial checkpoint can be below the shape's
    # norms): a GPU's share is never above the whole
    replicated = min(total, 2 * (arch.num_layers * 2 + 1) * arch.hidden_size)
    return int((total - replicated) / tp + replicated)
