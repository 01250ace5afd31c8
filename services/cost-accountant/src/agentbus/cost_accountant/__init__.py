"""cost-accountant: one ledger for tokens, GPU-seconds and tool calls, with budgets enforced before each call."""
