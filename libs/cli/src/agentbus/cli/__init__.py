"""The agentbus command line."""
