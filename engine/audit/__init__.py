"""The audit trail: who changed what on a node, from which entry point, and the outcome; chained and anchored."""
