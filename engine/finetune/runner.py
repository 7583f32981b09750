"""The fine-tune runner: one process per job, started detached by engine/finetune/jobs.py.

    python -m engine.finetune.runner --fleetdeck-job ID --spec SPEC.json --workdir DIR [--dataset-sha256 HEX] [--resume]

Every backend reports through the same trainer callback, which appends JSON lines to
DIR/progress.jsonl: {"event": "step", step, total_steps, loss, learning_rate, epoch, tokens_per_s,
elapsed_s, eta_s}, then one of {"event": "done", adapter_path, final_loss}, {"event": "cancelled",
step, checkpoint} or {"event": "error", kind, reason}. SIGTERM cancels cleanly: the trainer saves a
checkpoint at the end of the current step, says so, and exits; --resume continues from it.
Exit codes: 0 done, 3 cancelled, 1 failed.

The dataset is read once, before training: the SHA-256 of those bytes is what the adapter's fleetdeck.json
names, and with --dataset-sha256 (the hash the start's check took) a dataset changed since then is refused
before a step is taken, so an adapter is never trained (or a checkpoint resumed) on data other than what was
checked and audited.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.finetune.spec import DATASET_SHA_FLAG, JobSpec
from fleet.procs import JOB_FLAG

EXIT_DONE, EXIT_FAILED, EXIT_CANCELLED = 0, 1, 3


@dataclass(frozen=True)
class TrainingData:
    """The dataset's bytes as read for this run, and their SHA-256."""

    data: bytes
    sha256: str


def training_data(spec: JobSpec, expected_sha256: str | None) -> TrainingData:
    from store.files import NotAFileError, read_regular

    try:
        data = read_regular(Path(spec.dataset))
    except NotAFileError as exc:
        raise JobFailure("dataset", f"dataset: {exc}") from None
    digest = hashlib.sha256(data).hexdigest()
    if expected_sha256 and digest != expected_sha256:
        raise JobFailure("dataset", f"dataset {spec.dataset} changed since the job was checked (SHA-256 "
                                    f"{expected_sha256[:12]}... then, {digest[:12]}... now): nothing was trained on it; "
                                    "run `fleetdeck finetune check` and start a new job")
    return TrainingData(data, digest)


class JobFailure(Exception):
    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind, self.reason = kind, reason


class Progress:
    """Appends events to the progress file; the dashboard tails it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.started = time.time()
        self.cancel_requested = False

    def emit(self, event: str, **fields: Any) -> None:
        fields = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in fields.items()}
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"event": event, "ts": time.time(), **fields}) + "\n")

    def step(self, step: int, total: int, loss: float | None, lr: float | None, epoch: float | None,
             tokens_per_step: float, first_step: int = 0) -> None:
        elapsed = time.time() - self.started
        done = max(1, step - first_step)
        rate = done / elapsed if elapsed > 0 else 0.0
        self.emit("step", step=step, total_steps=total, loss=loss, learning_rate=lr, epoch=epoch,
                  tokens_per_s=round(tokens_per_step * rate, 1), elapsed_s=round(elapsed, 1),
                  eta_s=round((total - step) / rate, 1) if rate > 0 else None)


def latest_checkpoint(checkpoints: Path) -> Path | None:
    found = sorted((p for p in checkpoints.glob("checkpoint-*") if p.is_dir()), key=lambda p: int(p.name.split("-")[-1]))
    return found[-1] if found else None


def write_metadata(adapter_dir: Path, spec: JobSpec, final_loss: float | None, job_id: str, dataset_sha256: str,
                   simulated: bool = False) -> None:
    """The adapter's lineage; `dataset_sha256` is of the bytes the run trained on (read before its first step)."""
    meta = {
        "base_model": str(spec.base_model), "dataset": str(spec.dataset), "dataset_sha256": dataset_sha256,
        "spec": spec.model_dump(mode="json"), "final_loss": final_loss, "job_id": job_id,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "simulated": simulated,
    }
    (adapter_dir / "fleetdeck.json").write_text(json.dumps(meta, indent=2))


