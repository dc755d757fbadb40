#!/usr/bin/env bash
# Re-make the lock files from pyproject.toml: what the image and CI install, pinned with hashes.
# The wheel's own ranges (pyproject.toml) stay open, as a library's should; these files pin what
# this project ships and tests. tests/test_lock.py fails when they and pyproject.toml disagree.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/uv ] || .venv/bin/python -m pip install --quiet --disable-pip-version-check uv
compile() { .venv/bin/uv pip compile pyproject.toml --quiet --generate-hashes --python-version 3.11 "$@"; }
compile --extra all -o requirements/image.txt   # the image: announcer and every driver
compile --extra test -o requirements/test.txt   # the tests and CI: the same, plus the test tools
