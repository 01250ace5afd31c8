"""retriever: tenant-isolated hybrid search and ingestion over Milvus."""
