"""`fleetdeck demo`: its own folder apart from the operator's, and the helper processes that end with its dashboard."""
