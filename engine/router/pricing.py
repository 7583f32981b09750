"""What a request cost at the frontier model, and what the all-frontier counterfactual would cost.

Prices come from litellm's bundled price map (never fetched: LITELLM_LOCAL_MODEL_COST_MAP is set
before litellm is imported), or from the task's per-million-token overrides, which win.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from engine.router.config import Task


def import_litellm() -> Any:
    """The one place litellm is imported: air-gapped, quiet, no telemetry."""
    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    os.environ.setdefault("LITELLM_LOG", "ERROR")
    # Lazy on purpose: seconds to import, and only with the cost-map variable above set (else it tries the network).
    import litellm

    litellm.telemetry = False
    litellm.suppress_debug_info = True
    litellm.drop_params = True
    return litellm


@dataclass(frozen=True, slots=True)
class Price:
    input_per_token: float
    output_per_token: float
    source: str  # "config" | "litellm" | "unknown"

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return prompt_tokens * self.input_per_token + completion_tokens * self.output_per_token


def frontier_price(task: Task, litellm: Any | None) -> Price:
    if task.frontier_input_usd_per_mtok is not None or task.frontier_output_usd_per_mtok is not None:
        return Price((task.frontier_input_usd_per_mtok or 0) / 1e6, (task.frontier_output_usd_per_mtok or 0) / 1e6, "config")
    if task.frontier_model and litellm is not None:
        try:
            p, c = litellm.cost_per_token(model=task.frontier_model, prompt_tokens=1_000_000, completion_tokens=1_000_000)
            return Price(p / 1e6, c / 1e6, "litellm")
        except Exception:
            pass
    return Price(0.0, 0.0, "unknown")



CHARS_PER_TOKEN = 4  # OpenAI's rule of thumb for English text; an estimate is marked as one wherever it is kept
TOKENS_PER_MESSAGE = 4  # the chat format's own tokens around each message (role, separators)


def estimated_prompt_tokens(messages: Any, slm_usage: dict[str, Any]) -> int:
    """The prompt's tokens when the frontier never said (its usage did not come back): the small model's own
    count of the same prompt when it gave one (another tokenizer, but the same text), else the text's length
    at CHARS_PER_TOKEN. Never 0 for a request that has a message: the frontier bills a prompt it was sent."""
    counted = slm_usage.get("prompt_tokens")
    if isinstance(counted, int) and not isinstance(counted, bool) and counted > 0:
        return counted
    total = 3  # the reply's priming tokens
    for message in messages if isinstance(messages, list) else []:
        total += TOKENS_PER_MESSAGE + -(-len(_message_text(message)) // CHARS_PER_TOKEN)
    return total


def _message_text(message: Any) -> str:
    if not isinstance(message, dict):
        return ""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content
                       if isinstance(part, dict) and isinstance(part.get("text"), str))
    return ""
