"""The routing proxy: SLM first, confidence-based escalation to a frontier model, and the ledger."""
