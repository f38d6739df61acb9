#!/usr/bin/env bash
# The VFIO lane: the project's tests against real VFIO groups, inside a
# nested QEMU guest (TCG) with an emulated Intel IOMMU, since this host's
# kernel has no VFIO. Run by `npm run test:vfio` (which builds first) and by
# .ci/run. Root on Debian 12; needs the Debian archive for the first run.
#
#   host                                     guest (Debian 6.12 kernel, busybox /init = test/vfio/init.sh)
#   apt: qemu-system-x86 busybox-static cpio (+ gcc-12 make xz-utils for the rebuild)
#   newest linux-image-6.12.*+deb12-amd64-unsigned -> vmlinuz + modules
#   build-vfio-modules.sh: iommufd + vfio     (Debian's 6.12 has no IOMMUFD: rebuilt with
#     rebuilt against Debian's headers        CONFIG_IOMMUFD=m, CONFIG_VFIO_DEVICE_CDEV=y)
#   initramfs: busybox, modules, /init       iommufd before vfio: /dev/iommu, /dev/vfio/devices/vfioN
#   qemu q35 + intel-iommu                   edu, pci-testdev          -> vfio-pci, one group each (viable)
#        + pcie-pci-bridge { edu, e1000 }    edu -> vfio-pci, e1000 -> e1000: one group, NOT viable
#        + 9p: host / (ro), results (rw)     chroot into the host's /, node --test <KVMVFIO_GUEST_TESTS>
#
# Steps, each timed and named when it fails: apt, kernel, download, unpack,
# vfio-modules, initramfs, boot (QEMU start to /init), then the guest's own
# steps (modules, share, bind, cdev, groups, chroot, tests). Exit 0 only when
# the guest tests passed.
#
# Environment:
#   KVMVFIO_LANE_DIR           cache and logs (default /tmp/kvmvfio-vfio-lane): debs/, kernel/,
#                              vfio-modules/ (the rebuild's .debs and, per kernel, its modules),
#                              initramfs.cpio, logs/, run/ (console.log, share/ = the guest's results)
#   KVMVFIO_LANE_CDEV=0        Debian's own vfio modules, no rebuild: no /dev/iommu, no VFIO
#                              device cdevs, and the tests that need them skip (default 1)
#   KVMVFIO_GUEST_TESTS        test files to run in the guest, relative to the repo or absolute,
#                              space-separated (default: every dist/test/vfio/*.test.js)
#   KVMVFIO_LANE_TIMEOUT       bound of the whole guest run, seconds (default 900; a run takes ~5.5 min with the
#                              L2 hot-plug test, ~3 min without)
#   KVMVFIO_LANE_BOOT_TIMEOUT  QEMU start to /init, seconds (default 120; it takes ~3-5 s)
#   KVMVFIO_LANE_STALL         fail when the guest console is silent this long, seconds (default 120;
#                              the guest prints a heartbeat every 20 s while its tests run)
#   KVMVFIO_GUEST_TEST_TIMEOUT node --test-timeout in the guest, ms, per test file (default 600000: the L2
#                              hot-plug file boots a Linux on TCG inside TCG)
#   KVMVFIO_QEMU               Debian's QEMU 10 (test/qemu/get-qemu10.sh) for the guest's QEMU
#                              test, reached in the guest through the read-only share of /
#                              (default: the QEMU lane's cache, when it is there; else that test skips)
#   KVMVFIO_LANE_MEM, KVMVFIO_LANE_SMP   guest memory (MiB, default 2048) and vCPUs (default 2)
#   (TCG runs single-threaded, thread=single: with one host thread per vCPU, a guest's live kernel
#   text patching once oopsed on int3 in __schedule as a VMM was killed; measured in CI)
#   KVMVFIO_LANE_OFFLINE=1     no apt at all: use the packages installed and the newest kernel cached
#   KVMVFIO_LANE_APPEND        more guest kernel arguments (debugging: loglevel=7, say)
#   KVMVFIO_LANE_L2=0          skip the hot-plug test with a Linux guest inside QEMU 10 (test/vfio/hotplug.test.ts:
#                              its L2 boots on TCG inside the TCG guest, ~2.5 min); default 1. The L2 is this lane's
#                              kernel with a busybox initramfs whose /init is test/vfio/l2-init.sh (cached in
#                              $LANE/l2/, rebuilt when that script or busybox changes)
set -uo pipefail
export LC_ALL=C DEBIAN_FRONTEND=noninteractive

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd -P)
LANE=${KVMVFIO_LANE_DIR:-/tmp/kvmvfio-vfio-lane}
TIMEOUT=${KVMVFIO_LANE_TIMEOUT:-900}
BOOT_TIMEOUT=${KVMVFIO_LANE_BOOT_TIMEOUT:-120}
STALL=${KVMVFIO_LANE_STALL:-120}
TEST_TIMEOUT=${KVMVFIO_GUEST_TEST_TIMEOUT:-600000}
MEM=${KVMVFIO_LANE_MEM:-2048}
SMP=${KVMVFIO_LANE_SMP:-2}
OFFLINE=${KVMVFIO_LANE_OFFLINE:-0}
APPEND=${KVMVFIO_LANE_APPEND:-}
CDEV=${KVMVFIO_LANE_CDEV:-1}
L2=${KVMVFIO_LANE_L2:-1}
KERNEL_RE='^linux-image-6\.12\.[0-9]+\+deb12-amd64-unsigned$'
PACKAGES=(qemu-system-x86 busybox-static cpio)
# The rebuild of vfio + iommufd: Debian's kernel is built with gcc-12, its headers call it by that name.
CDEV_PACKAGES=(gcc-12 make xz-utils)
# Guest modules; their dependencies (vfio_pci_core, irqbypass, kvm, ccp, netfs,
# 9pnet...) are added from each .ko's depends=, built-ins are skipped.
MODULES=(virtio_pci irqbypass vfio vfio_iommu_type1 vfio_pci kvm kvm_amd 9pnet_virtio 9p e1000)

