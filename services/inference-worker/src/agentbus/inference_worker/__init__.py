"""inference-worker: serves LLM requests from per-model subjects."""
