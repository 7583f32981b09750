"""What runs on the GPUs and in front of them: planner, vLLM servers, adapters, fine-tunes, router."""
