"""What each NATS user may publish and subscribe to, derived from the registry so that it cannot drift.

`SERVICE_ACCESS` is the one table of what every service consumes, produces, asks and answers; the
permissions of each service user are computed from it and from the registry's consumer specs. People
and applications get narrower rights: a submitter submits, cancels and ingests only on its own token of
its tenants' subjects, follows those tenants' task events live (core subscriptions) and asks the runner
for a task's stored events and for its own sessions; an approver follows its tenants' approvals live,
asks the executor for the pending ones, publishes decisions only on its own token and hears the verdict
on its own decisions.

No person or application may use the JetStream API at all. Creating any consumer would let it name a
push consumer's deliver subject, which nats-server does not check against the creator's permissions
(nats-io/nats-server#8274): the server would then publish stored messages, on the creator's behalf, to a
subject the creator may not publish to (another identity's decision subject, a KV key). Replays are
therefore request/reply on subjects that name the tenant, which permissions can bind.

Every restricted user receives replies only under its own inbox prefix (`inbox_prefix_for`), so none can
read what the server delivers to another: consumer messages, acks, request replies.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from agentbus.cli.identities import (
    ADMIN_USER,
    CredentialStore,
    Identities,
    approver_user,
    service_user,
    submitter_user,
)
from agentbus.contracts import registry
from agentbus.contracts.registry import (
    ACCOUNTANT_USAGE,
    APPROVAL_DECISION,
    APPROVAL_PENDING,
    APPROVAL_RESOLVED,
    APPROVAL_VERDICT,
    APPROVALS_LIST,
    BUDGET_ALERT,
    BUDGET_RELEASE,
    BUDGET_RESERVE,
    COST_REPORT,
    DEAD_LETTER,
    EXECUTOR_CALLS,
    EXECUTOR_DECISIONS,
    EXECUTOR_WITHDRAWALS,
    LLM_ABORT,
    LLM_REQUEST,
    LLM_RESULT,
    ORCHESTRATOR_ADMISSIONS,
    ORCHESTRATOR_CANCELLATIONS,
    ORCHESTRATOR_SUBMISSIONS,
    ORCHESTRATOR_TASK_EVENTS,
    ORCHESTRATOR_TIMERS,
    RAG_DELETE_DOCUMENTS,
    RAG_INGEST_DOCUMENTS,
    RAG_SEARCH,
    RATE_LIMITS,
    RETRIEVER_DELETES,
    RETRIEVER_INGEST,
    RUN_SCHEDULE,
    RUNNER_CANCELLATIONS,
    RUNNER_DEAD_LETTERS,
    RUNNER_LLM_RESULTS,
    RUNNER_SUBMISSIONS,
    RUNNER_TIMERS,
    RUNNER_TOOL_UPDATES,
    RUNS,
    SESSION_DELETE,
    SESSION_SHOW,
    SESSIONS,
    SESSIONS_LIST,
    SPAN,
    TASK_CANCEL,
    TASK_COST,
    TASK_EVENT,
    TASK_EVENTS,
    TASK_REPLAY,
    TASK_SUBMIT,
    TOOL_CALL,
    TOOL_UPDATE,
    TOOL_WITHDRAW,
    TRACE_EXPORTER_SPANS,
    USAGE_RECORDED,
    WORKFLOW_ADMISSION,
    WORKFLOW_CANCEL,
    WORKFLOW_EVENT,
    WORKFLOW_EVENTS,
    WORKFLOW_REPLAY,
    WORKFLOW_RUNS,
    WORKFLOW_SCHEDULE,
    WORKFLOW_SUBMIT,
    WORKFLOWS_LIST,
    ConsumerSpec,
    KeyValueSpec,
    Service,
    StreamSpec,
    SubjectSpec,
)
from agentbus.runtime.connection import inbox_prefix_for
from agentbus.runtime.server import NatsPermissions, NatsUser

JS_API = "$JS.API"
JS_ACK = "$JS.ACK"
JS_FLOW_CONTROL = "$JS.FC"


@dataclass(frozen=True)
class ServiceAccess:
    """What one service does on the bus.

    consumes: its durable consumers; `consumes_models` adds one inference consumer per served model.
    publishes: subjects it publishes to (JetStream or core notices). requests: request/reply subjects it
    asks. answers: request/reply subjects it serves. listens: core notices it subscribes to. reads:
    streams it looks into (stored messages by sequence or subject, its own ephemeral replays). buckets:
    KV buckets it reads and writes. inspects_consumers: reads the state (pending, ack-pending) of every
    durable consumer, and nothing else of them.
    """

    service: Service
    consumes: tuple[ConsumerSpec, ...] = ()
    consumes_models: bool = False
    publishes: tuple[SubjectSpec, ...] = ()
    requests: tuple[SubjectSpec, ...] = ()
    answers: tuple[SubjectSpec, ...] = ()
    listens: tuple[SubjectSpec, ...] = ()
    reads: tuple[StreamSpec, ...] = ()
    buckets: tuple[KeyValueSpec, ...] = field(default=())
    inspects_consumers: bool = False

    def consumers(self, models: tuple[str, ...]) -> tuple[ConsumerSpec, ...]:
        """Its durable consumers in a deployment that serves `models`."""
        per_model = tuple(registry.inference_consumer(m) for m in models) if self.consumes_models else ()
        return self.consumes + per_model


SERVICE_ACCESS: tuple[ServiceAccess, ...] = (
    ServiceAccess(
        Service.AGENT_RUNNER,
        consumes=(
            RUNNER_SUBMISSIONS,
            RUNNER_CANCELLATIONS,
            RUNNER_LLM_RESULTS,
            RUNNER_TOOL_UPDATES,
            RUNNER_TIMERS,
            RUNNER_DEAD_LETTERS,
        ),
        # A remember is ingested on the task's submitter's subject, as if they had ingested the fact.
        publishes=(
            TASK_EVENT,
            LLM_REQUEST,
            TOOL_CALL,
            TOOL_WITHDRAW,
            RUN_SCHEDULE,
            LLM_ABORT,
            SPAN,
            RAG_INGEST_DOCUMENTS,
        ),
        requests=(BUDGET_RESERVE, BUDGET_RELEASE, TASK_COST, RAG_SEARCH),
        # Replays of a task's stored events, and each submitter's own sessions (list, show, delete).
        answers=(TASK_REPLAY, SESSIONS_LIST, SESSION_SHOW, SESSION_DELETE),
        reads=(TASK_EVENTS,),
        buckets=(RUNS, SESSIONS),
    ),
    ServiceAccess(
        Service.INFERENCE_WORKER,
        consumes_models=True,
        publishes=(LLM_RESULT, USAGE_RECORDED, TASK_EVENT, SPAN),
        listens=(LLM_ABORT,),
        # A redelivered request resumes its token stream from the chunks already in the task's events.
        reads=(TASK_EVENTS,),
    ),
    ServiceAccess(
        Service.TOOL_EXECUTOR,
        consumes=(EXECUTOR_CALLS, EXECUTOR_WITHDRAWALS, EXECUTOR_DECISIONS),
        publishes=(TOOL_UPDATE, APPROVAL_PENDING, APPROVAL_RESOLVED, APPROVAL_VERDICT, USAGE_RECORDED, SPAN),
        requests=(RAG_SEARCH,),
        answers=(APPROVALS_LIST,),
    ),
    ServiceAccess(
        Service.RETRIEVER,
        consumes=(RETRIEVER_INGEST, RETRIEVER_DELETES),
        publishes=(USAGE_RECORDED, SPAN),
        answers=(RAG_SEARCH,),
    ),
    ServiceAccess(
        Service.COST_ACCOUNTANT,
        consumes=ACCOUNTANT_USAGE,
        publishes=(BUDGET_ALERT, SPAN),
        answers=(BUDGET_RESERVE, BUDGET_RELEASE, TASK_COST, COST_REPORT, RATE_LIMITS),
    ),
    ServiceAccess(Service.TRACE_EXPORTER, consumes=(TRACE_EXPORTER_SPANS,)),
    # The gateway acts for people as their own users; as itself it only reads what the operator pages show.
    ServiceAccess(Service.GATEWAY, requests=(COST_REPORT,), inspects_consumers=True),
    ServiceAccess(
        Service.WORKFLOW_ORCHESTRATOR,
        consumes=(
            ORCHESTRATOR_SUBMISSIONS,
            ORCHESTRATOR_CANCELLATIONS,
            ORCHESTRATOR_TASK_EVENTS,
            ORCHESTRATOR_TIMERS,
            ORCHESTRATOR_ADMISSIONS,
        ),
        # Each step is an ordinary task, submitted (and cancelled) as the run's submitter: the one service that
        # publishes on submitters' subjects, for identities the server bound on the workflow's own subjects.
        publishes=(WORKFLOW_EVENT, TASK_SUBMIT, TASK_CANCEL, WORKFLOW_SCHEDULE, WORKFLOW_ADMISSION, SPAN),
        answers=(WORKFLOW_REPLAY, WORKFLOWS_LIST),
        reads=(WORKFLOW_EVENTS,),
        buckets=(WORKFLOW_RUNS,),
    ),
)


def access_of(service: Service) -> ServiceAccess:
    """The table row of `service`."""
    return next(access for access in SERVICE_ACCESS if access.service == service)


def _inbox(user: str) -> str:
    return f"{inbox_prefix_for(user)}.>"


def _consumer_publish(spec: ConsumerSpec) -> tuple[str, ...]:
    """Pull from one durable, ack its messages (ack, nak, in-progress, term), read its info and the
    stored message it was handed, dead-letter."""
    return (
        f"{JS_API}.CONSUMER.MSG.NEXT.{spec.stream}.{spec.durable}",
        f"{JS_API}.CONSUMER.INFO.{spec.stream}.{spec.durable}",
        f"{JS_API}.STREAM.INFO.{spec.stream}",
        f"{JS_API}.STREAM.MSG.GET.{spec.stream}",
        f"{JS_ACK}.{spec.stream}.{spec.durable}.>",
        DEAD_LETTER.format(stream=spec.stream, consumer=spec.durable),
    )


def _stream_read_publish(spec: StreamSpec) -> tuple[str, ...]:
    """Look into a stream as a trusted service: get stored messages, run ephemeral (ordered) consumers."""
    return (
        f"{JS_API}.STREAM.NAMES",
        f"{JS_API}.STREAM.INFO.{spec.name}",
        f"{JS_API}.STREAM.MSG.GET.{spec.name}",
        f"{JS_API}.DIRECT.GET.{spec.name}",
        f"{JS_API}.DIRECT.GET.{spec.name}.>",
        f"{JS_API}.CONSUMER.CREATE.{spec.name}",
        f"{JS_API}.CONSUMER.CREATE.{spec.name}.>",
        f"{JS_API}.CONSUMER.INFO.{spec.name}.*",
        f"{JS_API}.CONSUMER.DELETE.{spec.name}.*",
        f"{JS_API}.CONSUMER.MSG.NEXT.{spec.name}.*",
        f"{JS_FLOW_CONTROL}.{spec.name}.>",
    )


def _bucket_publish(spec: KeyValueSpec) -> tuple[str, ...]:
    """Bind to a KV bucket, read keys (direct or through the stream) and write them."""
    stream = f"KV_{spec.bucket}"
    return (
        f"{JS_API}.STREAM.INFO.{stream}",
        f"{JS_API}.STREAM.MSG.GET.{stream}",
        f"{JS_API}.DIRECT.GET.{stream}.>",
        f"$KV.{spec.bucket}.>",
    )


def _unique(subjects: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(subjects))


def service_permissions(service: Service, models: tuple[str, ...] = registry.DEFAULT_MODELS) -> NatsPermissions:
    """The permissions of a service's user, from its row of `SERVICE_ACCESS`."""
    access = access_of(service)
    user = service_user(service)
    publish: list[str] = []
    for consumer in access.consumers(models):
        publish += _consumer_publish(consumer)
    publish += [spec.wildcard for spec in (*access.publishes, *access.requests)]
    for stream in access.reads:
        publish += _stream_read_publish(stream)
    for bucket in access.buckets:
        publish += _bucket_publish(bucket)
    if access.inspects_consumers:
        publish += [f"{JS_API}.CONSUMER.INFO.{spec.stream}.{spec.durable}" for spec in registry.consumers(models)]
    subscribe = [_inbox(user)] + [spec.wildcard for spec in (*access.answers, *access.listens)]
    return NatsPermissions(publish=_unique(publish), subscribe=_unique(subscribe), allow_responses=bool(access.answers))


