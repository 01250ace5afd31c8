"""What every agentbus service shares: settings, logs, health and metrics, consumers, bootstrap, dead letters."""

from agentbus.runtime.bootstrap import AppliedChange, apply_topology
from agentbus.runtime.connection import connect_nats, connect_service
from agentbus.runtime.consumer import AckPolicy, ConsumerRunner, Delivery, Handler
from agentbus.runtime.errors import RetryableError, TerminalError
from agentbus.runtime.logging import bind_message_context, configure_logging, get_logger
from agentbus.runtime.metrics import ConsumerMetrics
from agentbus.runtime.publishing import publish_message
from agentbus.runtime.server import NatsServerProcess, find_nats_server, free_port
from agentbus.runtime.service import BusService, run_service, serve
from agentbus.runtime.settings import ServiceSettings
from agentbus.runtime.tracing import TraceContext

__all__ = [
    "AckPolicy",
    "AppliedChange",
    "BusService",
    "ConsumerMetrics",
    "ConsumerRunner",
    "Delivery",
    "Handler",
    "NatsServerProcess",
    "RetryableError",
    "ServiceSettings",
    "TerminalError",
    "TraceContext",
    "apply_topology",
    "bind_message_context",
    "configure_logging",
    "connect_nats",
    "connect_service",
    "find_nats_server",
    "free_port",
    "get_logger",
    "publish_message",
    "run_service",
    "serve",
]
