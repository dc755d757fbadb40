# announcer: the sidekick image. Multi-stage: announcer and its drivers are installed into a
# venv in the first stage, and only that venv is copied into the second (no compiler, no pip,
# no cache). A venv serves any Debian-based Python image: the official python:3.11-slim, or a
# bookworm image with Debian's python3, python3-venv and python3-pip, whose pip refuses
# system-wide installs.
#   podman build --format docker -t announcer .        (or docker build -t announcer .)
#   podman run --rm --network host announcer --service web --port 8080
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
RUN python3 -m venv /opt/announcer
# What ships is pinned: every dependency from the lock, with its hash (scripts/lock.sh makes
# requirements/image.txt from pyproject.toml, and a test holds the two together); then the
# checkout itself, with nothing more.
COPY requirements/image.txt ./requirements/image.txt
RUN /opt/announcer/bin/pip install --no-cache-dir --require-hashes -r requirements/image.txt
COPY pyproject.toml README.md ./
COPY announcer ./announcer
COPY man ./man
# DL3013 (pin versions): this installs the checkout itself, whose dependencies are all in place.
# hadolint ignore=DL3013
RUN /opt/announcer/bin/pip install --no-cache-dir --no-deps . \
    && /opt/announcer/bin/pip uninstall --yes pip

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="announcer" \
      org.opencontainers.image.description="Keeps a healthy service's record in etcd under a lease" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/announcer /opt/announcer
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin announcer
# Numeric, so the host resolves it without the image's /etc/passwd.
USER 10001
# JSON log lines for `docker logs`. The metrics/health endpoint binds a free loopback port
# (with host networking, sidekicks on one host need no port plan) and writes its address to
# a file in the container's own /tmp, where HEALTHCHECK finds it; override both to scrape.
ENV PATH=/opt/announcer/bin:$PATH \
    MANPATH=/opt/announcer/share/man: \
    ANNOUNCER_LOG_FORMAT=json \
    ANNOUNCER_METRICS_ADDRESS=127.0.0.1:0 \
    ANNOUNCER_METRICS_ADDRESS_FILE=/tmp/announcer-metrics-address \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["/opt/announcer/bin/python", "-m", "announcer.healthcheck"]
# Exec form: announcer is PID 1 and gets SIGTERM from `docker stop` itself.
ENTRYPOINT ["/opt/announcer/bin/announcer"]
