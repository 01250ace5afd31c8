-- Langfuse (compose profile "langfuse") keeps its data in its own database beside agentbus's.
CREATE DATABASE langfuse;
