"""The document-ingestion contract (public) and the retrieval request/reply (internal)."""

from __future__ import annotations

from typing import Any, Literal

from agentbus.contracts.common import BusMessage, ErrorInfo, Identifier
from pydantic import BaseModel, ConfigDict, Field

MAX_TOP_K = 50


class IngestDocument(BaseModel):
    """One document to upsert into a tenant's knowledge base."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    id: str = Field(min_length=1, max_length=256, description="Document id; re-ingesting it replaces it.")
    text: str = Field(description="The document's UTF-8 text.")
    metadata: dict[str, Any] = Field(default_factory=dict, description="Filterable metadata.")


class DocumentsIngest(BusMessage):
    """Upsert documents into a tenant's knowledge base, by document id."""

    tenant: Identifier
    documents: list[IngestDocument] = Field(min_length=1)


class DocumentsDelete(BusMessage):
    """Delete documents, with all their chunks, from a tenant's knowledge base."""

    tenant: Identifier
    document_ids: list[str] = Field(min_length=1, description="Ids of the documents to delete.")


class MetadataFilter(BaseModel):
    """One structured condition on a chunk's metadata. Filters are built from these, never from strings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    field: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$", description="Metadata key.")
    op: Literal["eq", "ne", "gt", "gte", "lt", "lte", "in"] = "eq"
    value: str | int | float | bool | list[str | int | float | bool]


class SearchRequest(BusMessage):
    """Search a tenant's knowledge base (request/reply)."""

    tenant: Identifier
    query: str = Field(min_length=1, max_length=4000, description="What to look for; must not be blank.")
    top_k: int = Field(default=5, ge=1, le=MAX_TOP_K, description=f"How many chunks to return, 1 to {MAX_TOP_K}.")
    filters: list[MetadataFilter] = Field(default_factory=list, description="All must hold (AND).")
    mode: Literal["hybrid", "dense", "bm25"] = "hybrid"
    request_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=150,
        description="Caller's id of this search (e.g. the tool-call id); when set, the search is billed once per id.",
    )
    task_id: Identifier | None = Field(default=None, description="The task searching, for usage and traces.")


class RetrievedChunk(BaseModel):
    """A chunk that matched a search: what it says and where it comes from (a citation)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    document_id: str
    chunk_index: int = Field(ge=0)
    text: str
    score: float
    metadata: dict[str, Any] = Field(default_factory=dict)


class SearchReply(BusMessage):
    """The answer to a SearchRequest: chunks best first, or an error."""

    chunks: list[RetrievedChunk] = Field(default_factory=list)
    error: ErrorInfo | None = None
    usage_id: str | None = Field(
        default=None, description="The usage record this search was billed with (published before the reply)."
    )
