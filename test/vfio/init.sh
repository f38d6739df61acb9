#!/bin/sh
# /init of the VFIO lane's initramfs (busybox sh), built by test/vfio/lane.sh.
#
# In order, each one a named step (a failure names its step on the console
# and in out/fail, then powers off):
#   modules  insmod every module in /lib/modules/order (deps first; with
#            the lane's rebuilt vfio, iommufd comes before it);
#   share    mount the read-write 9p share "results" at /out and read the
#            lane's inputs from /out/in (repo, node, tests, test-timeout, cdev);
#   bind     bind the lane's test devices (edu 1234:11e8, pci-testdev
#            1b36:0005) to vfio-pci with driver_override + drivers_probe;
#   cdev     when the lane rebuilt vfio (cdev=1): /dev/iommu, and for each
#            device on vfio-pci its cdev (sysfs vfio-dev/vfioN) as the char
#            device /dev/vfio/devices/vfioN with the major:minor sysfs gives;
#   groups   describe every IOMMU group from sysfs in /out/groups.json and
#            check the lane has the cases it promises (>= 2 viable
#            single-device VFIO groups, >= 1 VFIO group that is not viable
#            because a sibling device sits on a kernel driver);
#   chroot   mount the host's / (9p "hostroot", read-only) on /host with
#            /proc, /sys, /dev, a tmpfs /tmp and /run, the results share at
#            /run/kvmvfio-lane;
#   tests    node --test --test-concurrency=1 <tests> from the repo, as root,
#            with KVMVFIO_GUEST=1, KVMVFIO_GUEST_GROUPS and KVMVFIO_GUEST_CDEV
#            (1: the cdevs are there, checked above), and KVMVFIO_L2_KERNEL /
#            KVMVFIO_L2_INITRD when the lane packed the hot-plug test's L2
#            guest (test/vfio/l2-init.sh); output to
#            /out/tests.log (and the console), exit code to /out/tests.rc.
# Console lines the host reads start with "kvmvfio-lane: "; test output
# lines start with "test| ".
PATH=/bin
export PATH
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1

STEP=init
OUT=
up() { read -r u _ < /proc/uptime; echo "$u"; }
say() { echo "kvmvfio-lane: $*"; }
step() { STEP=$1; say "step $STEP uptime=$(up)"; }
finish() {
  say "poweroff rc=$1 uptime=$(up)"
  sync
  [ -n "$OUT" ] && umount /out 2>/dev/null
  poweroff -f
  sleep 10   # poweroff -f does not return; if it did, init exiting panics (panic=-1 ends QEMU)
  exit "$1"
}
fail() {
  say "FAIL step=$STEP: $*"
  [ -n "$OUT" ] && printf '%s\n' "$*" > "$OUT/fail"
  finish 1
}

say "init kernel=$(uname -r) uptime=$(up) cpus=$(grep -c '^processor' /proc/cpuinfo) svm=$(grep -c -w svm /proc/cpuinfo)"

# ------------------------------------------------------------------ modules
step modules
for m in $(cat /lib/modules/order); do
  err=$(insmod "/lib/modules/$m.ko" 2>&1) || fail "insmod $m: $err"
done
say "modules loaded: $(tr '\n' ' ' < /lib/modules/order)"
[ -c /dev/kvm ] || fail "no /dev/kvm after loading kvm_amd ($(dmesg | grep -i -E 'kvm|svm' | tail -3 | tr '\n' ' '))"
[ -c /dev/vfio/vfio ] || fail "no /dev/vfio/vfio after loading vfio"
[ -d /sys/kernel/iommu_groups ] && [ -n "$(ls /sys/kernel/iommu_groups)" ] \
  || fail "no IOMMU groups (is intel_iommu=on on the kernel command line?): $(dmesg | grep -E 'DMAR|IOMMU' | tail -3 | tr '\n' ' ')"

