"""`python -m agentbus.trace_exporter`: run the trace-exporter until SIGTERM."""

from __future__ import annotations

from agentbus.contracts.registry import Service
from agentbus.runtime.service import run_service
from agentbus.trace_exporter.app import create_app
from agentbus.trace_exporter.settings import TraceExporterSettings


def main() -> None:
    run_service(Service.TRACE_EXPORTER, lambda: create_app(TraceExporterSettings()))


if __name__ == "__main__":
    main()
