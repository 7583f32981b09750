"""The planner with LoRA enabled: vLLM 0.32's stacked A/B buffers for max_loras slots at max_lora_rank come out
of the KV budget (engine/kvfit/lora.py). The shapes are vLLM's own create_lora_weights; the real engine checks
them byte for byte in tests/engines/test_real_planner_lora.py."""

from __future__ import annotations

import json
from dataclasses import replace
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.kvfit import FitRequest, plan
from engine.kvfit.arch import arch_from_config
from engine.kvfit.catalogue import CATALOGUE, catalogue_arch
from engine.kvfit.lora import VLLM_LORA_RANKS, LoraError, LoraSettings, lora_memory
from engine.kvfit.text import render_text
from fleetdeck.cli import main

GIB = 1024**3
H100 = int(79.19 * GIB)


def _mib(n: float) -> int:
    return int(n * 1024**2)


def test_mistral_7b_four_slots_at_rank_64_is_vllms_buffers_to_the_byte():
    """Per layer and slot at rank r (vLLM's MergedQKV/Row/MergedColumn wrappers): q/k/v A 3 x r x 4096, B
    r x (4096 + 1024 + 1024); o A r x 4096, B r x 4096; gate/up A 2 x r x 4096, B r x 2 x 14336; down A r x 14336,
    B r x 4096. Mistral's vLLM class lists no embedding modules: no embedding or LM-head buffers."""
    arch = catalogue_arch("mistralai/Mistral-7B-Instruct-v0.3")
    r = 64
    per_layer = (3 * r * 4096 + r * 6144) + (r * 4096 + r * 4096) + (2 * r * 4096 + r * 2 * 14336) + (r * 14336 + r * 4096)
    mem = lora_memory(arch, LoraSettings(max_loras=4, max_lora_rank=r), tp=1, batched_tokens=8192)
    assert mem.per_slot == 32 * per_layer * 2 == 335_544_320
    assert mem.buffers == 4 * 335_544_320 and not mem.embeddings  # 1.25 GiB: "on the order of a GiB"
    assert mem.host == mem.buffers  # max_cpu_loras defaults to max_loras, whole adapters in RAM


