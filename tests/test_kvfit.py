"""The KV-cache planner: per-token arithmetic, weights, vLLM's reference start-up logs, failures."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from engine.kvfit import ArchError, FitRequest, load_model, plan
from engine.kvfit.arch import arch_from_config
from engine.kvfit.catalogue import CATALOGUE, catalogue_arch, list_models, resolve
from engine.kvfit.kv_cache import kv_bytes_per_token_per_layer, kv_groups
from engine.kvfit.training import estimate_training, lora_param_count
from engine.kvfit.weights import estimated_weight_bytes, safetensors_bytes

GIB = 1024**3
# Published vLLM start-up logs (a copy of the design's reference sample), kept with the tests so a
# fresh clone needs nothing beside it.
REFERENCE = Path(__file__).resolve().parent / "data" / "vllm_kv_points.jsonl"


def per_token(name: str, tp: int = 1, dtype: str = "auto") -> float:
    arch = catalogue_arch(name)
    return kv_bytes_per_token_per_layer(arch, tp, dtype) * arch.kv_layers


def test_dense_multi_head_attention():
    # Llama 2 7B: 32 layers x 2 (K and V) x 32 heads x 128 x 2 bytes
    assert per_token("meta-llama/Llama-2-7b-hf") == 32 * 2 * 32 * 128 * 2 == 524_288


def test_grouped_query_attention():
    assert per_token("meta-llama/Llama-3.1-8B-Instruct") == 32 * 2 * 8 * 128 * 2 == 131_072
    assert per_token("Qwen/Qwen2.5-7B-Instruct") == 57_344  # 4 KV heads, as vLLM logs it


def test_mla_stores_one_latent_per_layer_and_is_not_split_by_tp():
    assert per_token("deepseek-ai/DeepSeek-V2-Lite-Chat") == 27 * (512 + 64) * 2 == 31_104
    assert per_token("deepseek-ai/DeepSeek-V2-Lite-Chat", tp=2) == 31_104


def test_tensor_parallel_splits_kv_heads_and_replicates_when_fewer_heads_than_ranks():
    full = per_token("meta-llama/Llama-3.1-70B-Instruct")
    assert per_token("meta-llama/Llama-3.1-70B-Instruct", tp=4) == full / 4
    assert per_token("meta-llama/Llama-3.1-70B-Instruct", tp=8) == full / 8
    # 8 KV heads on 16 ranks: each rank still holds one head, so per-GPU bytes stop shrinking.
    assert per_token("meta-llama/Llama-3.1-70B-Instruct", tp=16) == full / 8


@pytest.mark.parametrize("dtype, factor", [("bfloat16", 1), ("float16", 1), ("fp8", 0.5), ("fp8_e4m3", 0.5), ("fp8_e5m2", 0.5), ("nvfp4", 0.5625 / 2)])
def test_each_kv_dtype(dtype, factor):
    base = per_token("Qwen/Qwen3-8B", dtype="auto")
    assert per_token("Qwen/Qwen3-8B", dtype=dtype) == pytest.approx(base * factor)


def test_sliding_window_layers_hold_only_the_window():
    arch = catalogue_arch("google/gemma-3-12b-it")
    assert (arch.full_layers, arch.sliding_layers, arch.sliding_window) == (8, 40, 1024)
    groups = kv_groups(arch)
    assert (groups.group_size, groups.full_groups, groups.sliding_groups) == (8, 1, 5)
    req = FitRequest(available_kv_bytes=20 * GIB, max_model_len=131072, gpu_memory_bytes=80 * GIB)
    r = plan(arch, req)
    # If every layer kept the whole context the pool would hold 6x fewer requests of 128k.
    all_full = 20 * GIB / (kv_bytes_per_token_per_layer(arch, 1, "auto") * arch.kv_layers * 131072)
    assert r.max_concurrency > 4 * all_full
    gemma2 = catalogue_arch("google/gemma-2-9b-it")
    assert (gemma2.full_layers, gemma2.sliding_layers) == (21, 21)
    oss = catalogue_arch("openai/gpt-oss-20b")
    assert (oss.full_layers, oss.sliding_layers, oss.sliding_window) == (12, 12, 128)


def test_moe_experts_are_counted_whole_in_the_weights():
    arch = catalogue_arch("Qwen/Qwen3-30B-A3B")
    assert arch.is_moe and arch.num_experts == 128
    params = estimated_weight_bytes(arch) / 2
    assert 30.0e9 < params < 31.0e9  # 30.5B total, not the 3B active
    assert per_token("Qwen/Qwen3-30B-A3B") == 48 * 2 * 4 * 128 * 2


@pytest.mark.parametrize(
    "name, billions",
    [("meta-llama/Llama-3.1-8B-Instruct", 8.03), ("Qwen/Qwen2.5-7B-Instruct", 7.62), ("Qwen/Qwen3-8B", 8.19),
     ("mistralai/Mistral-7B-Instruct-v0.3", 7.25), ("microsoft/Phi-3.5-mini-instruct", 3.82),
     ("meta-llama/Llama-3.3-70B-Instruct", 70.6), ("google/gemma-2-9b-it", 9.24), ("microsoft/phi-4", 14.66),
     ("deepseek-ai/DeepSeek-V2-Lite-Chat", 15.7)],
)
def test_parameter_counts_match_the_published_sizes(name, billions):
    params = estimated_weight_bytes(catalogue_arch(name)) / 2
    assert params / 1e9 == pytest.approx(billions, rel=0.02)


def test_quantized_weights_keep_embeddings_and_head_in_16_bit():
    awq = catalogue_arch("Qwen/Qwen2.5-7B-Instruct-AWQ")
    assert awq.quantization.method == "awq"
    gib = estimated_weight_bytes(awq) / GIB
    assert 5.0 < gib < 5.5  # vLLM logs 5.29 GiB
    fp8 = catalogue_arch("neuralmagic/Meta-Llama-3.1-8B-Instruct-FP8")
    assert 8.0 < estimated_weight_bytes(fp8) / GIB < 8.6
    oss = catalogue_arch("openai/gpt-oss-20b")
    assert 12.0 < estimated_weight_bytes(oss) / GIB < 14.0  # MXFP4 experts, ~12.8 GiB on disk


@pytest.mark.parametrize(
    "name, repo, method",
    [
        ("META-LLAMA/llama-3.1-8b-instruct", "meta-llama/Llama-3.1-8B-Instruct", None),
        ("Llama-3.1-8B-Instruct", "meta-llama/Llama-3.1-8B-Instruct", None),
        ("hugging-quants/Meta-Llama-3.1-8B-Instruct-AWQ-INT4", "meta-llama/Llama-3.1-8B-Instruct", "awq"),
        ("Qwen/Qwen2.5-7B-Instruct-GPTQ-Int4", "Qwen/Qwen2.5-7B-Instruct", "gptq"),
        ("RedHatAI/Llama-3.1-8B-Instruct-quantized.w4a16", "meta-llama/Llama-3.1-8B-Instruct", "gptq"),
        ("Qwen/Qwen3-8B-FP8", "Qwen/Qwen3-8B", "fp8"),
        ("casperhansen/mistral-7b-instruct-v0.3-awq", "mistralai/Mistral-7B-Instruct-v0.3", "awq"),
        ("Qwen/Qwen3-8B-AWQ", "Qwen/Qwen3-8B", "awq"),
    ],
)
def test_repo_ids_and_quantized_variants_resolve(name, repo, method):
    got_repo, quant = resolve(name)
    assert got_repo == repo
    assert (quant.method if quant else None) == method


def test_catalogue_covers_the_models_operators_ask_for():
    names = {n.lower() for n in list_models()}
    for wanted in ["mistralai/mistral-7b-instruct-v0.3", "meta-llama/llama-3.2-11b-vision-instruct",
                   "qwen/qwen3-235b-a22b", "google/gemma-3-27b-it", "openai/gpt-oss-120b",
                   "deepseek-ai/deepseek-coder-6.7b-instruct", "qwen/qwen1.5-7b-chat", "qwen/qwen2.5-0.5b-instruct",
                   "qwen/qwen2.5-72b-instruct", "qwen/qwen3-0.6b", "qwen/qwen3-32b", "meta-llama/llama-2-70b-hf"]:
        assert wanted in names
    for repo in CATALOGUE:  # every entry parses and sizes
        r = plan(catalogue_arch(repo), FitRequest(gpu_memory_bytes=200 * GIB))
        assert r.kv_bytes_per_token > 0


def _reference_points() -> list[dict]:
    return [json.loads(line) for line in REFERENCE.read_text().splitlines() if line.strip()]


def _ref_name(point: dict) -> str:
    name = point["model"].split(" (")[0]
    return {"Qwen2.5-7B-Instruct-AWQ": "Qwen/Qwen2.5-7B-Instruct-AWQ", "Qwen3-14B": "Qwen/Qwen3-14B"}.get(name, name)


@pytest.mark.parametrize("point", _reference_points(), ids=lambda p: f"{_ref_name(p)}-{p['kv_cache_dtype']}-{p['total_gpu_memory_gib']}")
def test_kv_tokens_from_available_memory_within_half_a_percent(point):
    arch = catalogue_arch(_ref_name(point))
    r = plan(arch, FitRequest(
        available_kv_bytes=int(point["available_kv_gib"] * GIB),
        max_model_len=point["max_model_len"],
        kv_cache_dtype=point["kv_cache_dtype"] or "auto",
        gpu_memory_bytes=int((point["total_gpu_memory_gib"] or 80) * GIB),
    ))
    assert r.kv_tokens == pytest.approx(point["kv_tokens"], rel=0.005)
    assert r.max_concurrency == pytest.approx(point["max_concurrency"], rel=0.005)


@pytest.mark.parametrize(
    "point",
    [p for p in _reference_points() if p["total_gpu_memory_gib"] and p["gpu_memory_utilization"]],
    ids=lambda p: f"{_ref_name(p)}-{p['kv_cache_dtype']}-{p['total_gpu_memory_gib']}",
)
def test_the_lower_bound_never_promises_more_than_vllm_found(point):
    """The verdict is decided on the lower bound: for every published start-up log it is at or below
    the KV memory vLLM itself found (an over-promise is the failure the planner exists to prevent)."""
    r = _plan_reference(point)
    assert r.available_kv_gib_low <= point["available_kv_gib"]
    assert r.available_kv_gib_low < r.available_kv_gib


def _plan_reference(point):
    arch = catalogue_arch(_ref_name(point))
    engine = "v0" if "V0 log" in point["notes"] else "v1"
    return plan(arch, FitRequest(
        gpu_memory_bytes=int(point["total_gpu_memory_gib"] * GIB),
        gpu_memory_utilization=point["gpu_memory_utilization"],
        max_model_len=point["max_model_len"],
        kv_cache_dtype=point["kv_cache_dtype"] or "auto",
        gpu_name=point["gpu"],
        engine=engine,
        **({"vllm_version": point["vllm_version"]} if point["vllm_version"] else {}),
    ))


def test_the_estimate_is_within_5pct_or_075_gib_on_most_published_logs():
    points = [p for p in _reference_points() if p["total_gpu_memory_gib"] and p["gpu_memory_utilization"]]
    close = [p for p in points if abs(_plan_reference(p).available_kv_gib - p["available_kv_gib"])
             <= max(0.05 * p["available_kv_gib"], 0.75)]
    assert len(close) >= 0.8 * len(points), [p["model"] for p in points if p not in close]


def test_weight_bytes_come_exactly_from_safetensors_headers(tmp_path):
    cfg = CATALOGUE["Qwen/Qwen2.5-0.5B-Instruct"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    save_file({"a": np.zeros((128, 64), dtype=np.float16), "b": np.zeros((10,), dtype=np.float32)},
              str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"c": np.zeros((3, 5), dtype=np.int8)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    arch, exact = load_model(str(tmp_path))
    assert exact == 128 * 64 * 2 + 10 * 4 + 15
    assert safetensors_bytes(tmp_path / "model-00002-of-00002.safetensors") == 15
    r = plan(arch, FitRequest(gpu_memory_bytes=24 * GIB, weight_bytes_total=exact))
    assert r.weights_exact and r.weights_gib == pytest.approx(exact / GIB)


def test_quantization_is_read_from_a_local_config(tmp_path):
    cfg = dict(CATALOGUE["Qwen/Qwen2.5-7B-Instruct"], quantization_config={"quant_method": "awq", "bits": 4, "group_size": 128})
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    arch, exact = load_model(str(tmp_path))
    assert arch.quantization.method == "awq" and exact is None


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: None, "no config.json"),
        (lambda p: (p / "config.json").write_text("{not json"), "cannot read it as JSON"),
        (lambda p: (p / "config.json").write_text(json.dumps({"hidden_size": 10})), "num_hidden_layers"),
        (lambda p: (p / "config.json").write_text(json.dumps(dict(CATALOGUE["Qwen/Qwen3-8B"], quantization_config={"quant_method": "hqq"}))), "hqq"),
        (lambda p: ((p / "config.json").write_text(json.dumps(CATALOGUE["Qwen/Qwen3-8B"])), (p / "x.safetensors").write_bytes(b"\xff" * 4)), "too short"),
        (lambda p: ((p / "config.json").write_text(json.dumps(CATALOGUE["Qwen/Qwen3-8B"])), (p / "x.safetensors").write_bytes((20).to_bytes(8, "little") + b"{{{{ not json at all")), "not valid JSON"),
    ],
)
def test_bad_model_folders_name_what_is_missing(tmp_path, setup, message):
    setup(tmp_path)
    with pytest.raises(ArchError, match=message):
        load_model(str(tmp_path))


def test_unknown_model_points_at_the_catalogue():
    with pytest.raises(ArchError, match="--list-models"):
        load_model("acme/secret-model-9b")


def test_max_model_len_larger_than_the_kv_cache_gives_vllms_suggested_length():
    arch = catalogue_arch("Qwen/Qwen2.5-32B-Instruct-AWQ")
    gpu = FitRequest(gpu_memory_bytes=int(23.99 * GIB), vllm_version="0.19")  # graphs from the headroom
    r = plan(arch, replace(gpu, max_model_len=32768))
    assert not r.fits and "larger than the KV cache" in r.reason
    assert 0 < r.max_model_len_that_fits < 32768
    assert str(r.max_model_len_that_fits) in r.reason
    ok = plan(arch, replace(gpu, max_model_len=r.max_model_len_that_fits))
    assert ok.fits
    too_far = plan(arch, replace(gpu, max_model_len=r.max_model_len_that_fits + 16))
    assert not too_far.fits


def test_since_vllm_0_21_cuda_graphs_come_out_of_the_kv_budget():
    arch = catalogue_arch("meta-llama/Llama-3.1-8B-Instruct")
    old = plan(arch, FitRequest(gpu_memory_bytes=80 * GIB, vllm_version="0.19"))
    new = plan(arch, FitRequest(gpu_memory_bytes=80 * GIB))
    eager = plan(arch, FitRequest(gpu_memory_bytes=80 * GIB, enforce_eager=True))
    assert not old.cuda_graph_in_budget and new.cuda_graph_in_budget and new.vllm_version_modelled == "0.32"
    assert old.available_kv_gib - new.available_kv_gib == pytest.approx(new.cuda_graph_gib)
    assert eager.cuda_graph_gib == 0 and eager.available_kv_gib == pytest.approx(old.available_kv_gib)
    tp2 = plan(catalogue_arch("meta-llama/Llama-3.3-70B-Instruct"), FitRequest(gpu_memory_bytes=80 * GIB, tensor_parallel_size=2))
    assert tp2.tp_non_torch_gib and tp2.available_kv_gib_low < tp2.available_kv_gib - 2 * tp2.tp_non_torch_gib
    explicit = plan(arch, FitRequest(kv_cache_memory_bytes=20 * GIB))
    assert explicit.available_kv_gib == explicit.available_kv_gib_low == 20


def test_the_verdict_is_decided_on_the_lower_bound():
    arch = catalogue_arch("meta-llama/Llama-3.1-8B-Instruct")
    r = plan(arch, FitRequest(gpu_memory_bytes=24 * GIB))  # a pool shorter than the model's 131,072 limit
    # A context one request of which fits the estimated pool but not the pool that is surely there.
    length = (r.num_gpu_blocks_low + 1) * 16
    assert length <= r.num_gpu_blocks * 16 and length <= r.model_max_model_len
    between = plan(arch, FitRequest(gpu_memory_bytes=24 * GIB, max_model_len=length))
    assert not between.fits and "surely available" in between.reason
    assert plan(arch, FitRequest(gpu_memory_bytes=24 * GIB, max_model_len=length - 16)).fits


def test_no_memory_for_cache_blocks():
    r = plan(catalogue_arch("Qwen/Qwen2.5-14B-Instruct"), FitRequest(gpu_memory_bytes=int(40 * GIB), gpu_memory_utilization=0.7))
    assert not r.fits and r.reason.startswith("No available memory for the cache blocks")


def test_weights_larger_than_the_gpu_are_a_load_oom():
    r = plan(catalogue_arch("meta-llama/Llama-3.3-70B-Instruct"), FitRequest(gpu_memory_bytes=80 * GIB))
    assert not r.fits and "CUDA out of memory while loading weights" in r.reason
    assert plan(catalogue_arch("meta-llama/Llama-3.3-70B-Instruct"), FitRequest(gpu_memory_bytes=80 * GIB, tensor_parallel_size=4)).fits


def test_free_memory_below_the_utilisation_target_names_the_other_process():
    r = plan(catalogue_arch("Qwen/Qwen3-8B"), FitRequest(
        gpu_memory_bytes=80 * GIB, gpu_memory_utilization=0.9, free_memory_bytes=50 * GIB, other_process_bytes=30 * GIB))
    assert not r.fits and "less than desired GPU memory utilization" in r.reason
    assert "another process holds 30.00 GiB" in r.reason


def test_training_memory_for_qlora_rank_64():
    arch = catalogue_arch("meta-llama/Llama-3.1-8B-Instruct")
    assert lora_param_count(arch, 64) == 167_772_160
    q = estimate_training(arch, rank=64, load_in_4bit=True, batch_size=2, max_seq_length=2048)
    full = estimate_training(arch, rank=64, load_in_4bit=False, batch_size=2, max_seq_length=2048)
    assert 5.0 * GIB < q.weights_bytes < 6.5 * GIB
    assert full.weights_bytes == pytest.approx(estimated_weight_bytes(arch), rel=0.01)
    assert q.optimizer_bytes == 167_772_160 * 16
    assert 9 * GIB < q.total_bytes < 16 * GIB
    with pytest.raises(ValueError, match="unknown LoRA target"):
        lora_param_count(arch, 8, ("q_proj", "qkv"))


def test_a_multimodal_config_is_sized_from_its_text_config():
    arch = arch_from_config(CATALOGUE["meta-llama/Llama-3.2-11B-Vision-Instruct"])
    assert arch.num_layers == 40 and arch.kv_layers == 32


def test_a_mig_gpu_is_planned_as_the_slice_vllm_sees():
    from engine.kvfit.overhead import vllm_view_of
    from fleet.model import GpuSnapshot, MigDevice

    gpu = GpuSnapshot(node="n", index=0, name="NVIDIA H100 80GB HBM3", uuid="GPU-0", memory_total_bytes=80 * GIB,
                      memory_used_bytes=30 * GIB, mig_enabled=True,
                      mig_devices=[MigDevice(0, "MIG-a", 20 * GIB, 19 * GIB), MigDevice(1, "MIG-b", 40 * GIB, 10 * GIB)])
    total, free, used, note = vllm_view_of(gpu)
    assert (total, free, used) == (40 * GIB, 30 * GIB, 10 * GIB) and "MIG-b" in note
    r = plan(catalogue_arch("Qwen/Qwen3-8B"), FitRequest(gpu_memory_bytes=total, free_memory_bytes=free,
                                                         other_process_bytes=used, notes=[note]))
    assert r.total_gpu_memory_gib == 40 and note in r.warnings
    plain = GpuSnapshot(node="n", index=1, name="x", uuid="GPU-1", memory_total_bytes=80 * GIB, memory_used_bytes=GIB)
    assert vllm_view_of(plain) == (80 * GIB, 79 * GIB, GIB, None)


# -- one verdict: FITS means it starts and holds a request; DOES NOT FIT shows no success figure -------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from engine.kvfit.kv_cache import KV_DTYPES  # noqa: E402
from engine.kvfit.text import render_text  # noqa: E402

_MODELS = ["meta-llama/Llama-3.1-8B-Instruct", "Qwen/Qwen3-8B", "Qwen/Qwen2.5-32B-Instruct-AWQ", "google/gemma-3-12b-it",
           "openai/gpt-oss-20b", "deepseek-ai/DeepSeek-V2-Lite-Chat", "microsoft/Phi-3.5-mini-instruct",
           "meta-llama/Llama-3.3-70B-Instruct"]


@st.composite
def fit_requests(draw):
    total = draw(st.integers(4, 200)) * GIB
    free = draw(st.one_of(st.none(), st.integers(0, 100).map(lambda pct: total * pct // 100)))
    return draw(st.sampled_from(_MODELS)), FitRequest(
        gpu_memory_bytes=total,
        gpu_memory_utilization=draw(st.integers(5, 100)) / 100,
        tensor_parallel_size=draw(st.sampled_from([1, 2, 4])),
        max_model_len=draw(st.one_of(st.none(), st.integers(1, 300_000))),
        kv_cache_dtype=draw(st.sampled_from(KV_DTYPES)),
        free_memory_bytes=free,
        other_process_bytes=None if free is None else total - free,
        engine=draw(st.sampled_from(["v1", "v0"])),
        enforce_eager=draw(st.booleans()),
        max_num_seqs=draw(st.one_of(st.none(), st.integers(1, 1024))),
    )


@settings(max_examples=120, deadline=None)
@given(fit_requests())
def test_a_verdict_means_one_thing(case):
    name, req = case
    arch = catalogue_arch(name)
    r = plan(arch, req)
    text = render_text(r)
    if r.fits:
        assert r.reason is None and r.max_concurrency_low >= 1 and r.max_concurrency >= r.max_concurrency_low
        assert r.max_model_len <= arch.derived_max_model_len
        assert r.max_model_len == (req.max_model_len or arch.default_max_model_len)
        assert "verdict             FITS" in text and "DOES NOT FIT" not in text
    else:
        assert r.reason and r.max_concurrency == r.max_concurrency_low == 0
        assert "DOES NOT FIT" in text and "FITS\n" not in text and not text.endswith("FITS")
        assert "max concurrency" not in text and "largest context" not in text
        if r.fitting_max_model_len:  # what it suggests instead is itself a setting that fits
            assert r.fitting_max_model_len <= arch.derived_max_model_len
            again = plan(arch, replace(req, gpu_memory_utilization=r.fitting_gpu_memory_utilization,
                                       max_model_len=r.fitting_max_model_len))
            assert again.fits, (r.reason, again.reason)


def test_a_busy_gpu_gets_a_utilisation_that_holds_the_weights_or_none():
    arch = catalogue_arch("meta-llama/Llama-3.1-8B-Instruct")
    a10 = FitRequest(gpu_memory_bytes=int(22.06 * GIB), max_model_len=8192)
    crowded = plan(arch, replace(a10, free_memory_bytes=5 * GIB, other_process_bytes=int(17.06 * GIB)))
    assert not crowded.fits and crowded.fitting_gpu_memory_utilization is None
    assert "No gpu_memory_utilization fits on this GPU" in crowded.reason and "lower gpu_memory_utilization to" not in crowded.reason
    room = plan(arch, replace(a10, gpu_memory_utilization=0.95, free_memory_bytes=20 * GIB, other_process_bytes=int(2.06 * GIB)))
    assert not room.fits and room.fitting_gpu_memory_utilization is not None
    assert f"gpu_memory_utilization {room.fitting_gpu_memory_utilization:.2f}" in room.reason
    assert plan(arch, replace(a10, gpu_memory_utilization=room.fitting_gpu_memory_utilization,
                              max_model_len=room.fitting_max_model_len, free_memory_bytes=20 * GIB)).fits


def test_the_cpu_block_size_is_vllms_for_mla_with_and_without_amx():
    """vLLM's CPU platform pages KV in 128-token blocks, but serves MLA on a CPU without AMX tiles with its
    reference kernel's 16-token blocks: the planner pages the same way, or its block count is off."""
    from types import SimpleNamespace

    from engine.vllm.command import cpu_block_size, cpu_has_amx

    mla, gqa = SimpleNamespace(is_mla=True), SimpleNamespace(is_mla=False)
    assert cpu_block_size(mla, amx=False) == 16 and cpu_block_size(mla, amx=True) == 128
    assert cpu_block_size(gqa, amx=False) == 128 and cpu_block_size(gqa, amx=True) == 128
    assert cpu_has_amx("flags : fpu avx512f amx_bf16 amx_tile amx_int8") and not cpu_has_amx("flags : fpu avx2 avx512f")


