"""Adapters of the exporter's ports: OTLP/HTTP, JSONL and the SQL ledger shared by replicas."""
