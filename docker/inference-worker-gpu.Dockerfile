# syntax=docker/dockerfile:1.7
# inference-worker with vLLM in its own process (AGENTBUS_WORKER_ENGINE=vllm), for NVIDIA GPU nodes:
#   docker build -f docker/inference-worker-gpu.Dockerfile -t agentbus/inference-worker-gpu .
# Everything comes from the committed lock, vLLM included: the worker's `gpu` extra pins vLLM 0.33 with the
# CUDA build of torch it requires (from its wheels: the host needs only the NVIDIA driver) and the numpy
# the whole workspace is tested with. Nothing is installed on top of the lock. Several GB; x86_64 only.

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
    uv sync --frozen --no-dev --no-editable --package agentbus-inference-worker --extra gpu
# The build log records what the image runs (the lock's versions).
RUN /opt/venv/bin/python -c "import importlib.metadata as m; print(*(f'{p}=={m.version(p)}' for p in ('vllm', 'torch', 'numpy')))"

FROM ${PYTHON_IMAGE}
# Triton compiles small launcher stubs with the system C compiler the first time a kernel runs.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 agentbus \
    && useradd --system --uid 10001 --gid agentbus --home-dir /app --no-create-home --shell /usr/sbin/nologin agentbus
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    AGENTBUS_WORKER_HTTP_HOST=0.0.0.0 \
    AGENTBUS_WORKER_HTTP_PORT=8080 \
    AGENTBUS_WORKER_ENGINE=vllm \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1
WORKDIR /app
USER 10001:10001
EXPOSE 8080
# SIGTERM: stop pulling, finish or abort in-flight generations within AGENTBUS_WORKER_DRAIN_TIMEOUT_SECONDS, exit.
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "agentbus.inference_worker"]
