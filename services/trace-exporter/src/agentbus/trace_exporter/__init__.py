"""trace-exporter: one trace per task from span events, to a JSONL file or Langfuse over OTLP/HTTP.

Every service publishes `SpanRecorded` events on `agentbus.spans.<service>`, several to a `SpanBatch` message
when they pile up (see `agentbus.runtime.spans`).
This service reads them with the durable consumer `trace-exporter-spans` and exports them in batches:

- by default appended to a local JSONL file (`AGENTBUS_TRACES_JSONL_PATH`, one span per line);
- with `AGENTBUS_TRACES_OTLP_ENDPOINT` (e.g. `http://langfuse:3000/api/public/otel`), POSTed to
  `<endpoint>/v1/traces` as gzip-compressed protobuf `ExportTraceServiceRequest`s with HTTP basic auth
  (`AGENTBUS_TRACES_LANGFUSE_PUBLIC_KEY` : `AGENTBUS_TRACES_LANGFUSE_SECRET_KEY`) and the header
  `x-langfuse-ingestion-version: 4`, without which Langfuse Cloud routes OTLP data onto a delayed path.

The trace of a task is the trace id its `traceparent` carries across every hop. Each exported span carries
Langfuse's attributes (see `domain.py`): the trace is named after the agent (`agentbus.agent`), its session
is the task id, its user the submitter (`agentbus.user`), its tags `tenant:<tenant>`; generations carry the
model, the truncated and redacted input and output, the token usage and the cost; tools, retrievals and
approval waits are observations of their own. Spans are exported as they arrive: OTLP lets a trace grow and
Langfuse merges spans and trace fields by trace id, so nothing waits for the task to end.

Cost of a generation: the runner, which learns each call's price from the cost-accountant, sets
`gen_ai.usage.cost` (USD) on the generation span; the exporter maps it to Langfuse's cost details. It is
optional: without it (no accountant, or the price not known yet) Langfuse shows usage without cost.

Delivery guarantees:

- Never lost while the backend is down. The handler of a span returns only once its batch is exported, so
  nothing is acked during an outage; the export is retried with exponential backoff capped at
  `AGENTBUS_TRACES_MAX_BACKOFF_SECONDS` (60 s), the consumer stops pulling once `2 x batch_size` spans are
  in flight, and the in-progress heartbeat keeps those from being redelivered meanwhile. Unread spans wait
  in the stream AGENTBUS_SPANS, which keeps them for 7 days or up to 1 GiB, whichever comes first (then the
  oldest are discarded): an outage shorter than that loses no span. The consumer's max_deliver (20 000)
  outlasts that retention, so an outage never dead-letters spans.
- Never exported twice, however many replicas run. Every replica keeps its ledger in one shared SQL
  database (`AGENTBUS_TRACES_DATABASE_URL`, PostgreSQL in a cluster; without it a SQLite file,
  `AGENTBUS_TRACES_LEDGER_PATH`, which exporters on one machine may share). Before exporting a batch, a
  replica claims its spans there (a lease of `AGENTBUS_TRACES_CLAIM_LEASE_SECONDS`, renewed before every
  retry); it exports only the spans it claimed, and records them as exported before any message is acked.
  A span exported before, by any replica, is acked without exporting (a lost ack, a restart, a redelivery
  to the other replica, a re-published span); a span another replica holds a live claim on waits, unacked,
  until that replica recorded it or its claim lapsed (a replica that died): then it is taken over. Ids are
  remembered for 8 days, longer than the stream keeps a span.
  What remains: an export request that the backend stored but whose answer never arrived (a timeout), or a
  replica killed between its export and its record, sends those spans again; Langfuse upserts observations
  by span id, so that repeat changes nothing there.
- Bad input is dead-lettered with its reason: a message that is not a valid span (`schema_violation`) or
  a span the backend refuses for good, e.g. HTTP 400/413 (`export_rejected`, found by exporting the
  refused batch span by span). Wrong keys (401/403) are retried, not dead-lettered: an operator fixes them.
"""
