"""The container HEALTHCHECK: GET /healthz of the running agent; exit 0 when healthy.

    python -m announcer.healthcheck

The address is read from $ANNOUNCER_METRICS_ADDRESS_FILE, where the agent writes
the address it bound (so the image can bind port 0: with host networking, many
sidekicks on one host need no port plan), else from $ANNOUNCER_METRICS_ADDRESS.
Standard library only, so it starts fast and needs nothing but the image.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from pathlib import Path


def main() -> int:
    address = os.environ.get("ANNOUNCER_METRICS_ADDRESS", "")
    address_file = os.environ.get("ANNOUNCER_METRICS_ADDRESS_FILE", "")
    if address_file:
        try:
            address = Path(address_file).read_text().strip()
        except OSError as exc:
            sys.stderr.write(f"healthcheck: no address yet in {address_file}: {exc.strerror}\n")
            return 1
    host, _, port = address.rpartition(":")
    if not port or port == "0":
        sys.stderr.write("healthcheck: ANNOUNCER_METRICS_ADDRESS names no fixed HOST:PORT; nothing to ask\n")
        return 0  # no endpoint configured: report healthy rather than kill a working sidekick
    host = host.strip("[]") or "127.0.0.1"
    if host in ("0.0.0.0", "::"):  # noqa: S104 - an all-interfaces bind is reached on loopback
        host = "127.0.0.1"
    url = f"http://{host}:{port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            sys.stdout.write(response.read().decode())
            return 0
    except urllib.error.HTTPError as exc:
        sys.stdout.write(exc.read().decode())
    except OSError as exc:
        sys.stderr.write(f"healthcheck: {url}: {exc}\n")
    return 1


if __name__ == "__main__":
    sys.exit(main())
