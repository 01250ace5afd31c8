"""Adapters of the exporter's ports: OTLP/HTTP, JSONL and the SQLite ledger."""
