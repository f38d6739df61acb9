#!/usr/bin/env bash
# The QEMU lane: Debian's QEMU 10, unmodified, as a sandboxed VMM of the real
# daemon on this host's KVM (test/qemu/host.test.ts). QEMU comes from
# bookworm-backports, unpacked into a cache (test/qemu/get-qemu10.sh).
#   bash test/qemu/lane.sh        (after npm run build; npm run test:qemu does both)
# Environment: KVMVFIO_QEMU_CACHE (default /var/cache/kvmvfiod-lanes/qemu10).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
log() { echo "[qemu-lane $SECONDS s] $*"; }
[ -f "$REPO/dist/test/qemu/host.test.js" ] || { echo "qemu lane: run npm run build first" >&2; exit 1; }
log "QEMU 10"
QEMU=$(CACHE=${KVMVFIO_QEMU_CACHE:-/var/cache/kvmvfiod-lanes/qemu10} bash "$REPO/test/qemu/get-qemu10.sh" | tail -n1)
log "QEMU at $QEMU"
log "tests"
cd "$REPO"
KVMVFIO_QEMU=$QEMU node --test --test-concurrency=1 --test-timeout=120000 dist/test/qemu/
log "qemu lane: PASSED"
