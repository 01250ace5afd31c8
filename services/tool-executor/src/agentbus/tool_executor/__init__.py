"""tool-executor: executes tool calls exactly once, behind a durable human-approval inbox."""