# -- the planner at its edges: configs no model has, files that are not what they claim, monotone answers ----

import math  # noqa: E402
import os  # noqa: E402
import struct  # noqa: E402
import tempfile  # noqa: E402

from hypothesis import HealthCheck  # noqa: E402

from engine.kvfit.arch import MAX_DIM  # noqa: E402
from engine.kvfit.plan import tp_splits  # noqa: E402
from engine.kvfit.weights import folder_weight_bytes  # noqa: E402

# One config of each family the README names, nested text_config (multimodal) and MLA included.
_FAMILIES = ["mistralai/Mistral-7B-Instruct-v0.3", "Qwen/Qwen3-8B", "Qwen/Qwen3-30B-A3B", "microsoft/Phi-3.5-mini-instruct",
             "meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Llama-3.2-11B-Vision-Instruct", "google/gemma-2-9b-it",
             "google/gemma-3-12b-it", "deepseek-ai/DeepSeek-V2-Lite-Chat", "openai/gpt-oss-20b", "Qwen/Qwen2.5-7B-Instruct"]
# Keys worth breaking beside the ones each config has.
_KEYS = ["head_dim", "num_key_value_heads", "sliding_window", "use_sliding_window", "layer_types", "rope_scaling",
         "rope_parameters", "quantization_config", "max_position_embeddings", "model_max_length", "n_positions",
         "cross_attention_layers", "text_config", "sliding_window_pattern", "original_max_position_embeddings",
         "num_experts", "first_k_dense_replace", "kv_lora_rank", "tie_word_embeddings"]
