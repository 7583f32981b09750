"""What the proxy accepts from a client, checked before anything is sent upstream.

Two steps, each a 400 that names the field, as OpenAI's API answers:
- `parse_body`: the bytes are JSON text in a Unicode encoding, nested at most `MAX_DEPTH` levels (counted
  by a loop over the text *before* any recursive parser or encoder sees it, so no RecursionError can be
  reached from a body, whatever later walks it: the ledger's encoder, httpx, litellm), with finite
  numbers, integers Python can parse, no key twice in one object and no lone surrogates (they cannot be
  encoded for the upstream or the ledger).
- `check_request`: the object is OpenAI's chat-completions request (engine/router/chat_schema.py): roles,
  content parts, tools, tool_choice, response_format, logit_bias, user, stop and the numeric ranges.
  Ranges are OpenAI's, so a request valid there is valid here.
"""

from __future__ import annotations

import json
import math
import re
import sys
from typing import Any

from pydantic import ValidationError

from engine.router.chat_schema import ChatRequest

# Deep enough for any real request (a tool's JSON Schema nested a dozen levels is about 30); shallow
# enough that every recursive walk downstream stays far below Python's recursion limit.
MAX_DEPTH = 64

# A JSON string literal (escapes included): its brackets are text, not nesting.
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_ONE_KIND = str.maketrans("{}", "[]")
_RUN = re.compile(r"\[+|\]+")


class BadRequest(ValueError):
    """The message names the field and what it takes."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.param = param
        self.code = code


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BadRequest(f"number {text} is out of range", code="invalid_json")
    return value


def _no_constant(name: str) -> float:
    raise BadRequest(f"{name} is not a JSON number", code="invalid_json")


def _one_value_per_key(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object, refused when a key repeats: `{"model": "a", "model": "b"}` names two tasks, and which one
    counts differs between parsers (a hop in front may have read the first, Python keeps the last)."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise BadRequest(f"key {key[:60]!r} appears more than once in one object", code="invalid_json")
            seen.add(key)
    return obj


def json_depth_over(text: str, limit: int = MAX_DEPTH) -> bool:
    """Whether JSON text nests deeper than `limit`, found without recursion and without a parse, mostly
    in C string operations (this runs on the event loop). Text that is not JSON may be miscounted; the
    parser refuses it next either way."""
    # Deeper than `limit` takes more than `limit` opening brackets. Most texts (every chunk of a streamed
    # answer, which comes through here once per token) have far fewer: two counts, no regex pass.
    if text.count("[") + text.count("{") <= limit:
        return False
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text)).translate(_ONE_KIND)
    if "[" * (limit + 1) in brackets:
        return True
    # Each pass removes every innermost pair: the deepest nesting loses exactly one level per pass.
    # Passes are cheap while they shrink the text a lot (wide, bushy bodies).
    levels = 0
    while brackets:
        shorter = brackets.replace("[]", "")
        removed = len(brackets) - len(shorter)
        if removed == 0:
            return False  # unbalanced: not JSON, which the parser says
        levels += 1
        if levels > limit:
            return True
        brackets = shorter
        if removed * 8 < len(brackets):
            break
    # What is left has few innermost pairs, so long runs of one bracket: count the runs.
    depth = levels
    for run in _RUN.finditer(brackets):
        if brackets[run.start()] == "[":
            depth += run.end() - run.start()
            if depth > limit:
                return True
        else:
            depth -= run.end() - run.start()
    return False


def _decode(raw: bytes) -> str:
    # The encodings json.loads accepts for bytes (UTF-8, -16, -32, detected from the first bytes).
    try:
        return raw.decode(json.detect_encoding(raw), "surrogatepass")
    except UnicodeDecodeError as exc:
        raise BadRequest(f"Request body is not valid JSON: it is not valid {exc.encoding} text "
                         f"(byte {exc.start})", code="invalid_json") from None


def parse_body(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or BadRequest saying why not."""
    text = _decode(raw)
    if json_depth_over(text):
        raise BadRequest(f"Request body is not valid JSON: nested more than {MAX_DEPTH} levels deep",
                         code="invalid_json")
    try:
        body = json.loads(text, parse_float=_finite_float, parse_constant=_no_constant,
                          object_pairs_hook=_one_value_per_key)
    except BadRequest as exc:
        raise BadRequest(f"Request body is not valid JSON: {exc}", code="invalid_json") from None
    except RecursionError:  # pragma: no cover - the depth bound is checked first
        raise BadRequest("Request body is not valid JSON: nested too deeply", code="invalid_json") from None
    except json.JSONDecodeError as exc:
        raise BadRequest(f"Request body is not valid JSON: {str(exc)[:200]}", code="invalid_json") from None
    except ValueError:  # an integer past Python's digit limit (its message advises sys.set_int_max_str_digits)
        raise BadRequest(f"Request body is not valid JSON: an integer has more than {sys.get_int_max_str_digits()} "
                         "digits", code="invalid_json") from None
    if not isinstance(body, dict):
        raise BadRequest("Request body must be a JSON object.", code="invalid_request")
    try:
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest("Request body holds text that is not valid Unicode (a lone surrogate \\ud800-\\udfff).",
                         code="invalid_encoding") from None
    return body


