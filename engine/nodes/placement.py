"""Where a record runs, read from the record: its GPU indices, or the Slurm allocation it asked for.

The one place that reads `ManagedRecord.gpus` ("0,1", "cpu", "slurm:N") for the node client, so that the
record's placement type (issue #27, item 2) replaces this file's body and nothing else. A Slurm server's
`gpus` is a count, not indices: `int()` over it is what broke its restart after its stop had run.
"""

from __future__ import annotations

from typing import Any

from fleet.protocol import SlurmAsk


def gpu_indices(rec: Any) -> list[int]:
    """The local GPUs a record holds; none for a CPU or Slurm run."""
    text = str(rec.gpus)
    if text == "cpu" or text.startswith("slurm:") or not text.strip():
        return []
    return [int(g) for g in text.split(",")]


def slurm_ask(rec: Any) -> SlurmAsk | None:
    """What a Slurm run asked its Slurm for (a GPU count, the partition and time limit it was submitted
    with), so a restart asks the same; None for a run on local GPUs or CPU."""
    text = str(rec.gpus)
    if not text.startswith("slurm:"):
        return None
    options = list(rec.slurm.options) if rec.slurm is not None else []
    opt = {k: v for k, _, v in (o.partition("=") for o in options if o.startswith("--"))}
    return SlurmAsk(gpus=int(text.split(":", 1)[1]), partition=opt.get("--partition"), time=opt.get("--time"))
