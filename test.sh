#!/usr/bin/env bash
# Set up (a local venv with announcer and its test tools) and run the whole test gate:
# ruff, mypy --strict, then pytest against real etcd and real services.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# What the tests run on is pinned with hashes (requirements/test.txt, made by scripts/lock.sh
# from pyproject.toml); announcer itself goes in editable, its dependencies already there.
.venv/bin/python -m pip install --quiet --disable-pip-version-check --require-hashes -r requirements/test.txt
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
# The database checks' tests need this machine's PostgreSQL, MariaDB and Redis up, and
# PostgreSQL checking the test role's password; as root, make it so (idempotent).
# The image test needs podman and a local Debian base image (no registry is reachable here).
if [ "$(id -u)" = 0 ]; then
  ./scripts/setup-test-services.sh
  ./scripts/make-image-base.sh
else
  echo "test.sh: not root, so scripts/setup-test-services.sh and make-image-base.sh were not run;" \
    "database and image tests may skip" >&2
fi
.venv/bin/ruff check announcer tests bench scripts
.venv/bin/ruff format --check announcer tests bench scripts
.venv/bin/mypy
# Three workers: most tests wait on real processes and timers, so they overlap well on two cores.
.venv/bin/python -m pytest -n "${ANNOUNCER_TEST_WORKERS:-3}" --dist worksteal "$@"
# Both event loops: the run above has the in-process tests on asyncio's loop and the announcer
# processes on uvloop (the default); the loop-sensitive tests (the checks, the endpoint, the
# agent's watch and shutdown, the etcd client) run again the other way round.
if [ $# -eq 0 ]; then
  ANNOUNCER_TEST_LOOP=uvloop ANNOUNCER_EVENT_LOOP=asyncio .venv/bin/python -m pytest \
    -n "${ANNOUNCER_TEST_WORKERS:-3}" --dist worksteal \
    tests/test_checks_http_tcp.py tests/test_checks_db.py tests/test_health.py tests/test_agent.py \
    tests/test_agent_etcd.py tests/test_etcd_client.py tests/test_registrar.py tests/test_lifecycle.py
fi
