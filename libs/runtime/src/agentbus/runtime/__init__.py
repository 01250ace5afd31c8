"""What every agentbus service shares: settings, logs, health and metrics, consumers, bootstrap, dead letters.

Import from the modules themselves (`agentbus.runtime.consumer`, `agentbus.runtime.logging`, ...): this package
imports nothing of its own, so a command that needs one part (the CLI needs the connection and the logging,
not the consumer runtime or the metrics server) does not pay for the rest at start-up.
"""
