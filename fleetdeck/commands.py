"""Subcommands beyond the dashboard: each module registers its parser and imports its work lazily."""

from __future__ import annotations

import argparse
from typing import Callable

Register = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]


def _registry() -> list[Register]:
    from fleetdeck import (cmd_adapters, cmd_audit, cmd_bundle, cmd_calibrate, cmd_finetune, cmd_fit, cmd_kill,
                           cmd_models, cmd_nodes, cmd_proxy, cmd_report, cmd_serve, cmd_slurm)

    return [cmd_fit.register, cmd_serve.register, cmd_finetune.register, cmd_proxy.register, cmd_report.register,
            cmd_calibrate.register, cmd_audit.register, cmd_adapters.register,
            cmd_slurm.register, cmd_kill.register, cmd_bundle.register, cmd_nodes.register, cmd_models.register]


REGISTRY: list[Register] = _registry()
