#!/usr/bin/env bash
# Debian's QEMU 10 from bookworm-backports, unpacked into a cache folder and
# never installed: the VFIO lane keeps bookworm's QEMU 7.2 as its outer QEMU,
# and both are the package qemu-system-x86.
#
#   CACHE=DIR bash test/qemu/get-qemu10.sh    # the last line printed is the qemu-system-x86_64 path
#
# - The archive is the machine's own: the URI of the first non-security
#   stanza of /etc/apt/sources.list.d/debian.sources, no host name written
#   here. apt runs on a private sources list, lists and cache under
#   $CACHE/apt, so the system's apt state is not changed.
# - qemu-system-x86, -common and -data are downloaded and unpacked with
#   dpkg-deb -x. QEMU finds its data next to its binary (../share/qemu); the
#   firmware (SeaBIOS, iPXE) and the shared libraries QEMU 10 links against
#   come from bookworm and are installed with the system's apt, only those
#   missing (--no-install-recommends --no-upgrade).
# - A second run with the same CACHE finds the unpacked QEMU and does nothing.
set -euo pipefail
export LC_ALL=C DEBIAN_FRONTEND=noninteractive
CACHE=${CACHE:-/var/cache/kvmvfiod-lanes/qemu10}
ROOT=$CACHE/root
BIN=$ROOT/usr/bin/qemu-system-x86_64
log() { echo "[get-qemu10] $*" >&2; }
t0=$SECONDS

if [ -x "$BIN" ] && "$BIN" --version > /dev/null 2>&1; then
  log "cached: $("$BIN" --version | head -n1)"
  echo "$BIN"
  exit 0
fi

# What Debian's QEMU 10 needs from bookworm at run time (measured with ldd on the unpacked binary).
NEED="libcapstone4 libpmem1 libfdt1 librdmacm1 libibverbs1 libslirp0 libvdeplug2 libfuse3-3 libaio1 liburing2 seabios ipxe-qemu"
missing=()
for p in $NEED; do dpkg-query -W -f='${Status}' "$p" 2> /dev/null | grep -q 'install ok installed' || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get install -y -q --no-install-recommends --no-upgrade "${missing[@]}" >&2 \
    || { apt-get update -q >&2 && apt-get install -y -q --no-install-recommends --no-upgrade "${missing[@]}" >&2; }
  log "installed from bookworm: ${missing[*]}"
fi

SOURCES=/etc/apt/sources.list.d/debian.sources
[ -r "$SOURCES" ] || { log "no $SOURCES to read the archive from"; exit 1; }
URI=$(awk '$1 == "URIs:" && $2 !~ /security/ { print $2; exit }' "$SOURCES")
KEYRING=$(awk '$1 == "Signed-By:" { print $2; exit }' "$SOURCES")
[ -n "$URI" ] || { log "no archive URI in $SOURCES"; exit 1; }
APTDIR=$CACHE/apt
rm -rf "$APTDIR"
mkdir -p "$APTDIR/parts" "$APTDIR/lists/partial" "$APTDIR/cache/archives/partial" "$CACHE/debs"
: > "$APTDIR/sources.list"
printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\n%s' "$URI" "${KEYRING:+Signed-By: $KEYRING
}" > "$APTDIR/parts/backports.sources"
APT=(-q -o Dir::Etc::sourcelist="$APTDIR/sources.list" -o Dir::Etc::sourceparts="$APTDIR/parts"
  -o Dir::State::Lists="$APTDIR/lists" -o Dir::Cache="$APTDIR/cache" -o APT::Sandbox::User=root)
apt-get "${APT[@]}" update >&2
VERSION=$(apt-cache "${APT[@]}" show qemu-system-x86 | awk '$1 == "Version:" && $2 ~ /^1:10\./ { print $2; exit }')
[ -n "$VERSION" ] || { log "bookworm-backports at $URI has no QEMU 10"; exit 1; }
(cd "$CACHE/debs" && rm -f ./*.deb && apt-get "${APT[@]}" download "qemu-system-x86=$VERSION" "qemu-system-common=$VERSION" "qemu-system-data=$VERSION") >&2
rm -rf "$APTDIR" "$ROOT"
mkdir -p "$ROOT"
for deb in "$CACHE"/debs/*.deb; do dpkg-deb -x "$deb" "$ROOT"; done
"$BIN" --version | head -n1 >&2
log "QEMU $VERSION from $URI bookworm-backports in $((SECONDS - t0)) s, $(du -sm "$ROOT" | cut -f1) MB unpacked"
echo "$BIN"
