"""`python -m agentbus.inference_worker`: run the inference-worker until SIGTERM."""

from __future__ import annotations

from agentbus.contracts.registry import Service
from agentbus.inference_worker.app import create_app
from agentbus.inference_worker.settings import WorkerSettings
from agentbus.runtime.service import run_service


def main() -> None:
    run_service(Service.INFERENCE_WORKER, lambda: create_app(WorkerSettings()))


if __name__ == "__main__":
    main()
