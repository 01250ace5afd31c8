-- One database per service that keeps a ledger (as in Kubernetes: deploy/kustomize/base/postgres/initdb).
CREATE DATABASE tool_executor;
CREATE DATABASE cost_accountant;
CREATE DATABASE trace_exporter;