def test_a_llama_has_embedding_and_lm_head_buffers_not_split_by_tp():
    arch = catalogue_arch("meta-llama/Llama-3.1-8B-Instruct")
    lora = LoraSettings(max_loras=2, max_lora_rank=16)
    one, two = (lora_memory(arch, lora, tp=t, batched_tokens=2048) for t in (1, 2))
    assert one.embeddings and "embed_tokens, lm_head" in one.modules
    embed = 16 * (arch.vocab_size + arch.hidden_size) * 2 * 2  # embed A+B and lm_head A+B, 2 bytes
    h, q, kv, i = 4096, 4096, 1024, 14336
    layer_tp1 = (3 * h + q + 2 * kv) + (q + h) + (2 * h + 2 * i) + (i + h)
    # TP 2: column layers keep A whole and split B; row layers split A and keep B; embeddings stay whole
    layer_tp2 = (3 * h + q // 2 + 2 * (kv // 2)) + (q // 2 + h) + (2 * h + 2 * (i // 2)) + (i // 2 + h)
    assert one.per_slot == (32 * layer_tp1 * 16) * 2 + embed
    assert two.per_slot == (32 * layer_tp2 * 16) * 2 + embed
    assert one.host == two.host == 2 * one.per_slot  # the CPU cache holds whole adapters


def test_a_replicated_kv_head_is_allocated_on_every_rank():
    """Llama 3.3 70B has 8 KV heads: at TP 16 each rank holds one (replicated), so k and v B buffers stop
    shrinking past TP 8, as the KV cache does."""
    arch = catalogue_arch("meta-llama/Llama-3.3-70B-Instruct")
    lora = LoraSettings(max_loras=1, max_lora_rank=8)
    at8, at16 = (lora_memory(arch, lora, tp=t, batched_tokens=2048).per_slot for t in (8, 16))
    # what TP 16 saves over 8: half of q's and o's, gate/up's and down's split parts; nothing of k and v
    h, q, i, r, n = 8192, 8192, 28672, 8, 80
    saved = n * r * ((q // 8 - q // 16) + (q // 8 - q // 16) + 2 * (i // 8 - i // 16) + (i // 8 - i // 16)) * 2
    assert at8 - at16 == saved


def test_phi3s_fused_projections_are_one_slice_each():
    arch = catalogue_arch("microsoft/Phi-3.5-mini-instruct")
    mem = lora_memory(arch, LoraSettings(max_loras=1, max_lora_rank=8), tp=1, batched_tokens=2048)
    h, i, r = arch.hidden_size, arch.intermediate_size, 8
    layer = (r * h + r * (h + 2 * arch.num_kv_heads * arch.head_dim)) + (r * h + r * h) + (r * h + r * 2 * i) + (r * i + r * h)
    assert mem.per_slot == (arch.num_layers * layer + 2 * r * (arch.vocab_size + h)) * 2
    assert "qkv (fused)" in mem.modules


def test_an_awq_base_gets_the_same_16_bit_lora_buffers():
    """LoRA on a quantized base: the adapters' buffers are in the model's 16-bit dtype, whatever the weights."""
    lora = LoraSettings(max_loras=4, max_lora_rank=64)
    awq = catalogue_arch("Qwen/Qwen2.5-7B-Instruct-AWQ")
    bf16 = catalogue_arch("Qwen/Qwen2.5-7B-Instruct")
    assert awq.quantization.method == "awq"
    assert lora_memory(awq, lora, 1, 8192) == lora_memory(bf16, lora, 1, 8192)


def test_moe_experts_get_a_buffer_per_expert():
    arch = catalogue_arch("Qwen/Qwen3-30B-A3B") if "Qwen/Qwen3-30B-A3B" in CATALOGUE else catalogue_arch("openai/gpt-oss-20b")
    mem = lora_memory(arch, LoraSettings(max_loras=1, max_lora_rank=8), tp=1, batched_tokens=2048)
    experts = arch.num_layers * arch.num_experts * 8 * (3 * arch.hidden_size + 3 * arch.moe_intermediate_size) * 2
    assert mem.per_slot > experts and "experts" in mem.modules


def test_lora_comes_out_of_the_kv_budget_and_is_named_in_the_breakdown():
    arch = catalogue_arch("mistralai/Mistral-7B-Instruct-v0.3")
    req = FitRequest(gpu_memory_bytes=H100, max_model_len=32768)
    off = plan(arch, req)
    on = plan(arch, replace(req, lora=LoraSettings(max_loras=4, max_lora_rank=64)))
    mem = lora_memory(arch, LoraSettings(max_loras=4, max_lora_rank=64), 1, on.max_num_batched_tokens)
    # buffers + the profile's shrink buffer and metadata + the graphs captured a second time with LoRA
    expected = mem.buffers + mem.activation + off.cuda_graph_gib * GIB
    assert (off.available_kv_gib - on.available_kv_gib) * GIB == pytest.approx(expected, rel=1e-9)
    assert on.kv_tokens < off.kv_tokens and on.lora_gib == pytest.approx(1.25)
    text = render_text(on)
    assert "- LoRA slots        1.25 GiB: max_loras 4 x rank 64 (q/k/v, o, gate/up, down)" in text
    assert "captured with and without LoRA" in text
    assert "LoRA" not in render_text(off)


def test_an_explicit_kv_size_is_not_shrunk_by_lora():
    """vLLM takes --kv-cache-memory-bytes (and the CPU build's VLLM_CPU_KVCACHE_SPACE) as given: LoRA's buffers
    come on top of it, not out of it. The breakdown says so."""
    arch = catalogue_arch("Qwen/Qwen3-8B")
    req = FitRequest(kv_cache_memory_bytes=20 * GIB, max_model_len=8192)
    on = plan(arch, replace(req, lora=LoraSettings(max_loras=8, max_lora_rank=128)))
    assert on.num_gpu_blocks == plan(arch, req).num_gpu_blocks
    assert "(beside the KV cache given)" in render_text(on)


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_loras=0, max_lora_rank=16), "max_loras must be from 1"),
    (dict(max_loras=-3, max_lora_rank=16), "max_loras must be from 1"),
    (dict(max_loras=1 << 20, max_lora_rank=16), "max_loras must be from 1 to 65,536"),
    (dict(max_loras=2, max_lora_rank=48), "max_lora_rank 48 is not one vLLM accepts"),
    (dict(max_loras=2, max_lora_rank=1024), "max_lora_rank 1024 is not one vLLM accepts"),
    (dict(max_loras=4, max_lora_rank=16, max_cpu_loras=2), "must be >= max_loras"),
    (dict(max_loras=4, max_lora_rank=16, max_cpu_loras=1 << 40), "max_cpu_loras must be at most 65,536"),
    (dict(max_loras=True, max_lora_rank=16), "whole number"),
])
def test_settings_vllm_refuses_are_one_line(kwargs, message):
    with pytest.raises(LoraError, match=message) as err:
        LoraSettings(**kwargs)
    assert "\n" not in str(err.value)