_NASTY_SCALARS = st.one_of(
    st.none(), st.booleans(), st.sampled_from([0, -1, 1, 2, 7, 2**31, 2**63, 10**30]),
    st.integers(-(2**70), 2**70), st.sampled_from([0.5, 1.5, -0.0, 1e300, -1e300, math.inf, -math.inf, math.nan]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(["", "12", "abc", "awq", "sliding_attention", "yarn"]),
)
_JSON = st.recursive(_NASTY_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(
        ["quant_method", "bits", "group_size", "factor", "rope_type", "type", "original_max_position_embeddings",
         "config_groups", "weights", "num_bits", "load_in_4bit", "full_attention", "num_hidden_layers"]), inner, max_size=4)),
    max_leaves=8)
_QUANT = st.fixed_dictionaries({"quant_method": st.sampled_from(["awq", "gptq", "fp8", "bitsandbytes", "compressed-tensors", "mxfp4", "AWQ", 7]),
                                "bits": _NASTY_SCALARS, "group_size": _NASTY_SCALARS, "load_in_4bit": _NASTY_SCALARS,
                                "config_groups": _JSON})


@st.composite
def broken_configs(draw):
    cfg = json.loads(json.dumps(CATALOGUE[draw(st.sampled_from(_FAMILIES))]))
    target = cfg["text_config"] if isinstance(cfg.get("text_config"), dict) and draw(st.booleans()) else cfg
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(sorted(set(target) | set(_KEYS))))
        target[key] = draw(_QUANT if key == "quantization_config" and draw(st.booleans()) else _JSON)
    return cfg


