#!/usr/bin/env bash
# Install the Debian packages the tests need: a single-node Slurm (slurmctld, slurmd,
# slurm-client, munge) and Chromium for the browser tests. Skips what is already there.
set -euo pipefail
PKGS=(slurmctld slurmd slurm-client munge iproute2 chromium fonts-liberation)
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "install-system: all present (${PKGS[*]})"
    exit 0
fi
if ! command -v apt-get >/dev/null; then
    echo "install-system: need ${missing[*]} but apt-get is missing; install them with your package manager" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || { echo "install-system: run as root to install ${missing[*]}" >&2; exit 1; }
    SUDO=sudo
fi
echo "install-system: installing ${missing[*]}"
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