def test_lora_on_a_vocabulary_vllm_refuses_does_not_fit_whatever_the_memory():
    cfg = {**CATALOGUE["meta-llama/Llama-3.1-8B-Instruct"], "vocab_size": 300_000}
    arch = arch_from_config(cfg)
    r = plan(arch, FitRequest(gpu_memory_bytes=H100, max_model_len=4096, lora=LoraSettings(max_loras=1, max_lora_rank=8)))
    assert not r.fits and r.reason.startswith("When using LoRA, vocab size must be <= 258048")
    assert r.fitting_max_model_len is None and r.fitting_gpu_memory_utilization is None  # no memory setting helps
    assert plan(arch, FitRequest(gpu_memory_bytes=H100, max_model_len=4096)).fits  # without LoRA it does
    # Gemma 3's 262,144 tokens are fine: vLLM's Gemma 3 lists no embedding modules, so its LM head is not wrapped
    assert plan(catalogue_arch("google/gemma-3-12b-it"), FitRequest(gpu_memory_bytes=H100, max_model_len=4096,
                                                                    lora=LoraSettings(1, 8))).fits


def test_rank_512_with_many_slots_does_not_fit_and_says_what_lora_takes():
    arch = catalogue_arch("meta-llama/Llama-3.1-8B-Instruct")
    r = plan(arch, FitRequest(gpu_memory_bytes=int(22.06 * GIB), max_model_len=8192,
                              lora=LoraSettings(max_loras=16, max_lora_rank=512)))
    assert not r.fits and "LoRA slots" in r.reason and "max_loras 16 x rank 512" in r.reason
    assert "fewer LoRA slots or a lower max_lora_rank" in r.reason


# -- monotone: more slots or a higher rank never leaves more KV cache -------------------------------------------

_MODELS = ["meta-llama/Llama-3.1-8B-Instruct", "mistralai/Mistral-7B-Instruct-v0.3", "Qwen/Qwen2.5-7B-Instruct-AWQ",
           "microsoft/Phi-3.5-mini-instruct", "openai/gpt-oss-20b", "deepseek-ai/DeepSeek-V2-Lite-Chat",
           "google/gemma-3-12b-it", "meta-llama/Llama-3.3-70B-Instruct"]
_SLOTS = st.integers(1, 64)
_RANKS = st.sampled_from(VLLM_LORA_RANKS)


@settings(max_examples=80, deadline=None)
@given(st.sampled_from(_MODELS), st.integers(8, 200), st.sampled_from([1, 2, 4, 8]), _SLOTS, _SLOTS, _RANKS, _RANKS,
       st.booleans())
def test_more_slots_or_a_higher_rank_never_leaves_more_kv_cache(name, gib, tp, a, b, ra, rb, eager):
    arch = catalogue_arch(name)
    req = FitRequest(gpu_memory_bytes=gib * GIB, tensor_parallel_size=tp, max_model_len=4096, enforce_eager=eager,
                     max_num_seqs=256)
    small = LoraSettings(max_loras=min(a, b), max_lora_rank=min(ra, rb))
    big = LoraSettings(max_loras=max(a, b), max_lora_rank=max(ra, rb))
    off, lo, hi = plan(arch, req), plan(arch, replace(req, lora=small)), plan(arch, replace(req, lora=big))
    assert off.available_kv_gib >= lo.available_kv_gib >= hi.available_kv_gib
    assert off.num_gpu_blocks >= lo.num_gpu_blocks >= hi.num_gpu_blocks
    assert off.kv_tokens_low >= lo.kv_tokens_low >= hi.kv_tokens_low
    assert off.max_model_len_that_fits >= lo.max_model_len_that_fits >= hi.max_model_len_that_fits
    assert hi.fits <= lo.fits <= off.fits  # what fits with more LoRA fits with less


# -- the CLI and the server start --------------------------------------------------------------------------------

