"""Fine-tune job specs (TOML, configs/finetune/*.toml), validated; errors name the file and key."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from engine.kvfit.training import DEFAULT_TARGETS
from store.config_files import Strict, load_toml_model


# The runner's flag for the dataset SHA-256 the start's check took (engine/finetune/runner.py refuses another).
DATASET_SHA_FLAG = "--dataset-sha256"


class JobSpec(Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$", description="the output adapter's name")
    base_model: Path = Field(description="a local model folder: air-gapped hosts have no hub")
    dataset: Path = Field(description="JSONL, chat `messages` or alpaca `instruction`/`input`/`output`")
    backend: Literal["unsloth", "peft", "simulated"] = "unsloth"
    lora_rank: int = Field(default=64, ge=1, le=1024)
    lora_alpha: float | None = Field(default=None, gt=0, description="default: the rank")
    lora_dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: list(DEFAULT_TARGETS), min_length=1)
    load_in_4bit: bool = True
    max_seq_length: int = Field(default=2048, ge=8)
    epochs: float = Field(default=1.0, gt=0)
    max_steps: int | None = Field(default=None, ge=1)
    learning_rate: float = Field(default=2e-4, gt=0)
    batch_size: int = Field(default=2, ge=1)
    gradient_accumulation_steps: int = Field(default=4, ge=1)
    save_steps: int = Field(default=50, ge=1)
    warmup_steps: int = Field(default=5, ge=0)
    seed: int = 3407
    adapter_root: Path | None = Field(default=None, description="where the finished adapter goes (default: the first adapter root)")

    @model_validator(mode="after")
    def _alpha(self) -> "JobSpec":
        if self.lora_alpha is None:
            object.__setattr__(self, "lora_alpha", float(self.lora_rank))
        return self

    @property
    def alpha(self) -> float:
        """lora_alpha with its default (the rank) applied: the validator fills it in, so this is never None;
        the field stays optional so a spec written without it reads as one that says "the rank"."""
        return self.lora_alpha if self.lora_alpha is not None else float(self.lora_rank)


def load_spec(path: str | Path) -> JobSpec:
    p = Path(path)
    spec = load_toml_model(p, JobSpec)
    # Relative paths in a spec are relative to the spec file.
    updates = {}
    for key in ("base_model", "dataset", "adapter_root"):
        value = getattr(spec, key)
        if value is not None and not value.is_absolute():
            updates[key] = (p.parent / value).resolve()
    return spec.model_copy(update=updates) if updates else spec


def spec_roots() -> list[Path]:
    """Where fine-tune specs are found by name: FLEETDECK_SPECS's folders, ~/.config/fleetdeck/finetune, then
    ./configs/finetune."""
    from store.paths import config_dir, overrides

    return overrides().spec_roots + [config_dir() / "finetune", Path.cwd() / "configs" / "finetune"]


def named_specs() -> dict[str, Path]:
    from store.config_files import named_tomls

    return named_tomls(spec_roots())