def _param(body: Any, loc: tuple[Any, ...]) -> str:
    """pydantic's location as the client's path (`messages[0].content[1].image_url`): union tags in the
    location are not keys of the body, so only steps the body has are kept."""
    path = ""
    node = body
    for step in loc:
        if isinstance(node, dict) and isinstance(step, str) and step in node:
            path += f".{step}" if path else step
            node = node[step]
        elif isinstance(node, list) and isinstance(step, int) and 0 <= step < len(node):
            path += f"[{step}]"
            node = node[step]
    return path


def _message(err: Any, param: str) -> str:
    kind = err["type"]
    where = f"`{param}`" if param else "The request body"
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        key = str(err.get("ctx", {}).get("discriminator", "")).strip("'")
        expected = err.get("ctx", {}).get("expected_tags", "")
        got = err.get("ctx", {}).get("tag")
        what = f"`{param}.{key}`" if param else f"`{key}`"
        if kind == "union_tag_not_found":
            return f"{what} is required."
        return f"{what} must be one of {expected}, got {str(got)[:60]!r}."
    if kind == "missing":
        return f"{where} is required."
    if kind == "extra_forbidden":
        return f"{where} is not a parameter OpenAI's API takes here."
    text = str(err["msg"]).removeprefix("Value error, ")
    return (f"{where}: {text}" if param else text)[:300]


def check_request(body: dict[str, Any]) -> ChatRequest:
    """The body as a typed chat request, or BadRequest for the first field the upstreams could not take."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise BadRequest("`messages` is required: a non-empty list of message objects.", "messages", "missing_messages")
    try:
        return ChatRequest.model_validate(body)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        loc = tuple(err["loc"])
        if err["type"] in ("union_tag_invalid", "union_tag_not_found", "missing", "extra_forbidden") and loc:
            # The location ends at the missing or unknown key (or the object holding the tag): name it.
            parent = _param(body, loc[:-1]) if err["type"] in ("missing", "extra_forbidden") else _param(body, loc)
            last = loc[-1]
            param = (f"{parent}.{last}" if parent else str(last)) if err["type"] in ("missing", "extra_forbidden") \
                else parent
        else:
            param = _param(body, loc)
        message = _message(err, param)
        if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
            key = str(err.get("ctx", {}).get("discriminator", "")).strip("'")
            param = f"{param}.{key}" if param else key
        elif not param and (m := re.search(r"`([a-z_]+)`", message)):
            param = m.group(1)  # a check across fields names the field in its message
        raise BadRequest(message, param or None) from None