# ------------------------------------------------------------------ share
step share
mkdir -p /out
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 results /out || fail "cannot mount the 9p share 'results'"
OUT=/out
for f in repo node tests test-timeout cdev; do
  [ -s /out/in/$f ] || fail "the lane left no /out/in/$f"
done
read -r REPO < /out/in/repo
read -r NODE < /out/in/node
read -r TEST_TIMEOUT < /out/in/test-timeout
QEMU10=
[ -s /out/in/qemu ] && read -r QEMU10 < /out/in/qemu
read -r CDEV < /out/in/cdev
# The hot-plug test's L2 guest, when the lane packed it (as the chroot sees the share).
L2KERNEL=; L2INITRD=
[ -s /out/in/l2-vmlinuz ] && [ -s /out/in/l2-initrd.cpio ] && L2KERNEL=/run/kvmvfio-lane/in/l2-vmlinuz && L2INITRD=/run/kvmvfio-lane/in/l2-initrd.cpio

# ------------------------------------------------------------------ bind
step bind
BOUND=0
for d in /sys/bus/pci/devices/*; do
  id="$(cat "$d/vendor"):$(cat "$d/device")"
  case "$id" in
    0x1234:0x11e8|0x1b36:0x0005) ;;   # edu, pci-testdev: the lane's VFIO devices
    *) continue ;;
  esac
  a=${d##*/}
  [ -e "$d/driver" ] && echo "$a" > "$d/driver/unbind"
  echo vfio-pci > "$d/driver_override" || fail "driver_override of $a"
  echo "$a" > /sys/bus/pci/drivers_probe
  drv=$(readlink "$d/driver"); drv=${drv##*/}
  [ "$drv" = vfio-pci ] || fail "$a ($id) did not bind to vfio-pci (driver: ${drv:-none}): $(dmesg | grep -F "$a" | tail -2 | tr '\n' ' ')"
  say "bound $a ($id) to vfio-pci"
  BOUND=$((BOUND + 1))
done
[ "$BOUND" -ge 1 ] || fail "no edu or pci-testdev to bind (the lane's QEMU command line has them)"

# ------------------------------------------------------------------ cdev
step cdev
# Every device on vfio-pci has a sysfs vfio-dev/vfioN; only with CONFIG_VFIO_DEVICE_CDEV has it
# a dev number (a "dev" file), and so a node.
# cdev_of ADDRESS: sets c to the device's cdev name ("vfio0"), "" when it has none.
cdev_of() { c=; for x in /sys/bus/pci/devices/$1/vfio-dev/vfio*; do [ -e "$x/dev" ] && c=${x##*/}; done; }
if [ "$CDEV" = 1 ]; then
  [ -c /dev/iommu ] || fail "no /dev/iommu with the rebuilt iommufd loaded: $(dmesg | grep -i -E 'iommufd|taint' | tail -3 | tr '\n' ' ')"
  n=0
  for d in /sys/bus/pci/drivers/vfio-pci/0000:*; do
    a=${d##*/}
    set -- /sys/bus/pci/devices/$a/vfio-dev/vfio*
    [ $# = 1 ] && [ -e "$1" ] || fail "$a on vfio-pci has no single cdev in sysfs (vfio-dev: $(ls "/sys/bus/pci/devices/$a/vfio-dev" 2>&1 | tr '\n' ' ')): vfio without CONFIG_VFIO_DEVICE_CDEV?"
    c=${1##*/}
    read -r want < "$1/dev" || fail "$a has $1 but no dev number: vfio without CONFIG_VFIO_DEVICE_CDEV?"
    [ -c "/dev/vfio/devices/$c" ] || fail "$a: sysfs names cdev $c ($want) but /dev/vfio/devices/$c is not a char device (/dev/vfio/devices: $(ls /dev/vfio/devices 2>&1 | tr '\n' ' '))"
    got=$(stat -c '%t %T' "/dev/vfio/devices/$c")
    set -- $got
    got=$(printf '%d:%d' "0x$1" "0x$2")
    [ "$got" = "$want" ] || fail "/dev/vfio/devices/$c is $got, sysfs says $want"
    say "cdev $a: /dev/vfio/devices/$c ($got)"
    n=$((n + 1))
  done
  [ "$n" = "$BOUND" ] || fail "$BOUND devices bound to vfio-pci, $n on the driver's sysfs list"
  say "cdevs: $n; /dev/iommu $(stat -c '%t:%T' /dev/iommu)"
else
  say "cdevs off (KVMVFIO_LANE_CDEV=0): /dev/iommu $([ -e /dev/iommu ] && echo present || echo absent), /dev/vfio/devices $([ -e /dev/vfio/devices ] && echo present || echo absent)"
fi

# ------------------------------------------------------------------ groups
step groups
# The kernel's rule (Linux >= 5.19): a group is viable when every device in it
# is unbound or on a driver that manages DMA itself (vfio-pci and its family,
# pci-stub, pcieport). Same rule as src/broker/sysfs.ts; the smoke test checks
# it against VFIO_GROUP_GET_STATUS.
safe_driver() {
  case "$1" in
    ''|pci-stub|pcieport|vfio|vfio[-_]*|*[-_]vfio|*[-_]vfio[-_]*) return 0 ;;
  esac
  return 1
}
hexattr() { v=; read -r v < "$1" 2>/dev/null; v=${v#0x}; }   # sets v, no fork

J=/out/groups.json.tmp
VIABLE=; NOT_VIABLE=; SINGLES=0; SHARED_BLOCKED=0
{
  printf '{\n  "kernel": "%s",\n  "groups": [' "$(uname -r)"
  gsep=
  for g in $(ls /sys/kernel/iommu_groups | sort -n); do
    gpath=; [ -c "/dev/vfio/$g" ] && gpath=/dev/vfio/$g
    viable=true; ndev=0; nvfio=0; devs=; blockers=; dsep=; bsep=
    for d in $(ls "/sys/kernel/iommu_groups/$g/devices"); do
      s=/sys/bus/pci/devices/$d
      drv=$(readlink "$s/driver" 2>/dev/null); drv=${drv##*/}
      hexattr "$s/vendor"; ven=$v
      hexattr "$s/device"; dev=$v
      hexattr "$s/class"; cls=$v
      cdev_of "$d"
      devs="$devs$dsep{\"address\": \"$d\", \"vendorId\": \"$ven\", \"deviceId\": \"$dev\", \"classCode\": \"$cls\", \"driver\": \"$drv\", \"cdev\": \"$c\"}"
      dsep=', '
      ndev=$((ndev + 1))
      [ "$drv" = vfio-pci ] && nvfio=$((nvfio + 1))
      if ! safe_driver "$drv"; then
        viable=false
        blockers="$blockers$bsep{\"address\": \"$d\", \"driver\": \"$drv\"}"
        bsep=', '
      fi
      say "group $g: $d [$ven:$dev class $cls] driver=${drv:-none}${c:+ cdev=$c}" >&2
    done
    if [ -n "$gpath" ]; then
      if [ "$viable" = true ]; then
        VIABLE="$VIABLE${VIABLE:+, }$g"
        [ "$ndev" = 1 ] && [ "$nvfio" = 1 ] && SINGLES=$((SINGLES + 1))
      else
        NOT_VIABLE="$NOT_VIABLE${NOT_VIABLE:+, }$g"
        [ "$ndev" -ge 2 ] && [ "$nvfio" -ge 1 ] && SHARED_BLOCKED=$((SHARED_BLOCKED + 1))
      fi
      say "group $g: $gpath viable=$viable devices=$ndev on-vfio-pci=$nvfio" >&2
    fi
    printf '%s\n    {"number": %s, "path": "%s", "viable": %s, "devices": [%s], "blockers": [%s]}' \
      "$gsep" "$g" "$gpath" "$viable" "$devs" "$blockers"
    gsep=,
  done
  printf '\n  ],\n  "viable": [%s],\n  "notViable": [%s]\n}\n' "$VIABLE" "$NOT_VIABLE"
} > "$J" || fail "writing groups.json"
mv "$J" /out/groups.json
say "vfio groups: viable [$VIABLE] not viable [$NOT_VIABLE]; /dev/vfio: $(ls /dev/vfio | tr '\n' ' ')"
[ "$SINGLES" -ge 2 ] || fail "expected >= 2 viable single-device groups on vfio-pci, found $SINGLES (see the group lines above)"
[ "$SHARED_BLOCKED" -ge 1 ] || fail "expected a VFIO group that is not viable (a vfio-pci device beside a device on a kernel driver), found none"

# ------------------------------------------------------------------ chroot
step chroot
ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up
mkdir -p /dev/shm /dev/pts /host
mount -t tmpfs -o mode=1777 shm /dev/shm
mount -t devpts devpts /dev/pts
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot /host \
  || fail "cannot mount the host's / (9p share 'hostroot')"
[ -d "/host$REPO" ] || fail "the repo $REPO is not in the host's / as the guest sees it"
# A repo under /tmp or /run (a CI clone, say) must stay visible under the tmpfs.
mkdir -p /keep
case "$REPO/" in /tmp/*|/run/*) mount --bind "/host$REPO" /keep || fail "bind $REPO" ;; esac
mount --bind /proc /host/proc
mount --bind /sys /host/sys
mount --rbind /dev /host/dev
mount -t tmpfs -o mode=1777 tmpfs /host/tmp
mount -t tmpfs -o mode=755 tmpfs /host/run
case "$REPO/" in
  /tmp/*|/run/*) mkdir -p "/host$REPO" && mount --bind /keep "/host$REPO" || fail "re-bind $REPO" ;;
esac
mkdir -p /host/run/kvmvfio-lane
mount --bind /out /host/run/kvmvfio-lane
[ -x "/host$NODE" ] || fail "node ($NODE) is not executable in the host's /"

# ------------------------------------------------------------------ tests
step tests
set --
while read -r t; do [ -n "$t" ] && set -- "$@" "$t"; done < /out/in/tests
[ $# -gt 0 ] || fail "no test files in /out/in/tests"
say "tests-start uptime=$(up) files: $*"
NODEDIR=${NODE%/*}
# A heartbeat, so the host tells a dead guest (silence) from a test suite that
# prints nothing until it ends (node 20 reports describe() blocks late). A
# hung test is node's --test-timeout's to end; a hung run, the lane's timeout.
( while sleep 20; do
    echo "kvmvfio-lane-alive: uptime=$(up) MemAvailable=$(sed -n 's/^MemAvailable: *//p' /proc/meminfo)"
  done ) &
HEARTBEAT=$!
(
  chroot /host /usr/bin/env -i \
    PATH="$NODEDIR:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
    HOME=/root LANG=C.UTF-8 TMPDIR=/tmp \
    KVMVFIO_GUEST=1 \
    KVMVFIO_GUEST_GROUPS=/run/kvmvfio-lane/groups.json \
    KVMVFIO_GUEST_RESULTS=/run/kvmvfio-lane \
    KVMVFIO_GUEST_CDEV="$CDEV" \
    KVMVFIO_QEMU="$QEMU10" \
    KVMVFIO_L2_KERNEL="$L2KERNEL" KVMVFIO_L2_INITRD="$L2INITRD" \
    /bin/sh -c 'cd "$1" && shift && exec "$@"' sh "$REPO" \
    "$NODE" --test --test-concurrency=1 --test-timeout="$TEST_TIMEOUT" --test-reporter=spec "$@" 2>&1
  echo $? > /out/tests.rc
) | tee /out/tests.log | sed 's/^/test| /'
kill "$HEARTBEAT" 2>/dev/null
read -r RC < /out/tests.rc 2>/dev/null || RC=
say "tests-end uptime=$(up) rc=${RC:-none}"
[ "$RC" = 0 ] || { echo "node --test exited ${RC:-without an exit code} (the test output above says which)" > /out/fail; finish 1; }
finish 0