# ------------------------------------------------------------------ helpers
T0=${EPOCHREALTIME/./}
now_us() { echo "${EPOCHREALTIME/./}"; }
fmt_s() { printf '%d.%01d' $(($1 / 1000000)) $((($1 % 1000000) / 100000)); }   # microseconds -> "12.3"
since() { fmt_s $(($(now_us) - $1)); }
log() { echo "[vfio-lane $(since "$T0")s] $*"; }
declare -a TIMINGS=()
timing() {   # timing LABEL SECONDS|WORD
  case "$2" in [0-9]*) TIMINGS+=("$(printf '%-28s %8s s' "$1" "$2")") ;; *) TIMINGS+=("$(printf '%-28s %8s' "$1" "$2")") ;; esac
}
print_timings() {
  echo "== timings"
  local t; for t in "${TIMINGS[@]}"; do echo "  $t"; done
  printf '  %-28s %8s s\n' "total" "$(since "$T0")"
}
STEP=setup
fail() {   # fail MESSAGE [LOGFILE]: the step, the reason, the log's tail, timings; exit 1
  echo
  echo "vfio lane: FAILED at step '$STEP': $1"
  if [ -n "${2:-}" ] && [ -f "$2" ]; then echo "---- last lines of $2"; tail -n 30 "$2"; echo "----"; fi
  print_timings
  exit 1
}
step() { STEP=$1; log "step $STEP"; }

[ "$(id -u)" = 0 ] || { STEP=setup; fail "run as root (apt, QEMU's 9p share of / as root)"; }
case "$CDEV" in 0|1) ;; *) fail "KVMVFIO_LANE_CDEV is '$CDEV': 1 (rebuild vfio with cdevs and iommufd, the default) or 0" ;; esac
[ "$CDEV" = 1 ] && PACKAGES+=("${CDEV_PACKAGES[@]}")
mkdir -p "$LANE"/{debs,kernel,logs} || fail "cannot create $LANE"
exec 9> "$LANE/.lock"
flock -n 9 || fail "another lane run holds $LANE/.lock (set KVMVFIO_LANE_DIR to run two at once)"

