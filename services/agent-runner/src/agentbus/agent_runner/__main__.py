"""`python -m agentbus.agent_runner`: run the agent-runner until SIGTERM."""

from __future__ import annotations

from agentbus.agent_runner.app import create_app
from agentbus.agent_runner.settings import RunnerSettings
from agentbus.contracts.registry import Service
from agentbus.runtime.service import run_service


def main() -> None:
    run_service(Service.AGENT_RUNNER, lambda: create_app(RunnerSettings()))


if __name__ == "__main__":
    main()
