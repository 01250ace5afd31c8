-- One database per service that keeps a ledger, each with its own tables and migrations
-- (TOOL_EXECUTOR_DATABASE_URL, COST_ACCOUNTANT_DATABASE_URL and TRACE_EXPORTER_DATABASE_URL in the Secret
-- agentbus-postgres name them). Runs once, when the server initialises an empty volume, as POSTGRES_USER (who
-- then owns them); on a volume initialised before, create the missing ones by hand.
CREATE DATABASE tool_executor;
CREATE DATABASE cost_accountant;
CREATE DATABASE trace_exporter;
