"""What a restart asks for again, read from the record's typed placement (engine/managed.py): its local GPU
indices, or the Slurm allocation it asked for. A Slurm server's placement is a GPU count, not indices:
reading it as indices is what broke its restart after its stop had run.
"""

from __future__ import annotations

from engine.managed import LocalGpus, ManagedRecord, SlurmGpus
from fleet.protocol import SlurmAsk


def gpu_indices(rec: ManagedRecord) -> list[int]:
    """The local GPUs a record holds; none for a CPU or Slurm run."""
    return list(rec.gpus.indices) if isinstance(rec.gpus, LocalGpus) else []


def slurm_ask(rec: ManagedRecord) -> SlurmAsk | None:
    """What a Slurm run asked its Slurm for (a GPU count, the partition and time limit it was submitted
    with), so a restart asks the same; None for a run on local GPUs or CPU."""
    if not isinstance(rec.gpus, SlurmGpus):
        return None
    options = list(rec.slurm.options) if rec.slurm is not None else []
    opt = {k: v for k, _, v in (o.partition("=") for o in options if o.startswith("--"))}
    return SlurmAsk(gpus=rec.gpus.count, partition=opt.get("--partition"), time=opt.get("--time"))
