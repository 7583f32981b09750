"""The dataset check before a job starts: every line parsed, each bad one named with its line number.

Two forms are accepted: chat (`{"messages": [{"role": ..., "content": ...}, ...]}`) and alpaca
(`{"instruction": ..., "input": ..., "output": ...}`). With a tokenizer in the base model's folder
(tokenizer.json, read with the `tokenizers` library: no torch), token lengths are measured and the
share that max_seq_length would cut is reported.
"""

from __future__ import annotations

import hashlib
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from store.json_text import JsonTextError, jsonl_lines, parse_json, shown

ROLES = {"system", "user", "assistant", "tool"}


@dataclass
class DatasetReport:
    path: str
    lines: int = 0
    examples: int = 0
    form: str | None = None  # chat | alpaca | mixed
    errors: list[str] = field(default_factory=list)
    sha256: str = ""
    token_stats: dict[str, float] | None = None
    truncated_share: float | None = None
    tokenizer: str | None = None

    @property
    def ok(self) -> bool:
        return not self.errors and self.examples > 0

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        return d


def example_text(obj: dict[str, Any]) -> str:
    """The text one example trains on (what the tokenizer length is measured over)."""
    if "messages" in obj:
        return "\n".join(f"{m['role']}: {m['content']}" for m in obj["messages"])
    prompt = obj["instruction"] + (f"\n\n{obj['input']}" if obj.get("input") else "")
    return f"user: {prompt}\nassistant: {obj['output']}"


def _check_line(obj: Any) -> tuple[str | None, str | None]:
    """(form, error) for one parsed line."""
    if not isinstance(obj, dict):
        return None, "expected a JSON object"
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            return None, "`messages` must be a non-empty list"
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                return None, f"message {i} needs `role` and `content`"
            if not isinstance(m["role"], str) or m["role"] not in ROLES:
                return None, f"message {i} has unknown role {shown(m['role'])} (one of {', '.join(sorted(ROLES))})"
            if not isinstance(m["content"], str) or not m["content"].strip():
                return None, f"message {i} ({m['role']}) has empty content (or content that is not text)"
        if not any(m["role"] == "assistant" for m in msgs):
            return None, "no assistant message to learn from"
        return "chat", None
    if "instruction" in obj or "output" in obj:
        for key in ("instruction", "output"):
            if key not in obj:
                return None, f"missing field `{key}`"
            if not isinstance(obj[key], str) or not obj[key].strip():
                return None, f"`{key}` is empty"
        if "input" in obj and not isinstance(obj["input"], str):
            return None, "`input` must be a string"
        return "alpaca", None
    return None, "missing fields: expected `messages` (chat) or `instruction`/`output` (alpaca)"


def load_examples(path: Path) -> list[dict[str, Any]]:
    """Parsed examples of a dataset that passed the check (its lines read as the check read them)."""
    return [parse_json(line) for _, line in jsonl_lines(path.read_text(encoding="utf-8"))]


def check_dataset(path: Path, base_model: Path | None = None, max_seq_length: int | None = None,
                  max_errors: int = 50) -> DatasetReport:
    report = DatasetReport(str(path))
    try:
        data = path.read_bytes()
    except OSError as exc:
        report.errors.append(f"cannot read {path}: {exc.strerror or exc}")
        return report
    report.sha256 = hashlib.sha256(data).hexdigest()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        report.errors.append(f"not UTF-8 text (byte {exc.start})")
        return report
    forms: set[str] = set()
    texts: list[str] = []
    for n, raw in jsonl_lines(text):
        report.lines += 1
        try:
            obj = parse_json(raw)
        except JsonTextError as exc:
            report.errors.append(f"line {n}: invalid JSON ({exc})")
            continue
        form, error = _check_line(obj)
        if error:
            report.errors.append(f"line {n}: {error}")
            continue
        forms.add(form or "")
        report.examples += 1
        texts.append(example_text(obj))
    if len(report.errors) > max_errors:
        extra = len(report.errors) - max_errors
        report.errors = report.errors[:max_errors] + [f"... and {extra} more bad lines"]
    if not report.lines:
        report.errors.append("the dataset is empty")
    report.form = forms.pop() if len(forms) == 1 else ("mixed" if forms else None)
    if base_model is not None and texts:
        tok_file = Path(base_model) / "tokenizer.json"
        if tok_file.is_file():
            try:
                from tokenizers import Tokenizer

                tok = Tokenizer.from_file(str(tok_file))
                lengths = [len(e.ids) for e in tok.encode_batch(texts)]
                report.tokenizer = str(tok_file)
                report.token_stats = {
                    "min": min(lengths), "mean": round(statistics.fmean(lengths), 1),
                    "p50": statistics.median(lengths), "p95": sorted(lengths)[int(0.95 * (len(lengths) - 1))],
                    "max": max(lengths), "total": sum(lengths),
                }
                if max_seq_length:
                    report.truncated_share = sum(1 for x in lengths if x > max_seq_length) / len(lengths)
            except Exception as exc:  # a tokenizer the library cannot read: report, do not fail the check
                report.tokenizer = f"unreadable ({exc})"
    return report