# ------------------------------------------------------------------ 1. apt
step apt
t=$(now_us)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$p")
done
APT_UPDATED=0
if [ "$OFFLINE" != 1 ]; then
  # Once per run: the kernel's ABI moves and Debian drops the old one, so fresh lists matter.
  if apt-get update -q > "$LANE/logs/apt-update.log" 2>&1; then
    APT_UPDATED=1
  elif [ ${#missing[@]} -gt 0 ]; then
    fail "apt-get update failed" "$LANE/logs/apt-update.log"
  else
    log "apt-get update failed; going on with the lists and cache there are ($LANE/logs/apt-update.log)"
  fi
fi
if [ ${#missing[@]} -gt 0 ]; then
  [ "$OFFLINE" = 1 ] && fail "missing packages ${missing[*]} and KVMVFIO_LANE_OFFLINE=1"
  log "installing ${missing[*]}"
  # Only what is missing, never an upgrade of what the host has.
  apt-get install -y -q --no-install-recommends --no-upgrade "${missing[@]}" > "$LANE/logs/apt-install.log" 2>&1 \
    || fail "apt-get install ${missing[*]} failed" "$LANE/logs/apt-install.log"
  grep -E '^(Need to get|After this operation)' "$LANE/logs/apt-install.log" | sed 's/^/  /'
fi
for c in qemu-system-x86_64 cpio dpkg-deb timeout flock; do
  command -v "$c" > /dev/null || fail "$c is not installed"
done
if [ "$CDEV" = 1 ]; then
  for c in x86_64-linux-gnu-gcc-12 make xz; do command -v "$c" > /dev/null || fail "$c is not installed"; done
fi
BUSYBOX=/bin/busybox
[ -x "$BUSYBOX" ] || fail "no $BUSYBOX (package busybox-static)"
timing "apt (update + install)" "$(since "$t")"
log "$(qemu-system-x86_64 --version | head -n1); missing before: ${missing[*]:-none}"

# ------------------------------------------------------------------ 2. kernel: find, download, unpack
step kernel
t=$(now_us)
newest_cached() { ls -d "$LANE"/kernel/*/.unpacked 2>/dev/null | sed 's#/.unpacked$##; s#.*/##' | sort -V | tail -n1; }
KPKG=
[ "$OFFLINE" != 1 ] && KPKG=$(apt-cache search --names-only "$KERNEL_RE" | awk '{print $1}' | sort -V | tail -n1)
if [ -n "$KPKG" ]; then
  KV=${KPKG#linux-image-}; KV=${KV%-unsigned}
  log "guest kernel: $KPKG $(apt-cache policy "$KPKG" | awk '/Candidate:/{print $2}')"
else
  KV=$(newest_cached)
  [ -n "$KV" ] || fail "no package matches $KERNEL_RE (apt lists: $APT_UPDATED updated) and none is cached in $LANE/kernel"
  log "guest kernel: $KV from the cache (no package list to ask)"
fi
timing "kernel lookup (apt-cache)" "$(since "$t")"
KDIR=$LANE/kernel/$KV
DL_TIME=cached; UNPACK_TIME=cached
if [ ! -f "$KDIR/.unpacked" ]; then
  step download
  t=$(now_us)
  deb=$(ls "$LANE"/debs/"${KPKG}"_*.deb 2>/dev/null | head -n1)
  if [ -z "$deb" ] || ! dpkg-deb --info "$deb" > /dev/null 2>&1; then
    rm -f "$LANE"/debs/"${KPKG}"_*.deb
    tmp=$(mktemp -d "$LANE/debs/.dl.XXXXXX") || fail "mktemp in $LANE/debs"
    (cd "$tmp" && apt-get download -q -o APT::Sandbox::User=root "$KPKG") > "$LANE/logs/download.log" 2>&1 \
      || { rm -rf "$tmp"; fail "apt-get download $KPKG failed" "$LANE/logs/download.log"; }
    mv "$tmp"/*.deb "$LANE/debs/" && rmdir "$tmp" || fail "moving the .deb into $LANE/debs"
    deb=$(ls "$LANE"/debs/"${KPKG}"_*.deb | head -n1)
    DL_TIME=$(since "$t")
    log "downloaded $(basename "$deb") ($(du -m "$deb" | cut -f1) MB) in ${DL_TIME}s"
  else
    DL_TIME="cached (.deb)"
  fi
  step unpack
  t=$(now_us)
  rm -rf "$KDIR" "$KDIR.tmp"
  dpkg-deb -x "$deb" "$KDIR.tmp" > "$LANE/logs/unpack.log" 2>&1 || fail "dpkg-deb -x $deb failed" "$LANE/logs/unpack.log"
  mv "$KDIR.tmp" "$KDIR" && touch "$KDIR/.unpacked" || fail "moving the unpacked kernel to $KDIR"
  UNPACK_TIME=$(since "$t")
  # Keep one kernel: drop the ones an ABI bump left behind.
  for old in "$LANE"/kernel/*; do [ "$old" = "$KDIR" ] || rm -rf "$old"; done
  for old in "$LANE"/debs/*.deb; do [ "$old" = "$deb" ] || rm -f "$old"; done
fi
timing "kernel download" "$DL_TIME"
timing "kernel unpack" "$UNPACK_TIME"
VMLINUZ=$KDIR/boot/vmlinuz-$KV
MODDIR=$KDIR/lib/modules/$KV
[ -f "$VMLINUZ" ] && [ -d "$MODDIR/kernel" ] || fail "no $VMLINUZ or $MODDIR/kernel in the unpacked package"

# ------------------------------------------------------------------ 2b. vfio + iommufd, rebuilt
# Debian's 6.12 has "# CONFIG_IOMMUFD is not set": no /dev/iommu, no /dev/vfio/devices. Rebuilt
# once per kernel (25-45 s, 163 MB of .debs), then cached in $LANE/vfio-modules/$KV.
REBUILT=
if [ "$CDEV" = 1 ]; then
  step vfio-modules
  t=$(now_us)
  KVMVFIO_LANE_OFFLINE=$OFFLINE bash "$REPO/test/vfio/build-vfio-modules.sh" "$KV" "$KDIR" "$LANE/vfio-modules" \
    > "$LANE/logs/vfio-modules.log" 2>&1 \
    || fail "$(tail -n1 "$LANE/logs/vfio-modules.log")" "$LANE/logs/vfio-modules.log"
  REBUILT=$LANE/vfio-modules/$KV
  if grep -q ': cached in ' "$LANE/logs/vfio-modules.log"; then
    log "vfio modules: cached ($REBUILT)"
    timing "vfio modules" cached
  else
    while read -r _ label secs; do timing "vfio modules: $label" "$secs"; done < <(grep '^timing ' "$LANE/logs/vfio-modules.log")
    log "vfio modules: $(grep '^built: ' "$LANE/logs/vfio-modules.log" | cut -c8-) in $(since "$t")s"
  fi
else
  timing "vfio modules" "off (KVMVFIO_LANE_CDEV=0)"
fi

# ------------------------------------------------------------------ 3. initramfs
step initramfs
t=$(now_us)
IR=$LANE/initramfs
rm -rf "$IR" && mkdir -p "$IR"/{bin,dev,proc,sys,tmp,lib/modules} || fail "creating $IR"
cp "$BUSYBOX" "$IR/bin/busybox" || fail "copying $BUSYBOX"
for a in $("$BUSYBOX" --list); do [ "$a" = busybox ] || ln -s busybox "$IR/bin/$a"; done
install -m 0755 "$REPO/test/vfio/init.sh" "$IR/init" || fail "copying test/vfio/init.sh"

declare -A KO=() BUILTIN=() ADDED=()
while IFS= read -r -d '' f; do n=${f##*/}; n=${n%%.ko*}; KO[${n//-/_}]=$f; done \
  < <(find "$MODDIR/kernel" -name '*.ko*' -print0)
# The rebuilt modules replace Debian's of the same name; iommufd is new.
if [ -n "$REBUILT" ]; then
  for f in "$REBUILT"/*.ko; do n=${f##*/}; n=${n%.ko}; KO[${n//-/_}]=$f; done
  MODULES=(iommufd "${MODULES[@]}")   # before vfio, which needs it (and says so in its depends=)
fi
if [ -f "$MODDIR/modules.builtin" ]; then
  while read -r f; do n=${f##*/}; n=${n%.ko}; BUILTIN[${n//-/_}]=1; done < "$MODDIR/modules.builtin"
fi
ORDER=()
ko_cat() {
  case "$1" in
    *.ko.xz) "$BUSYBOX" unxz -c "$1" ;;
    *.ko.gz) "$BUSYBOX" gunzip -c "$1" ;;
    *.ko.zst) zstd -q -d -c "$1" ;;
    *.ko) cat "$1" ;;
    *) return 1 ;;
  esac
}
# add_module NAME: its dependencies first (from the "depends=" string of its
# .modinfo section), then NAME, appended to ORDER; built-in ones are skipped.
add_module() {
  local n=${1//-/_} dst deps d
  [ -n "${ADDED[$n]:-}" ] && return 0
  ADDED[$n]=1
  [ -n "${BUILTIN[$n]:-}" ] && return 0
  [ -n "${KO[$n]:-}" ] || { echo "module $n is neither in $MODDIR/kernel nor built in" >&2; return 1; }
  dst=$IR/lib/modules/$n.ko
  ko_cat "${KO[$n]}" > "$dst" || { echo "cannot decompress ${KO[$n]}" >&2; return 1; }
  deps=$(tr '\0' '\n' < "$dst" | sed -n 's/^depends=//p' | head -n1)
  for d in ${deps//,/ }; do add_module "$d" || return 1; done
  ORDER+=("$n")
}
for m in "${MODULES[@]}"; do add_module "$m" 2> "$LANE/logs/modules.log" || fail "resolving module $m" "$LANE/logs/modules.log"; done
printf '%s\n' "${ORDER[@]}" > "$IR/lib/modules/order"
if [ -n "$REBUILT" ]; then
  o=" ${ORDER[*]} "; before=${o%% vfio *}
  [ "$before" != "$o" ] && [[ "$before " == *" iommufd "* ]] || fail "the module order does not load iommufd before vfio: ${ORDER[*]}"
fi
(cd "$IR" && find . -print0 | sort -z | cpio --null -o -H newc --quiet) > "$LANE/initramfs.cpio" \
  || fail "cpio of $IR failed"
timing "initramfs" "$(since "$t")"
log "initramfs $(du -m "$LANE/initramfs.cpio" | cut -f1) MB; modules in order: ${ORDER[*]}"

# ------------------------------------------------------------------ 3b. the L2 guest's initramfs
# For the hot-plug test's Linux inside QEMU 10: busybox and test/vfio/l2-init.sh, keyed by both.
L2CPIO=
if [ "$L2" = 1 ]; then
  step l2
  t=$(now_us)
  key=$(cat "$BUSYBOX" "$REPO/test/vfio/l2-init.sh" | sha256sum | cut -c1-16)
  L2CPIO=$LANE/l2/initramfs-$key.cpio
  if [ -s "$L2CPIO" ]; then
    timing "L2 initramfs" cached
  else
    rm -rf "$LANE/l2" && mkdir -p "$LANE/l2/root"/{bin,proc,sys,dev} || fail "creating $LANE/l2"
    cp "$BUSYBOX" "$LANE/l2/root/bin/busybox" || fail "copying $BUSYBOX"
    for a in $("$BUSYBOX" --list); do [ "$a" = busybox ] || ln -s busybox "$LANE/l2/root/bin/$a"; done
    install -m 0755 "$REPO/test/vfio/l2-init.sh" "$LANE/l2/root/init" || fail "copying test/vfio/l2-init.sh"
    (cd "$LANE/l2/root" && find . -print0 | sort -z | cpio --null -o -H newc --quiet) > "$L2CPIO.tmp" && mv "$L2CPIO.tmp" "$L2CPIO" \
      || fail "cpio of the L2 initramfs failed"
    rm -rf "$LANE/l2/root"
    timing "L2 initramfs" "$(since "$t")"
  fi
else
  timing "L2 initramfs" "off (KVMVFIO_LANE_L2=0)"
fi

# ------------------------------------------------------------------ 4. what the guest runs
step prepare
NODE=$(command -v node) || fail "no node on PATH"
case "$NODE" in /*) ;; *) fail "node is not an absolute path: $NODE" ;; esac
TESTS=()
if [ -n "${KVMVFIO_GUEST_TESTS:-}" ]; then
  for f in $KVMVFIO_GUEST_TESTS; do
    case "$f" in /*) ;; *) f=$REPO/$f ;; esac
    [ -f "$f" ] || fail "KVMVFIO_GUEST_TESTS names $f, which does not exist (npm run build?)"
    TESTS+=("$f")
  done
else
  for f in "$REPO"/dist/test/vfio/*.test.js; do [ -f "$f" ] && TESTS+=("$f"); done
  [ ${#TESTS[@]} -gt 0 ] || fail "no $REPO/dist/test/vfio/*.test.js: run npm run build (or npm run test:vfio)"
fi
[ -f "$REPO/dist/src/kernel/index.js" ] || fail "$REPO/dist is not built: run npm run build"

RUN=$LANE/run
rm -rf "$LANE/run.prev"; [ -d "$RUN" ] && mv "$RUN" "$LANE/run.prev"
SHARE=$RUN/share
mkdir -p "$SHARE/in" || fail "creating $SHARE"
printf '%s\n' "$REPO" > "$SHARE/in/repo"
printf '%s\n' "$NODE" > "$SHARE/in/node"
printf '%s\n' "${TESTS[@]}" > "$SHARE/in/tests"
printf '%s\n' "$TEST_TIMEOUT" > "$SHARE/in/test-timeout"
QEMU10=${KVMVFIO_QEMU:-/var/cache/kvmvfiod-lanes/qemu10/root/usr/bin/qemu-system-x86_64}
if [ -x "$QEMU10" ]; then printf '%s\n' "$QEMU10" > "$SHARE/in/qemu"; log "QEMU 10 for the guest: $QEMU10"; else : > "$SHARE/in/qemu"; log "no QEMU 10 at $QEMU10: the guest's QEMU test skips"; fi
printf '%s\n' "$CDEV" > "$SHARE/in/cdev"
if [ -n "$L2CPIO" ]; then
  # Readable by QEMU 10 as uid 65534 in the guest; hard links where the filesystem allows.
  for f in "$VMLINUZ:l2-vmlinuz" "$L2CPIO:l2-initrd.cpio"; do
    cp -l "${f%%:*}" "$SHARE/in/${f##*:}" 2>/dev/null || cp "${f%%:*}" "$SHARE/in/${f##*:}" || fail "copying ${f%%:*} into the share"
    chmod 0644 "$SHARE/in/${f##*:}"
  done
fi
CONSOLE=$RUN/console.log

# ------------------------------------------------------------------ 5. boot
step boot
# intel-iommu must precede the devices it translates. The two edu/pci-testdev
# on the root bus get one group each; behind the PCIe-to-PCI bridge every
# device aliases to the bridge's requester id, so edu #2 and the e1000 share
# the bridge's group.
QEMU=(qemu-system-x86_64 -name kvmvfio-lane -nographic -no-reboot -nic none
  -accel tcg,thread=single -cpu max -M q35,kernel-irqchip=split -m "$MEM" -smp "$SMP"
  -device intel-iommu,intremap=on,caching-mode=on
  -device edu,addr=0x4
  -device pci-testdev,addr=0x5
  -device pcie-pci-bridge,id=lanebr,addr=0x6
  -device edu,bus=lanebr,addr=0x1
  -device e1000,bus=lanebr,addr=0x2,romfile=
  -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap
  -virtfs "local,path=$SHARE,mount_tag=results,security_model=none"
  -kernel "$VMLINUZ" -initrd "$LANE/initramfs.cpio"
  -append "console=ttyS0 panic=-1 loglevel=4 intel_iommu=on${APPEND:+ $APPEND}"
  -pidfile "$RUN/qemu.pid")
printf '%q ' "${QEMU[@]}" > "$RUN/qemu.cmd"; echo >> "$RUN/qemu.cmd"

mkfifo "$RUN/console.fifo" || fail "mkfifo"
QSTART=$(now_us)
# Every console line gets the seconds since QEMU started; the lane's own lines show live.
(
  while IFS= read -r l || [ -n "$l" ]; do
    l=${l//$'\r'/}
    d=$((${EPOCHREALTIME/./} - QSTART))
    printf -v s '%d.%02d' $((d / 1000000)) $(((d % 1000000) / 10000))
    printf '%7s %s\n' "$s" "$l"
    case "$l" in kvmvfio-lane:*|*"Kernel panic"*) echo "  guest ${s}s: $l" >&3 ;; esac
  done < "$RUN/console.fifo" > "$CONSOLE"
) 3>&1 &
STAMPER=$!
timeout --kill-after=10 "$TIMEOUT" "${QEMU[@]}" < /dev/null > "$RUN/console.fifo" 2>&1 &
QPID=$!   # timeout's pid; TERM to it reaches QEMU
trap 'kill -TERM $QPID 2>/dev/null' EXIT
trap 'kill -TERM $QPID 2>/dev/null; exit 130' INT TERM
log "QEMU started (console: $CONSOLE)"

KILLED=
stop_guest() { KILLED=$1; log "stopping the guest: $1"; kill -TERM "$QPID" 2>/dev/null; }
guest_step() { grep -a -o 'kvmvfio-lane: step [a-z]*' "$CONSOLE" 2>/dev/null | tail -n1 | awk '{print $3}'; }
PANIC_AT=
while kill -0 "$QPID" 2>/dev/null; do
  sleep 1
  [ -n "$KILLED" ] && continue
  el=$(( ($(now_us) - QSTART) / 1000000 ))
  if grep -a -q -E 'Kernel panic|BUG: kernel NULL|Oops:' "$CONSOLE"; then
    PANIC_AT=${PANIC_AT:-$el}
    # panic=-1 + -no-reboot end QEMU at once; give it a moment, then end it.
    [ $((el - PANIC_AT)) -ge 5 ] && stop_guest "guest kernel panic/oops"
  elif ! grep -a -q 'kvmvfio-lane: init' "$CONSOLE" && [ "$el" -ge "$BOOT_TIMEOUT" ]; then
    stop_guest "no /init after ${BOOT_TIMEOUT}s (KVMVFIO_LANE_BOOT_TIMEOUT)"
  elif [ $(( $(date +%s) - $(stat -c %Y "$CONSOLE") )) -ge "$STALL" ]; then
    stop_guest "no console output for ${STALL}s in guest step '$(guest_step)' (KVMVFIO_LANE_STALL)"
  fi
done
wait "$QPID"; QRC=$?
trap - EXIT INT TERM
wait "$STAMPER"
QEMU_TIME=$(since "$QSTART")

# ------------------------------------------------------------------ 6. results
STEP=guest
init_at=$(grep -a -m1 'kvmvfio-lane: init' "$CONSOLE" | awk '{print $1}')
init_up=$(grep -a -m1 'kvmvfio-lane: init' "$CONSOLE" | sed -n 's/.*uptime=\([0-9.]*\).*/\1/p')
ts_start=$(grep -a -m1 'kvmvfio-lane: tests-start' "$CONSOLE" | awk '{print $1}')
ts_end=$(grep -a -m1 'kvmvfio-lane: tests-end' "$CONSOLE" | awk '{print $1}')
timing "boot: QEMU start to /init" "${init_at:-never}"
[ -n "$init_up" ] && timing "  (guest uptime at /init)" "$init_up"
[ -n "$init_at" ] && [ -n "$ts_start" ] && timing "guest: /init to tests" "$(awk -v a="$init_at" -v b="$ts_start" 'BEGIN{printf "%.1f", b-a}')"
[ -n "$ts_start" ] && [ -n "$ts_end" ] && timing "guest: tests" "$(awk -v a="$ts_start" -v b="$ts_end" 'BEGIN{printf "%.1f", b-a}')"
timing "QEMU total" "$QEMU_TIME"

if [ -f "$SHARE/groups.json" ]; then
  echo "== IOMMU groups (guest sysfs, $SHARE/groups.json)"
  for g in $(grep -a -o -E 'kvmvfio-lane: group [0-9]+: /dev/vfio/[0-9]+' "$CONSOLE" | awk '{print $3}' | tr -d :); do
    grep -a -E "kvmvfio-lane: group $g: /dev/vfio" "$CONSOLE" | sed 's/^ *[0-9.]* kvmvfio-lane: /  /'
    grep -a -E "kvmvfio-lane: group $g: [0-9a-f]{4}:" "$CONSOLE" | sed 's/^ *[0-9.]* kvmvfio-lane: group [0-9]*: /    /'
  done
fi
if [ -f "$SHARE/tests.log" ]; then
  echo "== guest test output ($SHARE/tests.log)"
  cat "$SHARE/tests.log"
fi

RC=$(cat "$SHARE/tests.rc" 2>/dev/null)
if [ "$RC" = 0 ] && [ -z "$KILLED" ]; then
  print_timings
  echo "vfio lane: PASSED (${#TESTS[@]} test file(s) in the guest; console: $CONSOLE)"
  exit 0
fi
if [ -f "$SHARE/tests.log" ]; then
  echo "== guest console ($CONSOLE; its 'test|' lines, the output above, left out)"
  grep -a -v -E '^ *[0-9.]+ test\| ' "$CONSOLE"
else
  echo "== guest console ($CONSOLE)"
  cat "$CONSOLE"
fi
panic=$(grep -a -m1 -E 'Kernel panic|BUG: kernel NULL|Oops:' "$CONSOLE" | sed 's/^ *[0-9.]* //')
gstep=$(guest_step)
if [ -n "$panic" ]; then
  STEP=${gstep:-boot}; fail "guest kernel panic/oops: $panic (QEMU exit $QRC)"
elif [ -n "$KILLED" ]; then
  STEP=${gstep:-boot}; fail "$KILLED (QEMU exit $QRC)"
elif [ "$QRC" = 124 ] || [ "$QRC" = 137 ]; then
  STEP=${gstep:-boot}; fail "the guest ran past KVMVFIO_LANE_TIMEOUT=${TIMEOUT}s"
elif [ -f "$SHARE/fail" ]; then
  STEP=${gstep:-guest}; fail "$(cat "$SHARE/fail")"
elif [ -z "$init_at" ]; then
  STEP=boot; fail "the guest never reached /init (QEMU exit $QRC)"
else
  STEP=${gstep:-guest}; fail "the guest stopped without a result (QEMU exit $QRC${RC:+, tests rc $RC})"
fi