def _sane(arch) -> None:
    """What every ModelArch the parser lets through must be: something vLLM could build."""
    assert 1 <= arch.num_layers <= MAX_DIM and arch.kv_layers >= 1
    assert 0 <= arch.sliding_layers <= arch.kv_layers and arch.head_dim >= 1 and arch.vocab_size >= 1
    assert arch.is_mla or arch.num_heads % arch.num_kv_heads == 0
    assert arch.sliding_window is None or arch.sliding_window >= 1
    assert arch.derived_max_model_len is None or arch.derived_max_model_len >= 1
    assert arch.default_max_model_len >= 1
    weights = estimated_weight_bytes(arch)
    assert 0 < weights and math.isfinite(weights)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(broken_configs())
def test_a_broken_config_is_one_archerror_or_a_model_vllm_could_build(cfg):
    """Fields missing, null, zero, negative, huge, NaN, strings, floats, lists where numbers go, in the real
    families' configs (text_config of a multimodal one included): the parser names the key, or what it lets
    through is sane and plans to a verdict (never an exception, never a hang on a layer count)."""
    try:
        arch = arch_from_config(cfg)
    except ArchError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    _sane(arch)
    for req in (FitRequest(gpu_memory_bytes=80 * GIB), FitRequest(kv_cache_memory_bytes=GIB, max_model_len=4096),
                FitRequest(gpu_memory_bytes=24 * GIB, tensor_parallel_size=2, kv_cache_dtype="fp8")):
        r = plan(arch, req)
        assert r.fits == (r.reason is None) and r.weights_gib > 0
        render_text(r)


