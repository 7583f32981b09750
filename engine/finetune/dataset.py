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

from store.files import NotAFileError, open_regular
from store.json_text import BOM, JsonTextError, jsonl_lines, parse_json, shown

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


# A line longer than this is not one training example (max_seq_length counts tokens: even 128k tokens are a few
# MiB of text). Past it the rest of the line is hashed and skipped in pieces, so a file with no newline at all
# cannot take the host's memory.
MAX_LINE_BYTES = 64 * 1024 * 1024
BOM_BYTES = BOM.encode("utf-8")
TOKENIZE_BATCH = 512  # lines measured at a time: the check keeps lengths, not the texts


def load_examples(data: bytes) -> list[dict[str, Any]]:
    """Parsed examples of a dataset that passed the check, from the bytes the trainer hashed, line for line as
    the check read them."""
    return [parse_json(line) for _, line in jsonl_lines(data.decode("utf-8"))]


def _tokenizer(base_model: Path | None) -> tuple[Any, str | None]:
    """(tokenizer or None, what the report says of it)."""
    if base_model is None:
        return None, None
    tok_file = Path(base_model) / "tokenizer.json"
    if not tok_file.is_file():
        return None, None
    try:
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(tok_file)), str(tok_file)
    except Exception as exc:  # a tokenizer the library cannot read: report, do not fail the check
        return None, f"unreadable ({exc})"


def check_dataset(path: Path, base_model: Path | None = None, max_seq_length: int | None = None,
                  max_errors: int = 50) -> DatasetReport:
    """Every line checked, read a line at a time (a dataset can be larger than the dashboard host's memory);
    the SHA-256 is of every byte read, which is what the job's runner holds its own read against."""
    report = DatasetReport(str(path))
    tok, report.tokenizer = _tokenizer(base_model)
    forms: set[str] = set()
    lengths: list[int] = []
    pending: list[str] = []

    def measure() -> None:
        nonlocal tok
        if tok is not None and pending:
            try:
                lengths.extend(len(e.ids) for e in tok.encode_batch(pending))
            except Exception as exc:  # as above: the tokenizer's failure is reported, the check goes on
                tok, report.tokenizer = None, f"unreadable ({exc})"
                lengths.clear()
        pending.clear()

    digest = hashlib.sha256()
    try:
        fh = open_regular(path)  # a regular file only: a FIFO would block the check, /dev/zero never ends
    except NotAFileError as exc:
        report.errors.append(str(exc))
        return report
    with fh:
        n = 0
        while raw := fh.readline(MAX_LINE_BYTES + 1):
            n += 1
            digest.update(raw)
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                while raw and not raw.endswith(b"\n"):
                    raw = fh.readline(MAX_LINE_BYTES)
                    digest.update(raw)
                report.lines += 1
                report.errors.append(f"line {n}: longer than {MAX_LINE_BYTES // (1024 * 1024)} MiB")
                continue
            if n == 1 and raw.startswith(BOM_BYTES):
                raw = raw[len(BOM_BYTES):]
            raw = raw[:-1] if raw.endswith(b"\n") else raw
            raw = raw[:-1] if raw.endswith(b"\r") else raw
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                report.lines += 1
                report.errors.append(f"line {n}: not UTF-8 text (byte {exc.start} of the line)")
                continue
            if not line.strip():  # blank lines are skipped, as jsonl_lines skips them for the trainer
                continue
            report.lines += 1
            try:
                obj = parse_json(line)
            except JsonTextError as exc:
                report.errors.append(f"line {n}: invalid JSON ({exc})")
                continue
            form, error = _check_line(obj)
            if error:
                report.errors.append(f"line {n}: {error}")
                continue
            forms.add(form or "")
            report.examples += 1
            if tok is not None:
                pending.append(example_text(obj))
                if len(pending) >= TOKENIZE_BATCH:
                    measure()
    measure()
    report.sha256 = digest.hexdigest()
    if len(report.errors) > max_errors:
        extra = len(report.errors) - max_errors
        report.errors = report.errors[:max_errors] + [f"... and {extra} more bad lines"]
    if not report.lines:
        report.errors.append("the dataset is empty")
    report.form = forms.pop() if len(forms) == 1 else ("mixed" if forms else None)
    if tok is not None and lengths:
        report.token_stats = {
            "min": min(lengths), "mean": round(statistics.fmean(lengths), 1),
            "p50": statistics.median(lengths), "p95": sorted(lengths)[int(0.95 * (len(lengths) - 1))],
            "max": max(lengths), "total": sum(lengths),
        }
        if max_seq_length:
            report.truncated_share = sum(1 for x in lengths if x > max_seq_length) / len(lengths)
    elif tok is not None:
        report.tokenizer = None
    return report