def test_fit_takes_the_lora_flags_and_prints_them(capsys):
    code = main(["fit", "mistralai/Mistral-7B-Instruct-v0.3", "--gpu-memory-gib", "79.19", "--max-model-len", "32768",
                 "--max-loras", "4", "--max-lora-rank", "64", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0 and doc["lora_settings"] == "max_loras 4 x rank 64"
    assert doc["lora_gib"] == pytest.approx(1.25) and doc["lora_host_gib"] == pytest.approx(1.25)
    assert main(["fit", "Qwen/Qwen3-8B", "--gpu-memory-gib", "80", "--enable-lora"]) in (0, 1)
    assert "max_loras 1 x rank 16" in capsys.readouterr().out  # vLLM's defaults


@pytest.mark.parametrize("argv, message", [
    (["--max-lora-rank", "48"], "vLLM accepts max_lora_rank 1, 8, 16, 32, 64, 128, 256, 320, 512; got '48'"),
    (["--max-lora-rank", "sixteen"], "expected a LoRA rank"),
    (["--max-loras", "0"], "expected a number of LoRA slots from 1 to 65536"),
    (["--max-loras", "99999999"], "expected a number of LoRA slots from 1 to 65536"),
    (["--max-loras", "4", "--max-cpu-loras", "2"], "max_cpu_loras (2) must be >= max_loras (4)"),
])
def test_fit_bad_lora_flags_are_one_line(argv, message, capsys):
    try:
        code = main(["fit", "Qwen/Qwen3-8B", "--gpu-memory-gib", "80", *argv])
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("fleetdeck")]) == 1


def _profile(tmp_path, lora: str):
    from engine.vllm.profile import load_profile

    path = tmp_path / "p.toml"
    path.write_text(f'name = "p"\nmodel = "mistralai/Mistral-7B-Instruct-v0.3"\nmax_model_len = 32768\n{lora}')
    return load_profile(path)


def test_the_server_starts_plan_passes_the_profiles_lora(tmp_path):
    from engine.vllm.command import preflight

    gpu = SimpleNamespace(index=0, name="NVIDIA H100 80GB HBM3", memory_total_bytes=H100, memory_free_bytes=H100,
                          memory_used_bytes=0, mig_enabled=False, mig_devices=[])
    off = preflight(_profile(tmp_path, ""), [gpu])
    on = preflight(_profile(tmp_path, "[lora]\nenable = true\nmax_loras = 4\nmax_lora_rank = 64\n"), [gpu])
    assert off.lora_gib is None and on.lora_settings == "max_loras 4 x rank 64"
    assert on.lora_gib == pytest.approx(1.25) and on.kv_tokens < off.kv_tokens


def test_a_profiles_lora_the_planner_refuses_is_unplannable_not_a_traceback(tmp_path):
    from engine.vllm.command import UnplannableError, preflight

    gpu = SimpleNamespace(index=0, name="x", memory_total_bytes=H100, memory_free_bytes=H100, memory_used_bytes=0,
                          mig_enabled=False, mig_devices=[])
    with pytest.raises(UnplannableError, match=r"\[lora\] max_loras must be from 1 to 65,536"):
        preflight(_profile(tmp_path, "[lora]\nenable = true\nmax_loras = 100000000\n"), [gpu])


# -- what a deployment changes: target modules, fully sharded layers, the profile's extra vLLM arguments ----------

def test_target_modules_keep_only_the_layers_named_and_a_packed_layer_whole():
    arch = catalogue_arch("meta-llama/Llama-3.1-8B-Instruct")
    every = lora_memory(arch, LoraSettings(4, 64), 1, 8192)
    qv = lora_memory(arch, LoraSettings(4, 64, target_modules=("q_proj", "v_proj")), 1, 8192)
    packed = lora_memory(arch, LoraSettings(4, 64, target_modules=("qkv_proj",)), 1, 8192)
    h, r = 4096, 64
    assert qv.per_slot == packed.per_slot == 32 * (3 * r * h + r * (4096 + 2 * 1024)) * 2  # all three slices
    assert qv.modules == "q/k/v" and not qv.embeddings and qv.buffers < every.buffers
    moe = catalogue_arch("Qwen/Qwen3-30B-A3B")
    assert "experts" not in lora_memory(moe, LoraSettings(4, 64, target_modules=("q_proj", "o_proj")), 1, 8192).modules


def test_a_target_that_names_no_layer_is_a_warning_not_a_verdict():
    r = plan(catalogue_arch("Qwen/Qwen3-8B"), FitRequest(gpu_memory_bytes=H100, max_model_len=4096,
                                                         lora=LoraSettings(1, 16, target_modules=("c_attn",))))
    assert r.fits and r.lora_gib == 0
    assert any("names no LoRA-capable layer" in w and "q_proj" in w for w in r.warnings)


