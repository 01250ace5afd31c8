"""`python -m agentbus.workflow_orchestrator`: run the workflow-orchestrator until SIGTERM."""

from __future__ import annotations

from agentbus.contracts.registry import Service
from agentbus.runtime.service import run_service
from agentbus.workflow_orchestrator.app import create_app
from agentbus.workflow_orchestrator.settings import OrchestratorSettings


def main() -> None:
    run_service(Service.WORKFLOW_ORCHESTRATOR, lambda: create_app(OrchestratorSettings()))


if __name__ == "__main__":
    main()
