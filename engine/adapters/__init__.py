"""LoRA adapters: the registry on disk, immutable versions, evaluation against a served model, promotion."""
