"""`python -m agentbus.cost_accountant`: run the cost-accountant until SIGTERM."""

from __future__ import annotations

from agentbus.contracts.registry import Service
from agentbus.cost_accountant.app import create_app
from agentbus.cost_accountant.settings import AccountantSettings
from agentbus.runtime.service import run_service


def main() -> None:
    run_service(Service.COST_ACCOUNTANT, lambda: create_app(AccountantSettings()))


if __name__ == "__main__":
    main()
