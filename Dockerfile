# announcer: the sidekick image. Multi-stage: wheels are built in the first stage, and
# only they are installed into a slim Python in the second (no compiler, no pip cache).
#   docker build -t announcer .
#   docker run --rm --network host announcer --service web --port 8080
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY announcer ./announcer
# Every wheel the image needs (announcer and its drivers), so the final stage installs offline.
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[all]"

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="announcer" \
      org.opencontainers.image.description="Keeps a healthy service's record in etcd under a lease" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/announcer/announcer"
COPY --from=build /wheels /wheels
# DL3013 (pin versions): --no-index installs only the wheels built above, so the versions are
# exactly those of this build; a pin here would repeat pyproject.toml's version by hand.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir --no-index --find-links /wheels "etcd-announcer[all]" \
    && rm -rf /wheels \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin announcer
# Numeric, so the host resolves it without the image's /etc/passwd.
USER 10001
# JSON log lines for `docker logs`. The metrics/health endpoint binds a free loopback port
# (with host networking, sidekicks on one host need no port plan) and writes its address to
# a file in the container's own /tmp, where HEALTHCHECK finds it; override both to scrape.
ENV ANNOUNCER_LOG_FORMAT=json \
    ANNOUNCER_METRICS_ADDRESS=127.0.0.1:0 \
    ANNOUNCER_METRICS_ADDRESS_FILE=/tmp/announcer-metrics-address \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-m", "announcer.healthcheck"]
# Exec form: announcer is PID 1 and gets SIGTERM from `docker stop` itself.
ENTRYPOINT ["announcer"]