@pytest.mark.parametrize("cfg_patch, message", [
    ({"num_hidden_layers": 2**63}, "num_hidden_layers` must be a whole number from 1"),  # was: a hang (a loop per layer)
    ({"vocab_size": 1e300}, "vocab_size"),
    ({"max_position_embeddings": 0}, "max_position_embeddings` must be a number above 0"),  # was: FITS at 0 tokens
    ({"max_position_embeddings": -5}, "max_position_embeddings"),
    ({"max_position_embeddings": math.nan}, "max_position_embeddings"),  # json.loads reads NaN
    ({"rope_scaling": {"rope_type": "linear", "factor": -8}}, "rope_scaling.factor"),  # was: FITS, concurrency -3.76
    ({"rope_scaling": {"rope_type": "linear", "factor": 1e308}}, "RoPE scaling factor gives inf"),
    ({"num_key_value_heads": 5}, r"num_heads \(28\) is not divisible by num_kv_heads \(5\)"),  # was: FITS
    ({"num_key_value_heads": 56}, "num_kv_heads"),
    ({"hidden_size": 16, "head_dim": None}, "leaves no head size"),
    ({"use_sliding_window": True, "sliding_window": -5}, "sliding_window"),  # was: FITS with a negative window
    ({"sliding_window": 128, "layer_types": ["sliding_attention"] * 100}, "layer_types` names 100 layers"),
    ({"cross_attention_layers": list(range(100))}, "cross_attention_layers"),
    ({"quantization_config": "awq"}, "quantization_config` must be an object"),
    ({"quantization_config": {"quant_method": "gptq", "bits": -4}}, "quantization_config.bits"),  # was: negative weights
    ({"quantization_config": {"quant_method": "gptq", "bits": 5}}, "take 4, 8"),
    ({"quantization_config": {"quant_method": "gptq", "bits": 3, "sym": True}}, "take 4, 8"),
    ({"quantization_config": {"quant_method": "awq", "bits": 8}}, "awq kernels take 4"),
    ({"quantization_config": {"quant_method": "gptq", "bits": 4, "sym": False}}, "symmetric GPTQ only"),
    ({"quantization_config": {"quant_method": "compressed-tensors", "config_groups": {"g": "x"}}}, "config_groups.g"),
])
def test_a_config_no_model_has_is_refused_naming_the_key(cfg_patch, message):
    cfg = {**CATALOGUE["Qwen/Qwen2.5-7B-Instruct"], **cfg_patch}
    with pytest.raises(ArchError, match=message):
        arch_from_config(cfg)