def unsloth_calls(spec: JobSpec, checkpoints: Path) -> dict[str, dict[str, Any]]:
    """The keyword arguments the unsloth backend passes to Unsloth and TRL (tested without a GPU)."""
    return {
        "from_pretrained": {"model_name": str(spec.base_model), "max_seq_length": spec.max_seq_length, "dtype": None,
                            "load_in_4bit": spec.load_in_4bit, "local_files_only": True},
        "get_peft_model": {"r": spec.lora_rank, "target_modules": list(spec.target_modules), "lora_alpha": spec.lora_alpha,
                           "lora_dropout": spec.lora_dropout, "bias": "none", "use_gradient_checkpointing": "unsloth",
                           "random_state": spec.seed},
        "sft_config": {"output_dir": str(checkpoints), "per_device_train_batch_size": spec.batch_size,
                       "gradient_accumulation_steps": spec.gradient_accumulation_steps, "warmup_steps": spec.warmup_steps,
                       "num_train_epochs": spec.epochs, "max_steps": spec.max_steps or -1, "learning_rate": spec.learning_rate,
                       "logging_steps": 1, "optim": "adamw_8bit", "weight_decay": 0.01, "lr_scheduler_type": "linear",
                       "seed": spec.seed, "save_steps": spec.save_steps, "save_total_limit": 2, "report_to": "none",
                       "max_seq_length": spec.max_seq_length, "dataset_text_field": "text"},
    }


def _callback(progress: Progress, tokens_per_step: float) -> Any:
    from transformers import TrainerCallback

    class ProgressCallback(TrainerCallback):
        first_step = 0

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.first_step = state.global_step
            progress.emit("start", total_steps=state.max_steps, resumed_at=state.global_step)

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any) -> None:
            logs = logs or {}
            if "loss" in logs:
                progress.step(state.global_step, state.max_steps, float(logs["loss"]), logs.get("learning_rate"),
                              state.epoch, tokens_per_step, self.first_step)

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if progress.cancel_requested:
                control.should_save = True  # keep this step's work: `resume` continues from it
                control.should_training_stop = True

    return ProgressCallback()


def _texts(data: TrainingData, tokenizer: Any) -> list[str]:
    from engine.finetune.dataset import example_text, load_examples

    texts = []
    for ex in load_examples(data.data):
        if getattr(tokenizer, "chat_template", None) and "messages" in ex:
            texts.append(tokenizer.apply_chat_template(ex["messages"], tokenize=False))
        else:
            texts.append(example_text(ex))
    return texts


def _emit_gpu_peak(progress: Progress) -> None:
    """What PyTorch says the job used at its peak, to hold the planner's VRAM estimate against."""
    import torch

    if torch.cuda.is_available():
        progress.emit("gpu_memory", peak_allocated_bytes=int(torch.cuda.max_memory_allocated()),
                      peak_reserved_bytes=int(torch.cuda.max_memory_reserved()))


