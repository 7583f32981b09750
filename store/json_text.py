"""JSON and JSON Lines written by people and other tools (datasets, eval sets, model and adapter configs),
read so that anything wrong with them is one line naming the problem, never a traceback.

JSON Lines splits on "\\n" alone: `str.splitlines()` also splits on U+2028, U+2029, U+0085 and the ASCII
separators, which JSON allows raw inside a string (`json.dumps(..., ensure_ascii=False)` writes them), so a
valid line was cut in two and reported as broken, and every line number after it was off by one against an
editor's or `sed -n Np`'s. A UTF-8 byte order mark before the first line (Windows tools write one) is not part
of the data. Python's parser raises RecursionError for deep nesting and a plain ValueError for an integer past
its digit limit: both are the file's fault, named like any other parse error.
"""

from __future__ import annotations

import json
from typing import Any, Iterator

BOM = "\ufeff"


class JsonTextError(ValueError):
    """The text is not the JSON it should be; the message is one line, without the text itself."""


def parse_json(text: str | bytes) -> Any:
    """json.loads, with every parse failure a JsonTextError whose message is one short line."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        where = f"column {exc.colno}" if exc.lineno == 1 else f"line {exc.lineno} column {exc.colno}"
        raise JsonTextError(f"{exc.msg} at {where}") from None
    except RecursionError:
        raise JsonTextError("nested too deeply") from None
    except ValueError as exc:  # an integer longer than Python's digit limit, say
        raise JsonTextError(str(exc).split(";")[0].split("\n")[0][:120]) from None


def jsonl_lines(text: str) -> Iterator[tuple[int, str]]:
    """(line number, line) for each line of a JSON Lines text that is not blank, numbered as an editor
    numbers them (1-based, "\\n" ends a line; a "\\r" before it is dropped)."""
    if text.startswith(BOM):
        text = text[1:]
    for n, raw in enumerate(text.split("\n"), start=1):
        line = raw[:-1] if raw.endswith("\r") else raw
        if line.strip():
            yield n, line


def shown(value: object, limit: int = 60) -> str:
    """repr() of a value from a file, cut to `limit` characters: an error names it, it does not reprint it."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"