def test_gptq_per_channel_group_size_minus_one_is_four_bits_not_negative_weights():
    """GPTQ's group_size -1 (one scale per output column) is a real, common setting: it was planned as a
    negative group, giving -10 GiB of weights and a promise of 1.5M tokens."""
    base = CATALOGUE["Qwen/Qwen2.5-7B-Instruct"]
    per_channel = arch_from_config({**base, "quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": -1, "sym": True}})
    grouped = arch_from_config({**base, "quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True}})
    assert per_channel.quantization.group_size == 0
    assert 0 < estimated_weight_bytes(per_channel) < estimated_weight_bytes(grouped) < estimated_weight_bytes(catalogue_arch("Qwen/Qwen2.5-7B-Instruct"))


@pytest.mark.parametrize("name, tp, ok", [
    ("Qwen/Qwen2.5-7B-Instruct", 7, False),  # 28 heads split, 4 KV heads cannot be spread over 7 ranks
    ("Qwen/Qwen2.5-7B-Instruct", 14, False),
    ("Qwen/Qwen2.5-7B-Instruct", 4, True),
    ("Qwen/Qwen2.5-14B-Instruct", 5, False),  # 40 heads / 5, but 8 KV heads over 5 ranks
    ("Qwen/Qwen2.5-14B-Instruct", 8, True),
    ("meta-llama/Llama-3.1-70B-Instruct", 16, True),  # 8 KV heads, each on two ranks
    ("deepseek-ai/DeepSeek-V2-Lite-Chat", 4, True),  # MLA: one latent, not split by KV head
])
def test_a_tp_that_splits_the_query_heads_but_not_the_kv_heads_does_not_fit(name, tp, ok):
    arch = catalogue_arch(name)
    assert tp_splits(arch, tp) is ok
    r = plan(arch, FitRequest(gpu_memory_bytes=80 * GIB, tensor_parallel_size=tp, max_model_len=4096))
    if not ok:
        assert not r.fits and f"cannot be split over tensor parallel size {tp}" in r.reason
        assert r.fitting_max_model_len is None and r.max_concurrency == 0
        suggested = [int(n) for n in r.reason.split("Use --tp ")[1].rstrip(".").split(", ")]
        assert suggested and all(tp_splits(arch, n) for n in suggested)


def test_a_batch_smaller_than_max_num_seqs_is_refused_as_vllm_refuses_it():
    arch = catalogue_arch("Qwen/Qwen3-8B")
    r = plan(arch, FitRequest(gpu_memory_bytes=80 * GIB, max_num_seqs=1024, max_num_batched_tokens=16))
    assert not r.fits and "max_num_batched_tokens (16) must be greater than or equal to max_num_seqs (1024)" in r.reason
    assert r.fitting_max_model_len is None
    # vLLM's default batch never trips it: it is capped at max_num_seqs x max_model_len, not raised above it.
    short = plan(arch, FitRequest(gpu_memory_bytes=80 * GIB, max_model_len=1, max_num_seqs=8))
    assert short.fits and short.max_num_batched_tokens == 8


def test_an_explicit_kv_size_too_small_for_one_block_says_so():
    r = plan(catalogue_arch("Qwen/Qwen3-8B"), FitRequest(kv_cache_memory_bytes=1))
    assert not r.fits and "KV cache given holds no block" in r.reason and "weights" not in r.reason


def _cfg_folder(folder: Path, cfg=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg or CATALOGUE["Qwen/Qwen3-8B"]))
    return folder


def _st_header(path: Path, header) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)


