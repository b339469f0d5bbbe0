#!/usr/bin/env bash
# Set-up for `make bench`: QEMU (the peer VMM) and taskset; idempotent, a
# no-op when both are there. Without root and without QEMU the bench still
# runs and marks the QEMU figures as skipped.
set -euo pipefail

missing=()
command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
command -v taskset >/dev/null || missing+=(util-linux)
command -v ip >/dev/null || missing+=(iproute2)

if [ ${#missing[@]} -gt 0 ]; then
    echo "bench setup: installing ${missing[*]}"
    if [ "$(id -u)" -ne 0 ]; then
        echo "bench setup: warning: need root to install ${missing[*]} (apt-get); continuing without" >&2
        exit 0
    fi
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" \
        || echo "bench setup: warning: could not install ${missing[*]}; continuing without" >&2
fi
