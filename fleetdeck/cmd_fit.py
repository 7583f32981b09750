"""`fleetdeck fit`: will this model fit, and how many requests will it hold."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from fleetdeck.argtypes import integer, number

if TYPE_CHECKING:
    from engine.kvfit.plan import FitRequest
    from fleet.model import GpuSnapshot

GIB = 1024**3


def register(sub: Any) -> None:
    p = sub.add_parser(
        "fit", parents=[sub.common],
        help="plan vLLM's KV cache and VRAM for a model before launching it",
        description="vLLM's KV-cache arithmetic for MODEL (a catalogue name such as "
        "meta-llama/Llama-3.1-8B-Instruct, or a local model folder). Exit 0 when it fits, 1 when it "
        "does not, 2 on bad input.",
    )
    p.add_argument("model", nargs="?", help="catalogue name / Hugging Face repo id, or a local model folder")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--gpu", type=integer(0, 1023, "a GPU index"), metavar="INDEX", help="size against this host's GPU (live free memory via NVML)")
    where.add_argument("--gpu-memory-gib", type=number(0, 16384, above=True, what="GiB"), metavar="TOTAL", help="total memory vLLM sees per GPU, e.g. 79.19 for an H100 80GB")
    p.add_argument("--tp", type=integer(1, 1024, "a tensor parallel size"), default=1, metavar="N", help="tensor parallel size")
    p.add_argument("--util", type=number(0, 1, above=True, what="a fraction"), default=0.9, metavar="FRACTION", help="gpu_memory_utilization (default 0.9)")
    p.add_argument("--max-model-len", type=integer(1, 2**31 - 1, "a token count"), metavar="L",
                   help="context length to plan (default: vLLM's for the model, its own limit from config.json)")
    from engine.kvfit.arch import QUANT_BY_VLLM_NAME
    from engine.kvfit.kv_cache import KV_DTYPES

    p.add_argument("--kv-cache-dtype", choices=KV_DTYPES, default="auto")
    p.add_argument("--quantization", choices=sorted(QUANT_BY_VLLM_NAME), help="override the checkpoint's quantization")
    p.add_argument("--available-kv-gib", type=number(0, 16384, above=True, what="GiB"), metavar="X", help="skip the overhead estimate: this much memory for KV")
    p.add_argument("--max-num-seqs", type=integer(1, 1 << 20, "a count"), metavar="N", help="vLLM --max-num-seqs (default: vLLM's for the GPU)")
    p.add_argument("--max-num-batched-tokens", type=integer(1, 1 << 24, "a token count"), metavar="N")
    p.add_argument("--block-size", type=integer(1, 1024, "a block size"), default=16)
    p.add_argument("--engine", choices=("v1", "v0"), default="v1", help="vLLM engine whose profile to model")
    from engine.kvfit.overhead import VLLM_VERSION_MODELLED

    p.add_argument("--vllm-version", type=vllm_version, default=VLLM_VERSION_MODELLED, metavar="X.Y",
                   help=f"the vLLM whose memory accounting to follow (default {VLLM_VERSION_MODELLED}; CUDA graphs "
                        "come out of the KV budget since 0.21)")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (vLLM --enforce-eager)")
    p.add_argument("--kv-cache-memory-bytes", type=integer(1, 1 << 50, "bytes"), metavar="N",
                   help="vLLM's explicit KV cache size: no profiling, no estimate")
    from engine.kvfit.lora import MAX_LORAS_LIMIT

    p.add_argument("--enable-lora", action="store_true",
                   help="plan vLLM's LoRA slots (implied by --max-loras / --max-lora-rank; vLLM's defaults 1 x 16)")
    p.add_argument("--max-loras", type=integer(1, MAX_LORAS_LIMIT, "a number of LoRA slots"), metavar="N",
                   help="vLLM --max-loras: adapters in one batch, each a slot of GPU buffers")
    p.add_argument("--max-lora-rank", type=lora_rank, metavar="R", help="vLLM --max-lora-rank (1, 8, 16, 32, 64, 128, "
                   "256, 320 or 512)")
    p.add_argument("--max-cpu-loras", type=integer(1, MAX_LORAS_LIMIT, "a number of adapters"), metavar="N",
                   help="vLLM --max-cpu-loras: adapters cached in host RAM (default max_loras)")
    p.add_argument("--lora-target-modules", nargs="+", metavar="NAME",
                   help="vLLM --lora-target-modules: only these layers get LoRA buffers (e.g. q_proj v_proj)")
    p.add_argument("--fully-sharded-loras", action="store_true", help="vLLM --fully-sharded-loras (splits more of "
                   "the buffers over TP)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--list-models", action="store_true", help="list the built-in catalogue and exit")
    p.set_defaults(handler=run)


def vllm_version(text: str) -> str:
    """X.Y or X.Y.Z, as a launch profile's `vllm_version` is: anything else would be planned, silently, as the
    version modelled, under the name given."""
    import re

    if not re.fullmatch(r"\d+\.\d+(\.\d+)?", text):
        raise argparse.ArgumentTypeError(f"expected a vLLM version such as 0.19 or 0.19.1, got {text!r}")
    return text


def lora_rank(text: str) -> int:
    """One of the ranks vLLM's --max-lora-rank accepts; any other refuses to start."""
    from engine.kvfit.lora import VLLM_LORA_RANKS

    ranks = ", ".join(map(str, VLLM_LORA_RANKS))
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a LoRA rank ({ranks}), got {text!r}") from None
    if value not in VLLM_LORA_RANKS:
        raise argparse.ArgumentTypeError(f"vLLM accepts max_lora_rank {ranks}; got {text!r}")
    return value


