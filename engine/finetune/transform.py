"""The merge and quantize job process: `python -m engine.finetune.transform merge|quantize ...`.

merge: an adapter version folded into its base, in the base's own dtype (16-bit for released models), with peft (`merge_and_unload`), saved as a plain
model folder vLLM serves without LoRA, with the base's tokenizer and a `fleetdeck-model.json` naming
what it was made from.
quantize: a model folder to AWQ W4A16 (compressed-tensors format, which vLLM loads) with llm-compressor's
`oneshot` and a calibration set from a fine-tune dataset (JSONL, the same formats). llm-compressor runs in
the Python given by `[models] quantize_python` (its own virtual environment: it pins its own transformers).

Progress goes to the same progress.jsonl events the Jobs screen reads for fine-tunes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from store.json_text import JsonTextError, jsonl_lines, parse_json

EXIT_DONE, EXIT_FAILED = 0, 1


def _emit(workdir: Path, event: str, **fields: Any) -> None:
    with open(workdir / "progress.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"event": event, "ts": time.time(), **fields}) + "\n")


def _sha(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _fresh_output(out: Path) -> Path:
    """Write into a temporary sibling; the caller renames it into place only when the job finished."""
    if out.exists():
        raise FileExistsError(f"{out} already exists: name another --out (a model folder is never overwritten)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def merge(adapter: Path, base: Path, out: Path, workdir: Path) -> Path:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = _fresh_output(out)
    _emit(workdir, "start", total_steps=3, resumed_at=0)
    # The base's own dtype (bf16/fp16 for released models): the merged model is what vLLM served, folded.
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype="auto", local_files_only=True)
    _emit(workdir, "step", step=1, total_steps=3, loss=None, note="base loaded")
    merged = PeftModel.from_pretrained(model, str(adapter), local_files_only=True).merge_and_unload()
    _emit(workdir, "step", step=2, total_steps=3, loss=None, note="adapter merged")
    merged.save_pretrained(str(tmp), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(base), local_files_only=True).save_pretrained(str(tmp))
    meta = json.loads((adapter / "fleetdeck.json").read_text()) if (adapter / "fleetdeck.json").is_file() else {}
    (tmp / "fleetdeck-model.json").write_text(json.dumps({
        "kind": "merged", "adapter": adapter.name, "adapter_content_sha256": meta.get("content_sha256"),
        "base_model": str(base), "base_config_sha256": _sha(base / "config.json"), "dtype": str(model.dtype).removeprefix("torch."),
        "made_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=2))
    tmp.rename(out)
    _emit(workdir, "step", step=3, total_steps=3, loss=None, note="saved")
    return out


def calibration_texts(dataset: Path, tokenizer: Any, limit: int) -> list[str]:
    """Texts from a fine-tune dataset (chat `messages` or alpaca fields), as the model will see them."""
    from store.files import read_regular  # a regular file only: a pipe would block the job

    texts = []
    for n, line in jsonl_lines(read_regular(dataset).decode("utf-8")):
        try:
            row = parse_json(line)
        except JsonTextError as exc:
            raise ValueError(f"{dataset}: line {n}: invalid JSON ({exc})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{dataset}: line {n}: expected a JSON object")
        if isinstance(row.get("messages"), list):
            try:
                texts.append(tokenizer.apply_chat_template(row["messages"], tokenize=False))
            except Exception:  # a tokenizer without a chat template
                texts.append("\n".join(f"{m.get('role')}: {m.get('content')}" for m in row["messages"]))
        else:
            texts.append("\n".join(str(row.get(k, "")) for k in ("instruction", "input", "output") if row.get(k)))
        if len(texts) >= limit:
            break
    if not texts:
        raise ValueError(f"{dataset}: no calibration examples")
    return texts


def quantize(model_dir: Path, out: Path, dataset: Path, samples: int, max_seq_len: int, workdir: Path) -> Path:
    try:
        from datasets import Dataset
        from llmcompressor import oneshot
        from llmcompressor.modifiers.awq import AWQModifier
    except ImportError as exc:
        raise RuntimeError(f"llm-compressor is not installed in {sys.executable} ({exc}): make a virtual environment "
                           "with `pip install torch llmcompressor` and set [models] quantize_python to its python") from exc
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = _fresh_output(out)
    _emit(workdir, "start", total_steps=3, resumed_at=0)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype="auto", local_files_only=True)
    texts = calibration_texts(dataset, tokenizer, samples)
    calib = Dataset.from_dict({"text": texts}).map(
        lambda row: tokenizer(row["text"], truncation=True, max_length=max_seq_len, add_special_tokens=False),
        remove_columns=["text"])
    _emit(workdir, "step", step=1, total_steps=3, loss=None, note=f"{len(texts)} calibration examples")
    # W4A16: 4-bit weights in groups of 128, 16-bit activations; the output layer stays 16-bit.
    recipe = [AWQModifier(ignore=["lm_head"], scheme="W4A16_ASYM", targets=["Linear"])]
    oneshot(model=model, dataset=calib, recipe=recipe, max_seq_length=max_seq_len, num_calibration_samples=len(texts))
    _emit(workdir, "step", step=2, total_steps=3, loss=None, note="AWQ applied")
    model.save_pretrained(str(tmp), save_compressed=True)
    tokenizer.save_pretrained(str(tmp))
    (tmp / "fleetdeck-model.json").write_text(json.dumps({
        "kind": "awq-w4a16", "source_model": str(model_dir), "source_config_sha256": _sha(model_dir / "config.json"),
        "calibration": str(dataset), "calibration_sha256": _sha(dataset), "samples": len(texts),
        "made_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=2))
    tmp.rename(out)
    _emit(workdir, "step", step=3, total_steps=3, loss=None, note="saved")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="engine.finetune.transform")
    ap.add_argument("kind", choices=["merge", "quantize"])
    # fleet.procs.JOB_FLAG, written out: this process may run in a venv without fleetdeck's dependencies
    ap.add_argument("--fleetdeck-job", dest="job_id")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--adapter")
    ap.add_argument("--base")
    ap.add_argument("--model")
    ap.add_argument("--dataset")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--resume", action="store_true")  # a rerun starts over: nothing partial is kept
    args = ap.parse_args(argv)
    os.umask(0o077)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        if args.kind == "merge":
            out = merge(Path(args.adapter), Path(args.base), Path(args.out), workdir)
        else:
            out = quantize(Path(args.model), Path(args.out), Path(args.dataset), args.samples, args.max_seq_len, workdir)
    except Exception as exc:
        import traceback

        traceback.print_exc()
        _emit(workdir, "error", kind="error", reason=f"{type(exc).__name__}: {exc}"[:500])
        return EXIT_FAILED
    _emit(workdir, "done", output_path=str(out))
    print(f"[fleetdeck] done: model at {out}", flush=True)
    return EXIT_DONE


if __name__ == "__main__":
    raise SystemExit(main())
