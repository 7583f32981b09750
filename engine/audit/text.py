"""Text in audit records: stored whatever it holds, shown without letting it act on a terminal.

A record's text fields come from operators and from the network (an agent request's operator field, a
profile name, a command-line argument decoded with surrogateescape). SQLite takes only valid UTF-8 and
some tools stop a string at NUL, so such a value could make the write fail, and an action with no record
is what the audit promises never happens. `stored()` therefore keeps a value as it is when SQLite and
UTF-8 can take it, and otherwise (and for a value past LIMIT characters) writes an escaped form that
starts with MARK:

    \\\\        a backslash
    \\xNN      NUL (00) or, from 80 to ff, a byte that was not UTF-8 (surrogateescape)
    \\uXXXX    any other lone surrogate
    \\[...]    at the end: how many characters were cut and the SHA-256 of the whole value

so the record is always written and `unstored()` gives the value back exactly (bar a cut tail). A value
that happens to begin with MARK is escaped too, so MARK always means "escaped".

`shown()` is for output to a person: control and format characters (ESC, newline, bidi overrides...)
become visible escapes, so a record cannot colour the auditor's terminal or forge an extra line.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

MARK = "\\~"
LIMIT = 4096  # characters kept of one field; a longer value is cut and its hash kept


def _needs_escape(text: str) -> bool:
    return "\x00" in text or text.startswith(MARK) or len(text) > LIMIT or _has_surrogate(text)


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _escape_char(ch: str) -> str:
    code = ord(ch)
    if ch == "\\":
        return "\\\\"
    if code == 0:
        return "\\x00"
    if 0xDC80 <= code <= 0xDCFF:  # a byte surrogateescape could not decode
        return f"\\x{code - 0xDC00:02x}"
    if 0xD800 <= code <= 0xDFFF:
        return f"\\u{code:04x}"
    return ch


def stored(value: object) -> str:
    """The form of `value` an audit field holds: itself when it can be stored as it is, else escaped."""
    text = value if isinstance(value, str) else str(value)
    if not _needs_escape(text):
        return text
    kept = "".join(_escape_char(ch) for ch in text[:LIMIT])
    if len(text) > LIMIT:
        digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
        kept += f"\\[cut: {len(text) - LIMIT} more characters; sha256 of the whole value {digest}]"
    return MARK + kept


_ESCAPE = re.compile(r"\\(\\|x[0-9a-f]{2}|u[0-9a-f]{4}|\[.*\]$)", re.S)


def unstored(text: str) -> str:
    """The value a field was given (a cut value: its kept part)."""
    if not text.startswith(MARK):
        return text

    def one(m: re.Match[str]) -> str:
        esc = m.group(1)
        if esc == "\\":
            return "\\"
        if esc[0] == "x":
            code = int(esc[1:], 16)
            return chr(code) if code < 0x80 else chr(0xDC00 + code)
        if esc[0] == "u":
            return chr(int(esc[1:], 16))
        return ""  # the cut note

    return _ESCAPE.sub(one, text[len(MARK):])


def shown(value: object) -> str:
    """`value` safe to print: control, format and separator characters and lone surrogates as escapes."""
    text = "" if value is None else (value if isinstance(value, str) else str(value))
    out = []
    for ch in text:
        cat = unicodedata.category(ch)
        if cat in ("Cc", "Cf", "Cs", "Zl", "Zp"):
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)
