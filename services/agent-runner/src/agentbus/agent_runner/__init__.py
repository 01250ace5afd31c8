"""agent-runner: runs agent tasks as durable transitions over JetStream."""
