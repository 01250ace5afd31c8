"""`python -m agentbus.tool_executor`: run the tool-executor until SIGTERM."""

from __future__ import annotations

from agentbus.contracts.registry import Service
from agentbus.runtime.service import run_service
from agentbus.tool_executor.app import create_app
from agentbus.tool_executor.settings import ExecutorSettings


def main() -> None:
    run_service(Service.TOOL_EXECUTOR, lambda: create_app(ExecutorSettings()))


if __name__ == "__main__":
    main()