def lora_settings(args: argparse.Namespace) -> Any:
    """The LoRA settings the flags ask for (None: LoRA off); vLLM's defaults for what is not given."""
    from engine.kvfit.lora import LoraSettings

    if not (args.enable_lora or args.max_loras or args.max_lora_rank or args.max_cpu_loras
            or args.lora_target_modules or args.fully_sharded_loras):
        return None
    targets = [t for v in args.lora_target_modules or [] for t in v.replace(",", " ").split()]
    return LoraSettings(max_loras=args.max_loras or 1, max_lora_rank=args.max_lora_rank or 16,
                        max_cpu_loras=args.max_cpu_loras, fully_sharded=args.fully_sharded_loras,
                        target_modules=tuple(targets) if args.lora_target_modules is not None else None)


def _fail(msg: str) -> int:
    print(f"fleetdeck fit: {msg}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    from engine.kvfit import ArchError, FitRequest, list_models, load_model, plan
    from engine.kvfit.arch import QUANT_BY_VLLM_NAME

    if args.list_models:
        for name in list_models():
            print(name)
        return 0
    if not args.model:
        return _fail("name a MODEL (or use --list-models)")
    from fleetdeck.cmdutil import fleet_config_of
    from store.config_files import ConfigError

    try:
        roots = list(fleet_config_of(args).models.roots)  # a hub id is looked up there after the HF cache
    except ConfigError as exc:
        return _fail(str(exc))
    try:
        arch, exact = load_model(args.model, roots)
    except ArchError as exc:
        return _fail(str(exc))
    if args.quantization:
        from dataclasses import replace

        quant = QUANT_BY_VLLM_NAME[args.quantization]
        if quant != arch.quantization:
            exact = None  # the files on disk are another quantization than the one asked about
        arch = replace(arch, quantization=quant)

    try:
        lora = lora_settings(args)
    except ValueError as exc:  # max_cpu_loras below max_loras, as vLLM refuses it
        return _fail(str(exc))
    req = FitRequest(
        lora=lora,
        gpu_memory_utilization=args.util,
        tensor_parallel_size=args.tp,
        max_model_len=args.max_model_len,
        kv_cache_dtype=args.kv_cache_dtype,
        block_size=args.block_size,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        engine=args.engine,
        vllm_version=args.vllm_version,
        enforce_eager=args.enforce_eager,
        kv_cache_memory_bytes=args.kv_cache_memory_bytes,
        weight_bytes_total=exact,
    )
    if args.available_kv_gib is not None:
        req.available_kv_bytes = int(args.available_kv_gib * GIB)
    if args.gpu_memory_gib is not None:
        req.gpu_memory_bytes = int(args.gpu_memory_gib * GIB)
    elif args.gpu is not None:
        error = _fill_from_nvml(req, args.gpu)
        if error:
            return _fail(error)
    elif args.available_kv_gib is None and args.kv_cache_memory_bytes is None:
        return _fail("give --gpu INDEX, --gpu-memory-gib TOTAL, --kv-cache-memory-bytes N or --available-kv-gib X")
    try:
        result = plan(arch, req)
    except ValueError as exc:
        return _fail(str(exc))
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        from engine.kvfit.text import render_text

        print(render_text(result))
    return 0 if result.fits else 1


def _fill_from_nvml(req: FitRequest, index: int) -> str | None:
    from fleet.source import snapshot_here

    snap = snapshot_here()
    if snap.nvml != "ok":
        return f"--gpu needs NVML: {snap.reason} Or size by hand with --gpu-memory-gib."
    try:
        (gpu,) = snap.gpus_at([index])
    except ValueError as exc:
        return str(exc)
    if gpu.memory_total_bytes is None:
        return f"GPU {index} on {snap.node} reports no memory size (NVML: not supported); size by hand with --gpu-memory-gib"
    apply_gpu(req, gpu)
    return None


def apply_gpu(req: FitRequest, gpu: GpuSnapshot) -> None:
    """Size against a live GPU as vLLM sees it: its total, its free memory and what other processes hold
    (on a MIG GPU, its roomiest slice)."""
    from engine.kvfit.overhead import vllm_view_of

    total, free, used, note = vllm_view_of(gpu)
    req.gpu_memory_bytes, req.free_memory_bytes, req.other_process_bytes = total, free, used
    req.gpu_name = gpu.name
    if note:
        req.notes = [*req.notes, note]
