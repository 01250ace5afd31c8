# syntax=docker/dockerfile:1.7
# workflow-orchestrator, built from the repository root (the uv workspace):
#   docker build -f docker/workflow-orchestrator.Dockerfile -t agentbus/workflow-orchestrator .
# Only this service's package and its dependencies go into the image (uv sync --package), from the
# committed lock (--frozen), installed as wheels (--no-editable) so the source tree stays behind.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.9

FROM ${UV_IMAGE} AS uv

FROM ${PYTHON_IMAGE} AS build
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/opt/venv
WORKDIR /src
COPY pyproject.toml uv.lock ./
COPY contracts ./contracts
COPY libs ./libs
COPY services ./services
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-editable --package agentbus-workflow-orchestrator

FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 agentbus \
    && useradd --system --uid 10001 --gid agentbus --home-dir /app --no-create-home --shell /usr/sbin/nologin agentbus
COPY --from=build /opt/venv /opt/venv
# The repository's workflows and agent specs as defaults; Kubernetes mounts its ConfigMaps over these folders.
COPY workflows /app/workflows
COPY agents /app/agents
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    AGENTBUS_ORCHESTRATOR_HTTP_HOST=0.0.0.0 \
    AGENTBUS_ORCHESTRATOR_HTTP_PORT=8080 \
    AGENTBUS_ORCHESTRATOR_WORKFLOWS_DIR=/app/workflows \
    AGENTBUS_ORCHESTRATOR_AGENTS_DIR=/app/agents
WORKDIR /app
USER 10001:10001
EXPOSE 8080
# SIGTERM: stop pulling, drain in-flight messages for AGENTBUS_ORCHESTRATOR_DRAIN_TIMEOUT_SECONDS, exit.
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "agentbus.workflow_orchestrator"]
