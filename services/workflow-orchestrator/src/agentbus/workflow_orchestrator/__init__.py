"""agentbus workflow-orchestrator: runs workflows, DAGs of agent tasks, as durable transitions over JetStream."""