def submitter_permissions(submitter: str, tenants: Iterable[str]) -> NatsPermissions:
    """Submit, cancel and ingest as `submitter` for `tenants` (tasks and workflow runs); follow and replay those
    tenants' task and workflow events; list their workflows; list, show and delete its own sessions."""
    publish: list[str] = []
    subscribe = [_inbox(submitter_user(submitter))]
    for tenant in tenants:
        publish += [
            TASK_SUBMIT.format(tenant=tenant, submitter=submitter),
            TASK_CANCEL.format(tenant=tenant, submitter=submitter),
            RAG_INGEST_DOCUMENTS.format(tenant=tenant, submitter=submitter),
            RAG_DELETE_DOCUMENTS.format(tenant=tenant, submitter=submitter),
            TASK_REPLAY.pattern.format(tenant=tenant, task_id="*"),
            RAG_SEARCH.format(tenant=tenant),
            WORKFLOW_SUBMIT.format(tenant=tenant, submitter=submitter),
            WORKFLOW_CANCEL.format(tenant=tenant, submitter=submitter),
            WORKFLOW_REPLAY.pattern.format(tenant=tenant, run_id="*"),
            WORKFLOWS_LIST.format(tenant=tenant),
            SESSIONS_LIST.format(tenant=tenant, submitter=submitter),
            SESSION_SHOW.format(tenant=tenant, submitter=submitter),
            SESSION_DELETE.format(tenant=tenant, submitter=submitter),
        ]
        subscribe += [
            TASK_EVENT.pattern.format(tenant=tenant, task_id="*"),
            WORKFLOW_EVENT.pattern.format(tenant=tenant, run_id="*"),
        ]
    return NatsPermissions(publish=_unique(publish), subscribe=_unique(subscribe))


