"""The session contract: a submitter's conversations, listed, shown and deleted by request/reply.

A session is named by a submission's `session_id` and belongs to its tenant and its submitter: the subjects
name both (`agentbus.sessions.<op>.<tenant>.<submitter>`, the submitter bound by nats-server), so a
submitter reaches only its own sessions. The agent-runner answers.
"""

from __future__ import annotations

from datetime import datetime

from agentbus.contracts.common import BusMessage, ErrorInfo, Identifier
from agentbus.contracts.llm import ChatMessage
from pydantic import BaseModel, ConfigDict, Field

MAX_SESSIONS_LISTED = 1000


class SessionsListRequest(BusMessage):
    """List the requesting submitter's sessions in a tenant."""

    store: Identifier | None = Field(default=None, description="Only this memory store's sessions.")
    limit: int = Field(default=100, ge=1, le=MAX_SESSIONS_LISTED, description="Most sessions in the reply.")


class SessionInfo(BaseModel):
    """One session, without its history."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    session_id: Identifier
    store: Identifier = Field(description="The memory store (`memory/*.yaml`) that keeps it.")
    tenant: Identifier
    submitter: Identifier = Field(description="The submitter it belongs to.")
    created_at: datetime
    updated_at: datetime = Field(description="Its last change; it expires `ttl_seconds` of its store after this.")
    turns: int = Field(ge=0, description="Turns kept verbatim (a task's input and answer each).")
    summarized_turns: int = Field(ge=0, description="Older turns folded into the summary.")
    running: Identifier | None = Field(default=None, description="The task the session runs now.")
    waiting: list[Identifier] = Field(default_factory=list, description="Tasks waiting for it, first first.")


class SessionsListReply(BusMessage):
    sessions: list[SessionInfo] = Field(default_factory=list, description="Most recently changed first.")
    more: bool = Field(default=False, description="More sessions than `limit`.")
    error: ErrorInfo | None = None


class SessionTurnView(BaseModel):
    """A turn of a session: one task's input and answer (and, when its agent keeps them, its tool calls)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    task_id: Identifier
    at: datetime
    messages: list[ChatMessage]


class SessionDetail(SessionInfo):
    """A session with its history, as the next task of the session sees it."""

    summary: str | None = Field(
        default=None, description="What the summarized turns said, in the words of the store's model."
    )
    history: list[SessionTurnView] = Field(default_factory=list, description="The turns kept verbatim, oldest first.")


class SessionShowRequest(BusMessage):
    """Show one of the requesting submitter's sessions."""

    session_id: Identifier
    store: Identifier | None = Field(default=None, description="Only in this memory store; default: every store.")


class SessionShowReply(BusMessage):
    sessions: list[SessionDetail] = Field(
        default_factory=list, description="The session in each store that has it (one, unless agents share an id)."
    )
    error: ErrorInfo | None = None


class SessionDeleteRequest(BusMessage):
    """Forget one of the requesting submitter's sessions: its history and summary. Long-term memories stay."""

    session_id: Identifier
    store: Identifier | None = Field(default=None, description="Only in this memory store; default: every store.")


class SessionDeleteReply(BusMessage):
    deleted: list[Identifier] = Field(default_factory=list, description="The stores it was deleted from.")
    error: ErrorInfo | None = Field(
        default=None, description="`session_busy` while a task of the session runs or waits: nothing was deleted."
    )
