#!/usr/bin/env bash
# Make what the image test needs, once (idempotent; needs root): podman set up to run as root
# here (runc, no default ulimits), and a local Debian bookworm base image with python3,
# python3-venv and python3-pip, since no image registry is reachable from these machines.
set -euo pipefail
BASE=localhost/bookworm-python3:latest

need=()
command -v podman >/dev/null || need+=(podman runc)
command -v debootstrap >/dev/null || need+=(debootstrap)
if [ ${#need[@]} -gt 0 ]; then
  apt-get -o Acquire::Retries=3 update -qq
  DEBIAN_FRONTEND=noninteractive apt-get -o Acquire::Retries=3 install -y -qq --no-install-recommends "${need[@]}"
fi
mkdir -p /etc/containers
if ! grep -qs 'default_ulimits = \[\]' /etc/containers/containers.conf; then
  printf '[containers]\ndefault_ulimits = []\n\n[engine]\nruntime = "runc"\n' > /etc/containers/containers.conf
fi
if podman image exists "$BASE"; then
  echo "image base ready: $BASE"
  exit 0
fi
root=$(mktemp -d /var/tmp/bookworm-base.XXXXXX)
trap 'rm -rf "$root"' EXIT
# The mirror is the network's: a failed fetch is tried again (three times) on a clean root.
for try in 1 2 3; do
  debootstrap --variant=minbase bookworm "$root" http://deb.debian.org/debian >/dev/null && break
  [ "$try" -lt 3 ] || { echo "make-image-base: debootstrap failed three times" >&2; exit 1; }
  echo "make-image-base: debootstrap failed (try $try), again in 10 s" >&2
  rm -rf "$root" && mkdir -p "$root" && sleep 10
done
chroot "$root" sh -c 'apt-get -o Acquire::Retries=3 update -qq && DEBIAN_FRONTEND=noninteractive apt-get -o Acquire::Retries=3 install -y -qq \
  --no-install-recommends python3 python3-venv python3-pip ca-certificates >/dev/null && apt-get clean'
tar -C "$root" -c . | podman import - "$BASE" >/dev/null
echo "image base made: $BASE"
