# syntax=docker/dockerfile:1.7
# gateway, built from the repository root (the uv workspace):
#   docker build -f docker/gateway.Dockerfile -t agentbus/gateway .
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
    uv sync --frozen --no-dev --no-editable --package agentbus-gateway

FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 agentbus \
    && useradd --system --uid 10001 --gid agentbus --home-dir /app --no-create-home --shell /usr/sbin/nologin agentbus
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    AGENTBUS_GATEWAY_HTTP_HOST=0.0.0.0 \
    AGENTBUS_GATEWAY_HTTP_PORT=8080
WORKDIR /app
USER 10001:10001
EXPOSE 8080
# SIGTERM: stop accepting, give open event streams a few seconds (clients resume elsewhere), exit.
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "agentbus.gateway"]
