"""A record's id as the screens show it: `@node:id` for a node over SSH, the bare id for this host.
Kept free of imports: the screens import it at load time."""

from __future__ import annotations


def split_id(shown: str) -> tuple[str | None, str]:
    """"@node:id" -> ("node", "id"); a local id -> (None, id)."""
    if shown.startswith("@") and ":" in shown:
        node, _, ident = shown[1:].partition(":")
        return node, ident
    return None, shown


def shown_id(node: str, ident: str) -> str:
    return f"@{node}:{ident}"