def approver_permissions(approver: str, tenants: Iterable[str]) -> NatsPermissions:
    """Follow and list `tenants`' approvals; publish decisions only on the approver's own token and hear the
    executor's verdict on them."""
    publish: list[str] = []
    subscribe = [_inbox(approver_user(approver))]
    for tenant in tenants:
        publish += [
            APPROVAL_DECISION.format(tenant=tenant, approver=approver),
            APPROVALS_LIST.format(tenant=tenant),
        ]
        subscribe += [
            APPROVAL_PENDING.format(tenant=tenant),
            APPROVAL_RESOLVED.format(tenant=tenant),
            APPROVAL_VERDICT.format(tenant=tenant, approver=approver),
        ]
    return NatsPermissions(publish=_unique(publish), subscribe=_unique(subscribe))


def nats_users(
    identities: Identities, credentials: CredentialStore, models: tuple[str, ...] = registry.DEFAULT_MODELS
) -> tuple[NatsUser, ...]:
    """Every user of the server: admin, each service, each submitter and approver; missing passwords are made."""

    def user(name: str, permissions: NatsPermissions | None) -> NatsUser:
        return NatsUser(name, credentials.ensure(name).password, permissions)

    users = [user(ADMIN_USER, None)]
    users += [user(service_user(a.service), service_permissions(a.service, models)) for a in SERVICE_ACCESS]
    users += [
        user(submitter_user(name), submitter_permissions(name, tenants))
        for name, tenants in identities.submitters().items()
    ]
    users += [
        user(approver_user(name), approver_permissions(name, tenants))
        for name, tenants in identities.approvers().items()
    ]
    return tuple(users)
