"""The checks on each field of the agent protocol's request models (fleet/protocol.py): each says, in one
line that names the field, what the value must be. They run before pydantic's own type check, so a value
of the wrong kind gets this line and not pydantic's."""

from __future__ import annotations

import re
from typing import Annotated, Callable

from pydantic import BeforeValidator

# Matched whole (fullmatch): `$` also matches before a final newline, so "gpu\n" passed as a partition name.
_ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@:-]*")
_PARTITION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # never an option: it does not start with "-"


def text_of(what: str) -> Callable[[object], str]:
    def check(value: object) -> str:
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{what} must be a non-empty string, got {value!r}")
        return value
    return check


def gpu_list(value: object) -> list[int]:
    if (not isinstance(value, list) or not value or len(value) > 64
            or not all(isinstance(g, int) and not isinstance(g, bool) and 0 <= g < 1024 for g in value)
            or len(set(value)) != len(value)):
        raise ValueError(f"gpus must be a list of distinct GPU indices, got {value!r}")
    return list(value)


def port(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1024 <= value <= 65535:
        raise ValueError(f"port must be from 1024 to 65535, got {value!r}")
    return value


def flag(what: str) -> Callable[[object], bool]:
    def check(value: object) -> bool:
        if not isinstance(value, bool):  # "yes" or 1 is not a yes to forcing past a refusal
            raise ValueError(f"{what} must be true or false, got {value!r}")
        return value
    return check


def adapter_name(what: str) -> Callable[[object], str]:
    def check(value: object) -> str:
        if not isinstance(value, str) or not _ADAPTER_NAME.fullmatch(value):
            raise ValueError(f"{what} must be an adapter name, got {value!r}")
        return value
    return check


def line_count(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 10_000:
        raise ValueError(f"n must be a line count from 1 to 10000, got {value!r}")
    return value


def slurm_gpus(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 64:
        raise ValueError(f"slurm.gpus must be a count 1-64, got {value!r}")
    return value


def partition(value: object) -> str:
    if not isinstance(value, str) or not _PARTITION.fullmatch(value):
        raise ValueError(f"slurm.partition must be a partition name, got {value!r}")
    return value


def log_kind(value: object) -> str:
    if value not in ("server", "job"):
        raise ValueError(f"kind must be 'server' or 'job', got {value!r}")
    return str(value)


Ident = Annotated[str, BeforeValidator(text_of("id"))]  # a server's or job's id in the node's store
ServerId = Annotated[str, BeforeValidator(text_of("server"))]
GpuList = Annotated[list[int], BeforeValidator(gpu_list)]
Port = Annotated[int, BeforeValidator(port)]
Force = Annotated[bool, BeforeValidator(flag("force"))]
ProfileName = Annotated[str, BeforeValidator(text_of("profile"))]  # a profile in the node's own folders
SpecName = Annotated[str, BeforeValidator(text_of("spec"))]  # a job spec in the node's own folders
ModelName = Annotated[str, BeforeValidator(text_of("model"))]  # one of the node's list_models
AdapterRef = Annotated[str, BeforeValidator(text_of("adapter"))]  # a name in the node's adapter roots
ServedAs = Annotated[str, BeforeValidator(adapter_name("name"))]  # the name an adapter is served under
OldAdapter = Annotated[str, BeforeValidator(adapter_name("old"))]  # the loaded adapter a swap replaces
LineCount = Annotated[int, BeforeValidator(line_count)]
LogKind = Annotated[str, BeforeValidator(log_kind)]
SlurmGpus = Annotated[int, BeforeValidator(slurm_gpus)]
Partition = Annotated[str, BeforeValidator(partition)]
SlurmTime = Annotated[str, BeforeValidator(text_of("slurm.time"))]  # its form is checked by the node (engine/slurm/client.py)
