"""The public document-ingestion contract."""

from __future__ import annotations

from typing import Any

from agentbus.contracts.common import BusMessage, Identifier
from pydantic import BaseModel, ConfigDict, Field


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
