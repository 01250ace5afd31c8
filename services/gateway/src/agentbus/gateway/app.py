"""Composition root of the gateway: one ASGI application serving the console and the HTTP API, acting on
NATS as each logged-in identity's own user."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from agentbus.contracts import registry
from agentbus.gateway.adapters.budgets import load_budgets
from agentbus.gateway.adapters.identities import CredentialsFolder, FileDirectory, load_identities
from agentbus.gateway.adapters.nats_bus import NatsBus
from agentbus.gateway.adapters.probes import HttpServiceProbe
from agentbus.gateway.adapters.tokens import TokenSigner
from agentbus.gateway.domain import Budgets
from agentbus.gateway.handlers import api, console
from agentbus.gateway.handlers.auth import Context
from agentbus.gateway.handlers.errors import install_error_handlers
from agentbus.gateway.handlers.health import HttpMetrics, SecurityHeaders, health_router
from agentbus.gateway.ports import Directory, GatewayBus, ServiceProbe
from agentbus.gateway.service import GatewayService, Timeouts
from agentbus.gateway.settings import GatewaySettings
from agentbus.runtime.errors import ConfigurationError
from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from prometheus_client import CollectorRegistry
from starlette.middleware.sessions import SessionMiddleware

PACKAGE_DIR = Path(__file__).parent
SESSION_COOKIE = "agentbus_session"


def _version() -> str:
    try:
        return version("agentbus-gateway")
    except PackageNotFoundError:
        return "0"


def create_app(
    settings: GatewaySettings,
    *,
    bus: GatewayBus | None = None,
    directory: Directory | None = None,
    probe: ServiceProbe | None = None,
    budgets: Budgets | None = None,
) -> FastAPI:
    """Build the gateway. Nothing connects until the application starts (its lifespan)."""
    try:
        secret = settings.signing_secret()
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from exc
    credentials = CredentialsFolder(settings.credentials_dir)
    if directory is None:
        directory = FileDirectory(load_identities(settings.identities_file, settings.operators), credentials)
    if bus is None:
        consumers = registry.consumers(tuple(settings.models))
        bus = NatsBus(settings.nats_url, credentials, settings.request_timeout_seconds, consumers)
    service = GatewayService(
        bus,
        bus,
        bus,
        probe or HttpServiceProbe(settings.service_urls),
        budgets if budgets is not None else load_budgets(settings.budgets_file),
        Timeouts(
            submit_wait_seconds=settings.submit_wait_seconds,
            verdict_seconds=settings.verdict_timeout_seconds,
            catch_up_seconds=settings.catch_up_seconds,
        ),
    )
    started_bus = bus

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await started_bus.start(settings.nats_user, settings.nats_password)
        try:
            yield
        finally:
            await started_bus.close()

    app = FastAPI(
        title="agentbus gateway",
        version=_version(),
        description=(
            "Tasks and approvals of agentbus over HTTP. Every call acts on NATS as the caller's own NATS user "
            "(nats-server enforces its permissions) and maps onto the subjects of the wire contract; the "
            "gateway keeps no state. Authenticate with `Authorization: Bearer <token>` from `POST /v1/tokens`."
        ),
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.context = Context(
        service=service,
        directory=directory,
        tokens=TokenSigner(secret, settings.token_max_age_seconds),
        templates=Jinja2Templates(directory=PACKAGE_DIR / "templates"),
        trusted_user_header=settings.trusted_user_header,
    )
    metrics_registry = CollectorRegistry()
    app.include_router(api.router)
    app.include_router(console.router)
    app.include_router(health_router(lambda: started_bus.connected, metrics_registry))
    app.mount("/static", StaticFiles(directory=PACKAGE_DIR / "static"), name="static")
    install_error_handlers(app)
    app.add_middleware(
        SessionMiddleware,
        secret_key=secret,
        session_cookie=SESSION_COOKIE,
        max_age=settings.session_max_age_seconds,
        same_site="lax",
        https_only=settings.secure_cookies,
    )
    app.add_middleware(SecurityHeaders)
    app.add_middleware(HttpMetrics, registry=metrics_registry)
    return app