def test_fully_sharded_loras_split_column_a_and_row_b_over_tp():
    arch = catalogue_arch("meta-llama/Llama-3.3-70B-Instruct")
    plain = lora_memory(arch, LoraSettings(8, 64), 4, 8192)
    sharded = lora_memory(arch, LoraSettings(8, 64, fully_sharded=True), 4, 8192)
    h, r, n = 8192, 64, 80
    # column A (q/k/v: 3 slices, gate/up: 2) lose 3/4 of their rank; row B (o, down) 3/4 of their output
    saved = n * ((3 + 2) * h * (r - r // 4) + 2 * r * (h - h // 4)) * 2 * 8
    assert plain.buffers - sharded.buffers == saved
    assert lora_memory(arch, LoraSettings(8, 64, fully_sharded=True), 1, 8192) == lora_memory(arch, LoraSettings(8, 64), 1, 8192)
    # rank 1 does not split over 4 ranks: vLLM's divide() asserts while loading
    r = plan(arch, FitRequest(gpu_memory_bytes=H100, tensor_parallel_size=4, max_model_len=4096,
                              lora=LoraSettings(8, 1, fully_sharded=True)))
    assert not r.fits and "rank 1 is not divisible by 4" in r.reason and r.fitting_max_model_len is None


def test_the_profiles_extra_vllm_arguments_reach_the_plan():
    got = LoraSettings.from_vllm_args(4, 64, ["--max-cpu-loras", "16", "--lora-target-modules", "q_proj", "v_proj",
                                              "--fully-sharded-loras", "--enforce-eager"])
    assert got == LoraSettings(4, 64, max_cpu_loras=16, target_modules=("q_proj", "v_proj"), fully_sharded=True)
    assert LoraSettings.from_vllm_args(2, 8, ["--lora-target-modules=q_proj,o_proj", "--lora-dtype", "float32"]) == \
        LoraSettings(2, 8, target_modules=("q_proj", "o_proj"), dtype_bytes=4)
    # vLLM's parser takes the last of a repeated flag: extra_args come after the profile's [lora] values
    assert LoraSettings.from_vllm_args(4, 64, ["--max-loras", "8", "--max-lora-rank=128"]) == LoraSettings(8, 128)
    with pytest.raises(LoraError, match="max_lora_rank 48 is not one vLLM accepts"):
        LoraSettings.from_vllm_args(4, 64, ["--max-lora-rank", "48"])
    with pytest.raises(LoraError, match="--max-cpu-loras must be a whole number"):
        LoraSettings.from_vllm_args(2, 8, ["--max-cpu-loras", "many"])
    with pytest.raises(LoraError, match="must be >= max_loras"):
        LoraSettings.from_vllm_args(4, 8, ["--max-cpu-loras", "2"])


def test_a_profile_with_target_modules_in_extra_args_is_planned_with_them(tmp_path):
    from engine.vllm.command import preflight

    gpu = SimpleNamespace(index=0, name="H100", memory_total_bytes=H100, memory_free_bytes=H100, memory_used_bytes=0,
                          mig_enabled=False, mig_devices=[])
    lora = "[lora]\nenable = true\nmax_loras = 4\nmax_lora_rank = 64\n"
    every = preflight(_profile(tmp_path, lora), [gpu])
    path = tmp_path / "q.toml"
    path.write_text('name = "q"\nmodel = "mistralai/Mistral-7B-Instruct-v0.3"\nmax_model_len = 32768\n'
                    'extra_args = ["--lora-target-modules", "q_proj", "v_proj"]\n' + lora)
    from engine.vllm.profile import load_profile

    qv = preflight(load_profile(path), [gpu])
    assert qv.lora_modules == "q/k/v" and qv.lora_gib < every.lora_gib and qv.kv_tokens > every.kv_tokens
    # LoRA switched on in extra_args alone is planned too (vLLM's defaults: 1 slot at rank 16)
    path.write_text('name = "q"\nmodel = "mistralai/Mistral-7B-Instruct-v0.3"\nmax_model_len = 32768\n'
                    'extra_args = ["--enable-lora"]\n')
    assert preflight(load_profile(path), [gpu]).lora_settings == "max_loras 1 x rank 16"


# -- one verdict with LoRA too: FITS means it starts; a suggestion is itself a setting that fits ------------------

@settings(max_examples=60, deadline=None)
@given(st.sampled_from(_MODELS), st.integers(8, 200), st.integers(5, 100), st.sampled_from([1, 2, 4, 8]),
       st.one_of(st.none(), st.integers(1, 300_000)), _SLOTS, _RANKS, st.booleans())
def test_a_lora_verdict_means_one_thing(name, gib, util, tp, length, slots, rank, sharded):
    arch = catalogue_arch(name)
    req = FitRequest(gpu_memory_bytes=gib * GIB, gpu_memory_utilization=util / 100, tensor_parallel_size=tp,
                     max_model_len=length, lora=LoraSettings(slots, rank, fully_sharded=sharded))
    r = plan(arch, req)
    text = render_text(r)
    assert "LoRA slots" in text and r.lora_gib is not None and r.lora_gib >= 0
    if r.fits:
        assert r.reason is None and r.max_concurrency_low >= 1
    else:
        assert r.reason and "max concurrency" not in text
        if r.fitting_max_model_len:
            again = plan(arch, replace(req, gpu_memory_utilization=r.fitting_gpu_memory_utilization,
                                       max_model_len=r.fitting_max_model_len))
            assert again.fits, (r.reason, again.reason)
        if r.fitting_max_loras:  # fewer slots, everything else as given: it fits, and one more does not
            assert r.fitting_max_loras < slots and "or with LoRA" in text
            assert plan(arch, replace(req, lora=replace(req.lora, max_loras=r.fitting_max_loras))).fits
            assert not plan(arch, replace(req, lora=replace(req.lora, max_loras=r.fitting_max_loras + 1))).fits


_FLAG_TEXT = st.one_of(st.integers(-5, 1 << 21).map(str), st.sampled_from(["", " ", "nan", "1e3", "0x10", "٣", "64.0",
                                                                          "q_proj", "q_proj,v_proj", "-1"]))


@settings(max_examples=50, deadline=None)
@given(st.sampled_from(["--max-loras", "--max-lora-rank", "--max-cpu-loras", "--lora-target-modules"]), _FLAG_TEXT)
def test_any_value_of_a_lora_flag_is_a_verdict_or_one_usage_line(flag, value):
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(["fit", "Qwen/Qwen3-8B", "--gpu-memory-gib", "80", "--max-model-len", "4096", f"{flag}={value}"])
        except SystemExit as exc:
            code = exc.code
    assert code in (0, 1, 2)
    if code == 2:
        lines = [line for line in err.getvalue().splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("fleetdeck"), lines
        assert "Traceback" not in err.getvalue()


def test_an_explicit_kv_size_past_what_the_gpu_holds_beside_weights_and_lora_does_not_fit():
    """vLLM 0.32 reserves --kv-cache-memory-bytes as given ("This does not respect the gpu_memory_utilization
    config ... If OOM'ed"): the planner said FITS for a KV size the GPU cannot hold next to the weights, and LoRA's
    buffers make that gap larger."""
    arch = catalogue_arch("Qwen/Qwen3-8B")
    req = FitRequest(gpu_memory_bytes=24 * GIB, kv_cache_memory_bytes=7 * GIB, max_model_len=8192)
    assert plan(arch, req).fits
    r = plan(arch, replace(req, lora=LoraSettings(max_loras=8, max_lora_rank=64)))
    assert not r.fits and r.reason.startswith("CUDA out of memory allocating the KV cache given")
    assert "LoRA slots" in r.reason and r.fitting_max_model_len is None
    room = int(r.reason.rsplit("at most ", 1)[1].split(" bytes")[0].replace(",", ""))
    assert plan(arch, replace(req, kv_cache_memory_bytes=room, lora=LoraSettings(8, 64))).fits
    assert not plan(arch, replace(req, kv_cache_memory_bytes=room + 1, lora=LoraSettings(8, 64))).fits


def test_a_plan_that_does_not_fit_for_lora_names_the_slots_that_would():
    arch = catalogue_arch("mistralai/Mistral-7B-Instruct-v0.3")
    req = FitRequest(gpu_memory_bytes=int(22.06 * GIB), max_model_len=8192, lora=LoraSettings(16, 64))
    r = plan(arch, req)
    assert not r.fits and r.fitting_max_loras == 4 and "Or keep every other setting with max_loras 4 (rank 64)" in r.reason
    assert "or with LoRA:       max_loras 4" in render_text(r)
    assert plan(arch, replace(req, lora=LoraSettings(4, 64))).fits and not plan(arch, replace(req, lora=LoraSettings(5, 64))).fits
    assert plan(arch, replace(req, lora=None, max_model_len=10**6)).fitting_max_loras is None  # LoRA off: nothing said