def run_peft(spec: JobSpec, workdir: Path, progress: Progress, resume: bool,
             data: TrainingData) -> tuple[Path, float | None]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, Trainer, TrainingArguments

    cuda = torch.cuda.is_available()
    tokenizer = AutoTokenizer.from_pretrained(str(spec.base_model), local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    model = AutoModelForCausalLM.from_pretrained(str(spec.base_model), local_files_only=True,
                                                 dtype=torch.bfloat16 if cuda else torch.float32)
    present = {name.split(".")[-1] for name, _ in model.named_modules()}
    targets = [t for t in spec.target_modules if t in present]
    if not targets:
        raise JobFailure("spec_error", f"none of target_modules {spec.target_modules} exist in this model "
                                       f"(it has e.g. {sorted(present)[:8]})")
    # peft annotates lora_alpha as int but only divides it by r, so a fractional alpha from the spec is honoured.
    lora = LoraConfig(r=spec.lora_rank, lora_alpha=spec.alpha, lora_dropout=spec.lora_dropout,  # type: ignore[arg-type]
                      target_modules=targets, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora)
    encoded = [tokenizer(t, truncation=True, max_length=spec.max_seq_length) for t in _texts(data, tokenizer)]
    dataset = [{"input_ids": e["input_ids"], "attention_mask": e["attention_mask"]} for e in encoded]
    mean_tokens = sum(len(d["input_ids"]) for d in dataset) / max(1, len(dataset))
    checkpoints = workdir / "checkpoints"
    args = TrainingArguments(
        output_dir=str(checkpoints), per_device_train_batch_size=spec.batch_size,
        gradient_accumulation_steps=spec.gradient_accumulation_steps, learning_rate=spec.learning_rate,
        num_train_epochs=spec.epochs, max_steps=spec.max_steps or -1, warmup_steps=spec.warmup_steps,
        save_steps=spec.save_steps, save_total_limit=2, logging_steps=1, seed=spec.seed, report_to=[],
        use_cpu=not cuda, disable_tqdm=True, dataloader_num_workers=0, bf16=cuda,
    )
    trainer = Trainer(model=peft_model, args=args, train_dataset=dataset,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
                      callbacks=[_callback(progress, mean_tokens * spec.batch_size * spec.gradient_accumulation_steps)])
    checkpoint = latest_checkpoint(checkpoints) if resume else None
    if resume and checkpoint is None:
        raise JobFailure("resume_error", f"no checkpoint in {checkpoints} to resume from")
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    _emit_gpu_peak(progress)
    if progress.cancel_requested:
        raise _Cancelled(trainer.state.global_step, latest_checkpoint(checkpoints))
    adapter_dir = workdir / "adapter"
    peft_model.save_pretrained(str(adapter_dir))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return adapter_dir, losses[-1] if losses else getattr(result, "training_loss", None)


def run_unsloth(spec: JobSpec, workdir: Path, progress: Progress, resume: bool,
                data: TrainingData) -> tuple[Path, float | None]:
    try:
        import torch
    except ImportError as exc:
        raise JobFailure("missing_package", "torch is not installed: pip install 'fleetdeck[train]'") from exc
    if not torch.cuda.is_available():
        raise JobFailure("no_gpu", "the unsloth backend needs an NVIDIA GPU and none is visible "
                                   "(CUDA_VISIBLE_DEVICES, driver); use backend = \"peft\" to train on CPU")
    try:
        from unsloth import FastLanguageModel
        from trl import SFTConfig, SFTTrainer
    except ImportError as exc:
        raise JobFailure("missing_package", f"unsloth is not installed ({exc}): pip install 'fleetdeck[train]'") from exc
    calls = unsloth_calls(spec, workdir / "checkpoints")
    model, tokenizer = FastLanguageModel.from_pretrained(**calls["from_pretrained"])
    model = FastLanguageModel.get_peft_model(model, **calls["get_peft_model"])
    from datasets import Dataset

    texts = _texts(data, tokenizer)
    mean_tokens = sum(len(tokenizer(t)["input_ids"]) for t in texts[:200]) / max(1, min(len(texts), 200))
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=Dataset.from_dict({"text": texts}),
                         args=SFTConfig(**calls["sft_config"]),
                         callbacks=[_callback(progress, mean_tokens * spec.batch_size * spec.gradient_accumulation_steps)])
    checkpoint = latest_checkpoint(workdir / "checkpoints") if resume else None
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    _emit_gpu_peak(progress)
    if progress.cancel_requested:
        raise _Cancelled(trainer.state.global_step, latest_checkpoint(workdir / "checkpoints"))
    adapter_dir = workdir / "adapter"
    model.save_pretrained(str(adapter_dir))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return adapter_dir, losses[-1] if losses else None


