"""trace-exporter: one trace per task from span events, to a JSONL file or Langfuse over OTLP/HTTP."""