@pytest.mark.parametrize("setup, message", [
    (lambda p: (p / "config.json").mkdir(), "is a folder, not a file"),
    (lambda p: os.symlink("config.json", p / "config.json"), "Too many levels of symbolic links"),
    (lambda p: (p / "config.json").write_bytes(b"\xff\xfe{}"), "cannot read it as JSON"),
    (lambda p: (p / "config.json").write_text("[" * 100_000 + "]" * 100_000), "cannot read it as JSON"),  # RecursionError
    (lambda p: (p / "config.json").write_text('{"pad": "' + "x" * (17 * 1024 * 1024) + '"}'), "not a model config"),
    (lambda p: (_cfg_folder(p), (p / "model.safetensors").mkdir()), r"cannot read it \(Is a directory\)"),
    (lambda p: (_cfg_folder(p), os.symlink("a.safetensors", p / "b.safetensors"), os.symlink("b.safetensors", p / "a.safetensors")),
     "Too many levels of symbolic links"),
    (lambda p: (_cfg_folder(p), _st_header(p / "x.safetensors", [1, 2])), "not a JSON object"),
    (lambda p: (_cfg_folder(p), _st_header(p / "x.safetensors", {"w": {"data_offsets": ["a", "b"]}})), "no valid data_offsets"),
    (lambda p: (_cfg_folder(p), _st_header(p / "x.safetensors", {"w": {"data_offsets": [100, 0]}})), "no valid data_offsets"),  # was: -100 B of weights, FITS
])
def test_a_model_folder_that_is_not_what_it_claims_is_one_line(tmp_path, setup, message):
    folder = tmp_path / "model"
    folder.mkdir()
    setup(folder)
    with pytest.raises(ArchError, match=message) as info:
        load_model(str(folder))
    assert "\n" not in str(info.value) and len(str(info.value)) < 400


@pytest.mark.parametrize("spec, message", [
    ("~no-such-user-here/model", "cannot read it as a model"),  # expanduser raised RuntimeError
    ("/" + "a" * 5000, "File name too long"),  # Path.exists raised OSError
    ("a" * 5000, "File name too long"),
    ("model\x00name", "NUL"),
])
def test_a_model_name_the_os_refuses_is_one_short_line(spec, message):
    with pytest.raises(ArchError, match=message) as info:
        load_model(spec, model_roots=[])
    assert len(str(info.value)) < 300


def test_exact_weights_count_only_the_files_vllm_loads(tmp_path):
    """A Mistral repo ships consolidated.safetensors beside the model-*.safetensors shards: every weight twice
    on disk. vLLM loads the shards the index names; counting both doubled the weights."""
    folder = _cfg_folder(tmp_path / "mistral", CATALOGUE["mistralai/Mistral-7B-Instruct-v0.3"])
    _st_header(folder / "model-00001-of-00002.safetensors", {"a": {"data_offsets": [0, 1000]}})
    _st_header(folder / "model-00002-of-00002.safetensors", {"b": {"data_offsets": [0, 500]}})
    _st_header(folder / "consolidated.safetensors", {"a": {"data_offsets": [0, 1500]}})
    assert folder_weight_bytes(folder) == 3000  # no index: every file
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    assert folder_weight_bytes(folder) == 1500
    assert load_model(str(folder))[1] == 1500


@settings(max_examples=150, deadline=None)
@given(st.one_of(st.binary(max_size=300), st.text(max_size=300).map(str.encode),
                 _JSON.map(lambda v: json.dumps(v).encode()),
                 broken_configs().map(lambda c: json.dumps(c).encode())))
def test_any_config_json_bytes_are_a_model_or_one_archerror(raw):
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_bytes(raw)
        try:
            arch, exact = load_model(tmp)
        except ArchError as exc:
            assert "\n" not in str(exc)
            return
        _sane(arch)
        assert exact is None


@settings(max_examples=150, deadline=None)
@given(st.one_of(st.binary(max_size=200), _JSON.map(lambda v: (lambda raw: struct.pack("<Q", len(raw)) + raw)(json.dumps(v).encode())),
                 st.dictionaries(st.text(max_size=5), st.fixed_dictionaries({"data_offsets": st.lists(_NASTY_SCALARS, max_size=3)}),
                                 max_size=3).map(lambda h: (lambda raw: struct.pack("<Q", len(raw)) + raw)(json.dumps(h).encode()))))
def test_any_safetensors_header_is_a_byte_count_or_one_archerror(raw):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.safetensors"
        path.write_bytes(raw)
        try:
            assert safetensors_bytes(path) >= 0
        except ArchError as exc:
            assert "\n" not in str(exc)


# The model space for the monotonicity properties: any GQA/MHA shape, with or without a sliding window or experts.
@st.composite
def model_shapes(draw):
    heads = draw(st.sampled_from([1, 2, 4, 8, 16, 28, 32, 40, 64]))
    head_dim = draw(st.sampled_from([32, 64, 80, 128, 256]))
    cfg = {"model_type": draw(st.sampled_from(["llama", "qwen2", "mistral", "gemma2", "qwen3"])),
           "num_hidden_layers": draw(st.integers(1, 96)), "hidden_size": heads * head_dim, "num_attention_heads": heads,
           "num_key_value_heads": draw(st.sampled_from([d for d in range(1, heads + 1) if heads % d == 0])),
           "head_dim": head_dim, "intermediate_size": draw(st.integers(64, 30000)), "vocab_size": draw(st.integers(256, 260000)),
           "max_position_embeddings": draw(st.sampled_from([2048, 8192, 32768, 131072]))}
    if draw(st.booleans()):
        cfg.update(sliding_window=draw(st.sampled_from([128, 1024, 4096])), use_sliding_window=True, max_window_layers=0)
    if draw(st.booleans()):
        cfg.update(num_experts=draw(st.integers(2, 64)), moe_intermediate_size=draw(st.integers(64, 4096)), num_experts_per_tok=2)
    return arch_from_config(cfg)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(model_shapes(), st.sampled_from(sorted(CATALOGUE)).map(catalogue_arch)), st.integers(2, 200), st.integers(1, 100), st.integers(1, 200_000), st.integers(1, 200_000),
       st.integers(5, 99), st.integers(1, 5), st.sampled_from([1, 2, 4]), st.sampled_from(["v1", "v0"]), st.integers(1, 512))
