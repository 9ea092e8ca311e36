# The platform's one image: Ray head and workers (with the Serve app), MLflow server, dispatcher, UI.
# Built by compose.yaml (`build: .`); every service runs it with its own command.
#
#   docker build --build-arg GIT_COMMIT="$(git rev-parse HEAD)" -t ray-cluster-platform .
#
# Dependencies come from pyproject.toml, pinned by requirements.lock (the same pins as `make venv`);
# torch is the CPU build from PyTorch's own index. The source is copied last, so a code change
# rebuilds only the final layers.

ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

# --- builder: a virtual environment with every runtime dependency ------------------------------
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

# A compiler for any dependency without a wheel for this platform; it stays in this stage.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /build
COPY pyproject.toml requirements.lock ./

# torch alone (--no-deps) from PyTorch's CPU index: no CUDA libraries, the version the lock pins.
# Then the runtime dependencies of pyproject.toml (not the dev extras), torch's own included, from
# PyPI under the same constraints; pip check proves the result consistent.
RUN pip install --no-deps --index-url https://download.pytorch.org/whl/cpu -c requirements.lock torch \
    && python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > requirements.txt \
    && pip install -c requirements.lock -r requirements.txt \
    && pip check \
    && python -c "import torch; assert torch.__version__.endswith('+cpu'), torch.__version__"

# --- runtime ------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

ARG GIT_COMMIT=unknown
LABEL org.opencontainers.image.title="ray-cluster-platform" \
      org.opencontainers.image.description="Ray training and serving platform: Ray head and workers, Serve app, MLflow server, dispatcher, UI" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.revision="${GIT_COMMIT}" \
      org.opencontainers.image.base.name="python:3.11.13-slim-bookworm"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    GIT_COMMIT=${GIT_COMMIT} \
    STATE_DIR=/home/ray/state \
    RAY_USAGE_STATS_ENABLED=0

# A fixed uid (1000) so that named volumes keep the same owner across rebuilds. /tmp/ray is Ray's
# session directory; a named volume mounted there starts out owned by this user.
RUN groupadd --gid 1000 ray \
    && useradd --uid 1000 --gid 1000 --create-home --shell /bin/bash ray \
    && mkdir -p /tmp/ray /home/ray/state \
    && chown ray:ray /tmp/ray /home/ray/state

COPY --from=builder /opt/venv /opt/venv

WORKDIR /app
# Owned by root and not writable by the service user; .dockerignore keeps out state, secrets, .git.
COPY . /app

# `ray`, numerically: a runtime can check that the user is not root without reading /etc/passwd.
USER 1000:1000

# Ray GCS, client server, dashboard and Jobs API, dashboard agent, metrics; Serve's HTTP proxy;
# MLflow; the UI; the dispatcher's metrics.
EXPOSE 6380 10001 8265 52365 8090 8000 5000 7860 9102

# Compose gives each service its command; alone, the image runs a Ray head with the Serve app.
CMD ["bash", "/app/cluster/ray/head.sh"]
