"""fleetdeck: a terminal dashboard for on-prem GPU fleets serving small fine-tuned language models."""

__version__ = "0.1.0"
