"""Adapters of the gateway's ports: NATS, the identities and credentials files, HTTP probes, signed tokens."""
