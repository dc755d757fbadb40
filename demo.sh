#!/usr/bin/env bash
# Set up (a local venv with announcer and etcd) and run the guided demo.
# Pass --forever to leave announcer running until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
exec .venv/bin/python scripts/demo.py "$@"