def test_more_memory_never_fits_less_and_a_longer_context_never_needs_less(arch, gib, extra, len_a, len_b, util, more_util,
                                                                              tp, engine, seqs):
    """The answers are monotone where vLLM's are (over any shape, and every catalogue model: MLA, Gemma 3's layer
    types, gpt-oss, MoE, vision): a longer context never fits where a shorter one does not; more
    GPU memory, a higher utilisation or a smaller KV dtype never holds fewer tokens. (max_num_seqs is held fixed:
    vLLM's own default grows at 70 GiB, and with it the activation peak, so across that line vLLM is not monotone
    either.)"""
    short, long = sorted((len_a, len_b))
    base = FitRequest(gpu_memory_bytes=gib * GIB, gpu_memory_utilization=util / 100, tensor_parallel_size=tp, engine=engine,
                      max_num_seqs=seqs, max_num_batched_tokens=max(seqs, 2048), max_model_len=short)
    r = plan(arch, base)
    assert not plan(arch, replace(base, max_model_len=long)).fits or r.fits
    for bigger in (replace(base, gpu_memory_bytes=(gib + extra) * GIB),
                   replace(base, gpu_memory_utilization=min(100, util + more_util) / 100),
                   replace(base, kv_cache_dtype="fp8")):
        b = plan(arch, bigger)
        assert b.kv_tokens_low >= r.kv_tokens_low and b.max_model_len_that_fits >= r.max_model_len_that_fits
        assert b.fits or not r.fits, (b.reason, r.reason)


def test_a_qwen_window_is_on_the_layers_past_max_window_layers_as_transformers_puts_it():
    """Qwen2/Qwen3 configs window only the layers from max_window_layers on (28 by default, every layer of a
    28-layer model): the planner put the window on every layer, promising a 4k-window pool for a model vLLM
    serves with full attention."""
    base = {**CATALOGUE["Qwen/Qwen2.5-7B-Instruct"], "use_sliding_window": True, "sliding_window": 4096}
    assert arch_from_config(base).sliding_layers == 0  # max_window_layers defaults to 28 = num_hidden_layers
    everywhere = arch_from_config({**base, "max_window_layers": 0})
    assert (everywhere.sliding_window, everywhere.sliding_layers) == (4096, 28)
    full = plan(arch_from_config(base), FitRequest(gpu_memory_bytes=80 * GIB, max_model_len=32768))
    windowed = plan(everywhere, FitRequest(gpu_memory_bytes=80 * GIB, max_model_len=32768))
    assert windowed.max_concurrency > 2 * full.max_concurrency
    with pytest.raises(ArchError, match="all of a Qwen model's layers or none"):
        arch_from_config({**base, "max_window_layers": 10})  # vLLM's Qwen2Model asserts against mixed layers


def test_without_a_gpu_the_default_max_num_seqs_is_a_guess_that_refuses_nothing():
    arch = catalogue_arch("Qwen/Qwen3-8B")
    assert plan(arch, FitRequest(available_kv_bytes=GIB, max_model_len=512, max_num_batched_tokens=256)).fits
    given = plan(arch, FitRequest(available_kv_bytes=GIB, max_model_len=512, max_num_batched_tokens=256, max_num_seqs=512))
    assert not given.fits and "max_num_seqs (512)" in given.reason
    # on an 80 GiB GPU vLLM's default is 1024 sequences: a batch of 256 is refused there
    assert "max_num_seqs (1024)" in plan(arch, FitRequest(gpu_memory_bytes=80 * GIB, max_num_batched_tokens=256)).reason


def test_a_hub_cache_ref_that_is_not_utf8_is_not_a_traceback(tmp_path, monkeypatch):
    """refs/main holding bytes the hub client never writes ended `fit` and `models ls` (and a node agent's
    listing) with UnicodeDecodeError: the snapshot is not loadable, so the id is not there."""
    from engine.kvfit.local_models import list_local

    repo = tmp_path / "hub" / "models--acme--m"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_bytes(b"\xff\xfe")
    _cfg_folder(repo / "snapshots" / "abc")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ArchError, match="not in the Hugging Face cache"):
        load_model("acme/m", model_roots=[])
    assert list_local([]) == []


def test_a_window_in_any_config_is_every_layers_and_gemma2_windows_from_the_first_layer():
    phi3 = arch_from_config({**CATALOGUE["microsoft/Phi-3.5-mini-instruct"], "sliding_window": 2047,
                             "max_position_embeddings": 4096, "rope_scaling": None})  # Phi-3-mini-4k's shape
    assert (phi3.sliding_window, phi3.sliding_layers) == (2047, phi3.num_layers)
    assert arch_from_config({**CATALOGUE["google/gemma-2-9b-it"], "num_hidden_layers": 3}).sliding_layers == 2
    assert arch_from_config({**CATALOGUE["mistralai/Mistral-7B-Instruct-v0.3"], "sliding_window": 32768}).sliding_layers == 0


def test_a_gpus_share_of_exact_weights_is_never_above_the_whole():
    from engine.kvfit.weights import weight_bytes_per_gpu

    arch = catalogue_arch("Qwen/Qwen3-8B")
    assert weight_bytes_per_gpu(15, arch, 2) <= 15  # was over 1 MB (the shape's replicated norms) for a 15-byte file
    big = estimated_weight_bytes(arch)
    assert big / 2 < weight_bytes_per_gpu(big, arch, 2) < big
