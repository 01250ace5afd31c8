"""Adapters of the tool-executor's ports: SQL store, JetStream publisher, tool runners and the sandbox."""
