"""Small input/output helpers every engine package shares: a key's HTTP header, a log's tail, a plain-text table."""
