"""What the proxy accepts from a client, checked before anything is sent upstream.

A request the proxy cannot serve as given gets a 400 that names the field, as OpenAI's API answers:
a non-finite number, a parameter of the wrong type or out of range, text that is not valid Unicode
(a lone surrogate cannot be encoded for the upstream or the ledger), an integer too long to parse or
JSON nested too deep. Ranges are OpenAI's, so a request valid there is valid here.
"""

from __future__ import annotations

import json
import math
from typing import Any


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


def parse_body(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or BadRequest saying why not."""
    try:
        body = json.loads(raw, parse_float=_finite_float, parse_constant=_no_constant)
    except BadRequest as exc:
        raise BadRequest(f"Request body is not valid JSON: {exc}", code="invalid_json") from None
    except RecursionError:
        raise BadRequest("Request body is not valid JSON: nested too deeply", code="invalid_json") from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError, and ints past Python's digit limit
        raise BadRequest(f"Request body is not valid JSON: {str(exc)[:200]}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise BadRequest("Request body must be a JSON object.", code="invalid_request")
    try:
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest("Request body holds text that is not valid Unicode (a lone surrogate \\ud800-\\udfff).",
                         code="invalid_encoding") from None
    except RecursionError:  # pragma: no cover - parse would have refused it first
        raise BadRequest("Request body is nested too deeply.", code="invalid_json") from None
    return body


def _number(body: dict[str, Any], key: str, lo: float, hi: float) -> None:
    v = body.get(key)
    if v is None:
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        raise BadRequest(f"`{key}` must be a number from {lo:g} to {hi:g}, got {v!r}"[:300], key)


def _integer(body: dict[str, Any], key: str, lo: int, hi: int) -> None:
    v = body.get(key)
    if v is None:
        return
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise BadRequest(f"`{key}` must be an integer from {lo} to {hi}, got {v!r}"[:300], key)


def _boolean(body: dict[str, Any], key: str) -> None:
    v = body.get(key)
    if v is not None and not isinstance(v, bool):
        raise BadRequest(f"`{key}` must be true or false, got {v!r}"[:300], key)


def check_params(body: dict[str, Any]) -> None:
    """BadRequest for the first parameter the upstreams could not take as given."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise BadRequest("`messages` is required: a non-empty list of message objects.", "messages", "missing_messages")
    for i, m in enumerate(messages):
        if not isinstance(m.get("role"), str):
            raise BadRequest(f"`messages[{i}].role` must be a string.", f"messages[{i}].role")
    _number(body, "temperature", 0, 2)
    _number(body, "top_p", 0, 1)
    _number(body, "presence_penalty", -2, 2)
    _number(body, "frequency_penalty", -2, 2)
    _integer(body, "max_tokens", 1, 2**31 - 1)
    _integer(body, "max_completion_tokens", 1, 2**31 - 1)
    _integer(body, "n", 1, 128)
    _integer(body, "seed", -(2**63), 2**63 - 1)
    _integer(body, "top_logprobs", 0, 20)
    _boolean(body, "logprobs")
    _boolean(body, "stream")
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise BadRequest(f"`stream_options` must be an object, got {options!r}"[:300], "stream_options")
        _boolean(options, "include_usage")
    stop = body.get("stop")
    if stop is not None and not (isinstance(stop, str) or (isinstance(stop, list) and len(stop) <= 4
                                                           and all(isinstance(s, str) for s in stop))):
        raise BadRequest("`stop` must be a string or a list of up to 4 strings.", "stop")
