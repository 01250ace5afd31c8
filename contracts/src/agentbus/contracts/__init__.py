"""agentbus wire contracts: the pydantic models of every message and the registry of where they travel."""

from agentbus.contracts.approvals import ApprovalDecision, ApprovalRequested, ApprovalResolved
from agentbus.contracts.common import (
    ID_PATTERN,
    SCHEMA_VERSION,
    BusMessage,
    ErrorInfo,
    HumanInput,
    Identifier,
    TokenUsage,
    utc_now,
)
from agentbus.contracts.deadletter import DeadLetter
from agentbus.contracts.llm import ChatMessage, LlmRequest, LlmResult, ToolCall, ToolSpec
from agentbus.contracts.rag import DocumentsIngest, IngestDocument
from agentbus.contracts.tasks import (
    TASK_EVENT_ADAPTER,
    TERMINAL_EVENT_KINDS,
    TaskAccepted,
    TaskApprovalPending,
    TaskApprovalResolved,
    TaskBudgetExceeded,
    TaskCancelled,
    TaskCancelRequested,
    TaskCompleted,
    TaskEvent,
    TaskFailed,
    TaskRejected,
    TaskStep,
    TaskSubmitted,
    TaskToken,
    ToolCallSummary,
)
from agentbus.contracts.usage import UsageRecorded

__all__ = [
    "ID_PATTERN",
    "SCHEMA_VERSION",
    "TASK_EVENT_ADAPTER",
    "TERMINAL_EVENT_KINDS",
    "ApprovalDecision",
    "ApprovalRequested",
    "ApprovalResolved",
    "BusMessage",
    "ChatMessage",
    "DeadLetter",
    "DocumentsIngest",
    "ErrorInfo",
    "HumanInput",
    "Identifier",
    "IngestDocument",
    "LlmRequest",
    "LlmResult",
    "TaskAccepted",
    "TaskApprovalPending",
    "TaskApprovalResolved",
    "TaskBudgetExceeded",
    "TaskCancelRequested",
    "TaskCancelled",
    "TaskCompleted",
    "TaskEvent",
    "TaskFailed",
    "TaskRejected",
    "TaskStep",
    "TaskSubmitted",
    "TaskToken",
    "TokenUsage",
    "ToolCall",
    "ToolCallSummary",
    "ToolSpec",
    "UsageRecorded",
    "utc_now",
]
