"""agentbus gateway: the web console of approvers and operators, and an HTTP API for clients that do not speak NATS."""