def run_simulated(spec: JobSpec, workdir: Path, progress: Progress, resume: bool,
                  data: TrainingData) -> tuple[Path, float | None]:
    """The demo's fine-tune: steps, loss and throughput that move like a real QLoRA run; no model."""
    total = spec.max_steps or 400
    state_file = workdir / "simulated-step"
    start = int(state_file.read_text()) if resume and state_file.exists() else 0
    progress.emit("start", total_steps=total, resumed_at=start, simulated=True)
    rng = random.Random(spec.seed)
    loss = 2.4
    for step in range(start + 1, total + 1):
        time.sleep(0.5)
        loss = 0.55 + 1.85 * math.exp(-step / 90) + rng.uniform(-0.05, 0.05)
        lr = spec.learning_rate * min(1.0, step / max(1, spec.warmup_steps)) * (1 - step / total)
        progress.step(step, total, loss, lr, step / total * spec.epochs, 2048 * spec.batch_size * spec.gradient_accumulation_steps / 4, start)
        state_file.write_text(str(step))
        if progress.cancel_requested:
            raise _Cancelled(step, None)
    adapter_dir = workdir / "adapter"
    adapter_dir.mkdir(exist_ok=True)
    (adapter_dir / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": spec.lora_rank, "lora_alpha": spec.lora_alpha, "base_model_name_or_path": str(spec.base_model),
        "target_modules": list(spec.target_modules), "task_type": "CAUSAL_LM"}))
    (adapter_dir / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    return adapter_dir, loss


class _Cancelled(Exception):
    def __init__(self, step: int, checkpoint: Path | None) -> None:
        super().__init__("cancelled")
        self.step, self.checkpoint = step, checkpoint


BACKENDS = {"peft": run_peft, "unsloth": run_unsloth, "simulated": run_simulated}


def install_adapter(adapter_dir: Path, spec: JobSpec, root: Path | None) -> Path:
    """Register the finished adapter as the next version of the spec's name (`NAME@vN`, immutable)."""
    from engine.adapters.versions import register

    if root is None:
        return adapter_dir
    return register(adapter_dir, root, spec.name, [root])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="engine.finetune.runner")
    ap.add_argument(JOB_FLAG, dest="job_id", required=True)
    ap.add_argument("--spec", required=True)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--adapter-root")
    ap.add_argument(DATASET_SHA_FLAG, dest="dataset_sha256", help="the SHA-256 the start's dataset check took; another is refused")
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args(argv)
    os.umask(0o077)  # progress, checkpoints and the adapter are this user's, however the job was started
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    progress = Progress(workdir / "progress.jsonl")

    def on_term(signum: int, frame: Any) -> None:
        progress.cancel_requested = True
        print("[fleetdeck] SIGTERM: stopping after this step and saving a checkpoint", flush=True)

    signal.signal(signal.SIGTERM, on_term)
    try:
        spec = JobSpec.model_validate_json(Path(args.spec).read_text())
        data = training_data(spec, args.dataset_sha256)
        adapter_dir, final_loss = BACKENDS[spec.backend](spec, workdir, progress, args.resume, data)
        root = Path(args.adapter_root) if args.adapter_root else spec.adapter_root
        write_metadata(adapter_dir, spec, final_loss, args.job_id, data.sha256, simulated=spec.backend == "simulated")
        installed = install_adapter(adapter_dir, spec, root)
        progress.emit("done", adapter_path=str(installed), final_loss=final_loss)
        print(f"[fleetdeck] done: adapter at {installed}", flush=True)
        return EXIT_DONE
    except _Cancelled as c:
        progress.emit("cancelled", step=c.step, checkpoint=str(c.checkpoint) if c.checkpoint else None)
        print(f"[fleetdeck] cancelled at step {c.step}; checkpoint {c.checkpoint}", flush=True)
        return EXIT_CANCELLED
    except JobFailure as f:
        progress.emit("error", kind=f.kind, reason=f.reason)
        print(f"[fleetdeck] failed: {f.reason}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    except Exception as exc:
        import traceback

        traceback.print_exc()
        text = f"{type(exc).__name__}: {exc}"
        kind = "cuda_oom" if "out of memory" in text.lower() else "error"
        progress.emit("error", kind=kind, reason=text[:500])
        return EXIT_FAILED


if __name__ == "__main__":
    raise SystemExit(main())
