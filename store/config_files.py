"""TOML configuration validated into pydantic models, with errors that name file, key and expectation.

`load_toml_model` is the one loader every config file goes through (fleet, launch profiles, router,
fine-tune specs), so every config error reads the same way. The fleet's own config is fleet/config.py;
the others belong to the engine, which is why the loader sits in the lowest layer.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Annotated, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError

from store.files import read_regular
from store.json_text import shown

M = TypeVar("M", bound=BaseModel)


class ConfigError(Exception):
    """A config file is missing, not TOML, or does not validate. The message is for the operator."""


# A path from a config file, with `~` already expanded: every use of it sees the same folder.
HomePath = Annotated[Path, AfterValidator(lambda p: p.expanduser())]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _key_path(loc: tuple[object, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts[-1:] = [f"{parts[-1]}[{item}]"] if parts else [f"[{item}]"]
        else:
            parts.append(str(item))
    return ".".join(parts) or "(top level)"


def format_validation_error(path: Path | str, exc: ValidationError) -> str:
    lines = [f"{path}: invalid configuration"]
    for err in exc.errors():
        key = _key_path(err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check its spelling)"
        elif err["type"] == "missing":
            msg = "required key is missing"
        got = err.get("input")
        # The value is named, not reprinted: a 100 KB string in a config is one short line here.
        said = "" if err["type"] in ("missing", "extra_forbidden") or isinstance(got, dict) else f" (got {shown(got)})"
        lines.append(f"  {key}: {msg}{said}")
    return "\n".join(lines)


def parse_toml_model(path: Path | str, text: str, model: type[M]) -> M:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    except RecursionError:  # tomllib recurses into nested arrays and inline tables
        raise ConfigError(f"{path}: not valid TOML: arrays or tables nested too deeply") from None
    except ValueError as exc:  # an integer past Python's digit limit is a ValueError, not a TOMLDecodeError
        raise ConfigError(f"{path}: not valid TOML: {str(exc).split(';')[0]}") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(path, exc)) from exc


# A config a person writes is kilobytes; past this it is not one (and is not read into memory whole).
MAX_CONFIG_BYTES = 4 * 1024 * 1024


def load_toml_model(path: Path | str, model: type[M]) -> M:
    p = Path(path).expanduser()
    if not p.exists() and not p.is_symlink():
        raise ConfigError(f"{p}: file not found")
    try:
        text = read_regular(p, MAX_CONFIG_BYTES).decode("utf-8")
    except OSError as exc:  # a folder, a pipe (which would block the read for ever), a device, too large
        raise ConfigError(str(exc)) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: cannot read: not UTF-8 text (byte {exc.start})") from None
    return parse_toml_model(p, text, model)


NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


def named_tomls(roots: list[Path]) -> dict[str, Path]:
    """`NAME.toml` files in the folders, by name; the first folder that has a name wins."""
    found: dict[str, Path] = {}
    for root in roots:
        if root.is_dir():
            for p in sorted(root.glob("*.toml")):
                found.setdefault(p.stem, p)
    return found


def toml_by_name(kind: str, name: object, roots: list[Path]) -> Path:
    """A config by its name in this host's own folders: never a path, so a name from the network cannot
    reach a file the host's operator did not put there."""
    found = named_tomls(roots)
    if isinstance(name, str) and re.match(NAME_PATTERN, name) and name in found:
        return found[name]
    known = ", ".join(sorted(found)) or f"none (folders: {', '.join(str(r) for r in roots)})"
    raise ValueError(f"no {kind} named {name!r} on this host; known: {known}")
