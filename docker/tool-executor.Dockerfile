# syntax=docker/dockerfile:1.7
# tool-executor, built from the repository root (the uv workspace):
#   docker build -f docker/tool-executor.Dockerfile -t agentbus/tool-executor .
# Only this service's package and its dependencies go into the image (uv sync --package), from the
# committed lock (--frozen), installed as wheels (--no-editable) so the source tree stays behind.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.9
# tools/kubectl_apply.yaml runs kubectl (offline it validates manifests with `kubectl label --local`).
ARG KUBECTL_VERSION=v1.33.5

FROM ${UV_IMAGE} AS uv

FROM ${PYTHON_IMAGE} AS kubectl
ARG KUBECTL_VERSION
ARG TARGETARCH=amd64
ADD https://dl.k8s.io/release/${KUBECTL_VERSION}/bin/linux/${TARGETARCH}/kubectl /kubectl
ADD https://dl.k8s.io/release/${KUBECTL_VERSION}/bin/linux/${TARGETARCH}/kubectl.sha256 /kubectl.sha256
RUN echo "$(cat /kubectl.sha256)  /kubectl" | sha256sum --check --strict && chmod 0755 /kubectl

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
    uv sync --frozen --no-dev --no-editable --package agentbus-tool-executor

FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 agentbus \
    && useradd --system --uid 10001 --gid agentbus --home-dir /app --no-create-home --shell /usr/sbin/nologin agentbus
COPY --from=build /opt/venv /opt/venv
COPY --from=kubectl /kubectl /usr/local/bin/kubectl
# The repository's tool specs and approvers as defaults (tools/, config/ relative to /app); Kubernetes
# mounts its ConfigMaps and points AGENTBUS_EXECUTOR_TOOLS_DIR and _APPROVERS_FILE at them.
COPY tools /app/tools
COPY config/approvers.yaml /app/config/approvers.yaml
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    AGENTBUS_EXECUTOR_HTTP_HOST=0.0.0.0 \
    AGENTBUS_EXECUTOR_HTTP_PORT=8080
WORKDIR /app
USER 10001:10001
EXPOSE 8080
# SIGTERM: stop pulling, drain in-flight executions and approvals for AGENTBUS_EXECUTOR_DRAIN_TIMEOUT_SECONDS, exit.
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "agentbus.tool_executor"]
