"""Merge and quantize jobs through the CLI: a real peft merge on CPU whose model computes what the adapter
on its base computes, and what each bad request gets. Quantizing with the real llm-compressor is in
the real-engine tier (tests/engines/test_real_promotion.py)."""

from __future__ import annotations

import json

import pytest

from engine.finetune import jobs
from fleetdeck.cli import main
from store.db import open_store
from tests.fakes.tiny_model import make_tiny_model


@pytest.fixture(scope="module")
def tiny_version(tmp_path_factory):
    """A tiny base and a LoRA version of it whose B matrices are random (a fresh adapter would merge to nothing)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from engine.adapters.versions import register

    root = tmp_path_factory.mktemp("merge")
    base = make_tiny_model(root / "base", hidden_size=64, num_attention_heads=2, num_key_value_heads=1)
    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base)),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(str(root / "trained"))
    version = register(root / "trained", root / "adapters", "tickets")
    fleet = root / "fleet.toml"
    fleet.write_text(f'adapter_roots = ["{root / "adapters"}"]\n[models]\nroot = "{root / "models"}"\n')
    return {"root": root, "base": base, "version": version, "fleet": fleet}


def run(site, *args: str) -> int:
    return main([*args, "--store", str(site["root"] / "fd.db"), "--config", str(site["fleet"])])


def test_merge_folds_the_version_into_its_base_as_a_job(tiny_version, capsys):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    site = tiny_version
    assert run(site, "finetune", "merge", "tickets@v1", "--wait") == 0
    out = capsys.readouterr().out
    merged = site["root"] / "models" / "tickets-v1-merged"
    assert "finished (model at" in out and (merged / "config.json").is_file()
    meta = json.loads((merged / "fleetdeck-model.json").read_text())
    assert meta["adapter"] == "tickets@v1" and meta["kind"] == "merged" and len(meta["adapter_content_sha256"]) == 64
    assert (merged / "tokenizer.json").is_file() and not list(merged.parent.glob(".*partial"))

    # The merged model computes what the adapter on its base computes (and not what the base alone does).
    ids = torch.tensor([[2, 5, 6, 7, 8]])
    base = AutoModelForCausalLM.from_pretrained(str(site["base"]))
    with torch.no_grad():
        plain = base(ids).logits.float()
        adapted = PeftModel.from_pretrained(base, str(site["version"])).merge_and_unload()(ids).logits.float()
        folded = AutoModelForCausalLM.from_pretrained(str(merged))(ids).logits.float()
    assert torch.allclose(folded, adapted, atol=1e-4) and not torch.allclose(folded, plain, atol=1e-2)

    # The job is on the Jobs list like a fine-tune, and the action is in the audit trail.
    store = open_store(site["root"] / "fd.db")
    (rec,) = [j for j in jobs.list_jobs(store) if j.spec.get("kind") == "merge"]
    assert rec.state == "finished" and rec.outputs.output_path == str(merged)
    actions = [(r["action"], r["outcome"]) for r in store.query("SELECT action, outcome FROM audit")]
    assert ("model.merge", "done") in actions

    # A second merge to the same folder is refused, not written over.
    assert run(site, "finetune", "merge", "tickets@v1") == 2
    assert "already exists" in capsys.readouterr().err


def test_what_bad_merge_and_quantize_requests_get(tiny_version, tmp_path, capsys):
    site = tiny_version
    assert run(site, "finetune", "merge", "nothing@v3") == 2
    assert "no adapter 'nothing@v3'" in capsys.readouterr().err
    # Without an llm-compressor environment: one line that says how to make one.
    assert run(site, "finetune", "quantize", str(site["base"]), "--calibration", str(site["base"] / "config.json")) == 2
    err = capsys.readouterr().err.strip()
    assert "quantize_python" in err and "pip install torch llmcompressor" in err and len(err.splitlines()) == 1
    assert run(site, "finetune", "quantize", str(tmp_path), "--calibration", "x.jsonl") == 2
    assert "not a model folder" in capsys.readouterr().err
    assert run(site, "--read-only", "finetune", "merge", "tickets@v1", "--out", str(tmp_path / "m")) == 2
    assert "read-only" in capsys.readouterr().err and not (tmp_path / "m").exists()
