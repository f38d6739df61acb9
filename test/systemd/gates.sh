#!/usr/bin/env bash
# Static gates on the shipped systemd files, on the host (PID 1 need not be
# systemd; only systemd-analyze, systemd-tmpfiles and systemd-sysusers of the
# installed systemd are used). Run by `npm run test:units` and by the systemd
# lane before it boots anything.
#
#   verify     systemd-analyze verify of the three units prints NOTHING.
#              verify exits 0 on unknown keys and other warnings, so any
#              output fails the gate, not only the exit code.
#   security   systemd-analyze security --offline=true of the service: the
#              exposure is at most KVMVFIO_SECURITY_MAX (default 2.0).
#   tmpfiles   the tmpfiles.d entries apply cleanly to an empty root.
#   sysusers   the sysusers.d entries apply cleanly to an empty root and
#              create the kvmvfio group.
#
# verify checks that ExecStart's program exists (/usr/bin/node), not the
# script it is given, so the units are verified as shipped, with no rewrite.
# Prints `N passed, N failed`; exit 1 on any failure.
set -uo pipefail
export LC_ALL=C SYSTEMD_LOG_COLOR=0 SYSTEMD_COLORS=0 SYSTEMD_PAGER=

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd -P)
MAX=${KVMVFIO_SECURITY_MAX:-2.0}
U=${KVMVFIO_UNITS_DIR:-$REPO/systemd}   # another directory: to check that the gates catch a bad unit
PASSED=0 FAILED=0
pass() { PASSED=$((PASSED + 1)); echo "ok   $1${2:+: $2}"; }
fail() { FAILED=$((FAILED + 1)); echo "FAIL $1${2:+: $2}"; }
indent() { sed 's/^/       | /'; }

for c in systemd-analyze systemd-tmpfiles systemd-sysusers; do
  command -v "$c" > /dev/null || { echo "gates: $c is not installed (package systemd)"; exit 1; }
done
for f in kvmvfiod.service kvmvfiod.socket kvmvfiod-handoff.socket kvmvfiod.sysusers kvmvfiod.tmpfiles; do
  [ -f "$U/$f" ] || { echo "gates: missing $U/$f"; exit 1; }
done
echo "== systemd gates ($(systemd-analyze --version | head -n1))"

# verify: from a scratch copy, named as installed, so that the units find each
# other (Service=, Requires=) and nothing else on the host is picked up.
TMP=$(mktemp -d) || exit 1
trap 'rm -rf "$TMP"' EXIT
cp "$U"/kvmvfiod.service "$U"/kvmvfiod.socket "$U"/kvmvfiod-handoff.socket "$TMP/"
out=$(cd "$TMP" && systemd-analyze verify --man=no kvmvfiod.service kvmvfiod.socket kvmvfiod-handoff.socket 2>&1)
rc=$?
if [ $rc = 0 ] && [ -z "$out" ]; then
  pass verify "kvmvfiod.service kvmvfiod.socket kvmvfiod-handoff.socket: no output"
else
  fail verify "rc=$rc, output:"
  echo "$out" | indent
fi

out=$(systemd-analyze security --offline=true --no-pager "$U/kvmvfiod.service" 2>&1)
rc=$?
score=$(echo "$out" | sed -n 's/.*Overall exposure level for kvmvfiod.service: \([0-9.]*\).*/\1/p')
if [ -z "$score" ]; then
  fail security "no exposure figure (rc=$rc):"
  echo "$out" | tail -n 5 | indent
elif awk -v s="$score" -v m="$MAX" 'BEGIN { exit !(s <= m) }'; then
  pass security "exposure $score (limit $MAX); what still counts:"
  echo "$out" | grep -E '^(✗|-) ' | sed -E 's/ {2,}/  /g' | indent
else
  fail security "exposure $score > $MAX; what counts:"
  echo "$out" | grep -E '^(✗|-) ' | sed -E 's/ {2,}/  /g' | indent
fi

mkdir -p "$TMP/root/etc"
out=$(systemd-tmpfiles --root="$TMP/root" --create "$U/kvmvfiod.tmpfiles" 2>&1)
rc=$?
modes=$(cd "$TMP/root" && stat -c '%a %U:%G /%n' run/kvmvfiod var/lib/kvmvfiod etc/kvmvfiod 2>&1 | tr '\n' ' ')
if [ $rc = 0 ] && [ -z "$out" ] && [ "$modes" = "755 root:root /run/kvmvfiod 700 root:root /var/lib/kvmvfiod 755 root:root /etc/kvmvfiod " ]; then
  pass tmpfiles "$modes"
else
  fail tmpfiles "rc=$rc $modes"
  echo "$out" | indent
fi

out=$(systemd-sysusers --root="$TMP/root" "$U/kvmvfiod.sysusers" 2>&1)
rc=$?
extra=$(echo "$out" | grep -v "^Creating group 'kvmvfio' with GID [0-9]*\.$" | grep -v '^$')
if [ $rc = 0 ] && [ -z "$extra" ] && grep -q '^kvmvfio:x:[0-9]*:$' "$TMP/root/etc/group"; then
  pass sysusers "$(grep '^kvmvfio:' "$TMP/root/etc/group")"
else
  fail sysusers "rc=$rc"
  echo "$out" | indent
fi

echo "$PASSED passed, $FAILED failed"
[ $FAILED = 0 ]
