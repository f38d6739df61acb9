#!/usr/bin/env bash
# The systemd lane: the shipped units under a real systemd (the host's, 252)
# running as PID 1 in systemd-nspawn, with cgroup v2 inside the container so
# that DevicePolicy=/DeviceAllow= are enforced. Run by `npm run test:systemd`
# (which builds dist/ first) and by .ci/run. Root on Debian 12 with /dev/kvm.
#
#   host                                        container (systemd 252 as PID 1)
#   tiny rootfs: os-release, machine-id,        /usr            = host /usr, read-only (overlay: one
#     passwd/group (root, nobody)                                 extra layer adds the files below)
#   lane dir/usr-extra:                         /usr/lib/node_modules/kvmvfiod = this checkout, read-only
#     lib/systemd/system/kvmvfiod{.service,       (where `npm install -g .` puts it; ExecStart runs
#       .socket,-handoff.socket} as shipped        /usr/bin/node .../dist/src/daemon/main.js)
#     lib/sysusers.d/kvmvfiod.conf              /dev/kvm        = host /dev/kvm
#     lib/tmpfiles.d/kvmvfiod.conf              `systemctl enable --now` of both sockets, as the README says
#
# The client (dist/src/cli/main.js) runs on the host and reaches the daemon
# through the container's socket, /proc/<container PID 1>/root/run/kvmvfiod/
# api.sock; it connects as uid 0. The reference VMM (dist/src/vmm/
# reference.js) runs INSIDE the container as a transient unit of its own
# (systemd-run, User=nobody, no /dev access): the daemon's peer credentials,
# pidfd and prlimit then name a process of its own pid namespace, as on a real
# host, and the VMM is not in the daemon's cgroup, so no stop of the daemon
# signals it. Its JSON lines are read from the journal.
#
# Nothing of the units is changed for the lane, but for one drop-in in the
# step "kernel without SO_PEERPIDFD", removed after it. (The daemon's
# watchdog test hook is armed through the container manager's environment,
# `systemctl set-environment`, not through the unit.) What the sandbox
# needs goes on the nspawn command line instead: CAP_BPF, CAP_NET_ADMIN,
# CAP_PERFMON and bpf() for the device and IP firewall programs
# (../shared/labs/systemd), and CAP_SYS_RESOURCE, which nspawn's default set
# lacks: without it in the container, the daemon cannot keep it and systemd
# cannot raise the fd hard limit to LimitNOFILE=. Where the lane itself runs
# without it (this machine kind: no CAP_SYS_RESOURCE in the bounding set, an
# fd hard limit of 20000), systemd applies the hard limit instead of 65536 and
# says so in the journal; the checks expect what the container can give, and
# the memlock check (prlimit of another uid's VMM) is skipped, said so.
#
# Checks, each counted, then `N passed, N failed`:
#   boot         the container's systemd runs; sysusers made the kvmvfio group,
#                tmpfiles the directories; enabling the sockets starts them; the
#                service is not running yet
#   activation   the first API call starts the service through its socket; the
#                daemon took both listening fds by name (its log), bound nothing
#   readiness    `systemctl start` returns once READY=1 came (the manager's debug
#                log shows it), active/running, StatusText with counts
#   sandbox      the running daemon: capabilities CAP_KILL+CAP_SYS_RESOURCE+CAP_SYS_PTRACE+CAP_DAC_READ_SEARCH only (of
#                what the container has), no_new_privs, seccomp, 65536 fds (or the
#                host's hard limit when lower), /usr, /etc, /run read-only and the
#                state directory writable, PID 1's private socket and D-Bus out of
#                reach; a process put into the unit's cgroup may open /dev/kvm but
#                not another device (DevicePolicy=closed enforced)
#   security     `systemd-analyze security` of the live unit
#   vmm          a VM for uid 65534; the reference VMM attaches, runs its guest;
#                RUNNING; its RLIMIT_MEMLOCK raised by the daemon (only where the host
#                gives CAP_SYS_RESOURCE); the status counts follow; the fd store
#                holds /dev/kvm, its session and its pidfd
#   crash, restart, watchdog
#                SIGKILL of the main process (Restart=on-failure), `systemctl
#                restart`, and an event loop stuck for longer than WatchdogSec= (the
#                daemon's test hook: SIGUSR2 blocks its loop, armed by
#                KVMVFIOD_TEST_STALL_ON_SIGUSR2; only the loop stops, so the
#                pings must come from it): each time a new daemon pid, the fd store passed
#                back, the same VMs and groups listed, the VMM still the same
#                process and attached once, and a request after the restart
#                answered by the VMM's kernel (CreateVfioDevice again:
#                ALREADY_EXISTS, the VMM logging EBUSY)
#   crash loop   six SIGKILLs in a row, more starts than the default start limit
#                (5 in 10 s) allows: with StartLimitIntervalSec=0 the unit never
#                fails, so its store is never released; the same checks after
#   flush        `systemctl stop` then `start`: the store is released, the VMM sees
#                its session end and exits; the new daemon does not list it RUNNING
#   handoff activation
#                with the service stopped, a VMM connecting to handoff.sock starts it
#                (and is refused: its token is made up)
#   force delete DeleteVm --force SIGKILLs a VMM of another uid (CAP_KILL); its session
#                and pidfd leave the fd store (FDSTOREREMOVE=1)
#   sockets stop stopping the sockets stops the service and removes the socket files
#
# Environment:
#   KVMVFIO_SYSTEMD_LANE_DIR   rootfs, logs (default /tmp/kvmvfio-systemd-lane)
#   KVMVFIO_SYSTEMD_LANE_KEEP=1  leave the container running at the end (prints how to reach it)
#   KVMVFIO_SYSTEMD_LANE_WAIT  the bound of each wait, seconds (default 30)
set -uo pipefail
export LC_ALL=C DEBIAN_FRONTEND=noninteractive SYSTEMD_COLORS=0 SYSTEMD_PAGER=

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd -P)
LANE=${KVMVFIO_SYSTEMD_LANE_DIR:-/tmp/kvmvfio-systemd-lane}
KEEP=${KVMVFIO_SYSTEMD_LANE_KEEP:-0}
WAIT=${KVMVFIO_SYSTEMD_LANE_WAIT:-30}
MACHINE=kvmvfio-sd
INSTALL=/usr/lib/node_modules/kvmvfiod
UNIT=kvmvfiod.service
ROOT=$LANE/rootfs
EXTRA=$LANE/usr-extra
LOGS=$LANE/logs

# ------------------------------------------------------------------ helpers
T0=${EPOCHREALTIME/./}
now_us() { echo "${EPOCHREALTIME/./}"; }
fmt_s() { printf '%d.%01d' $(($1 / 1000000)) $((($1 % 1000000) / 100000)); }
since() { fmt_s $(($(now_us) - $1)); }
log() { echo "[systemd-lane $(since "$T0")s] $*"; }
declare -a TIMINGS=()
timing() { TIMINGS+=("$(printf '%-34s %6s s' "$1" "$2")"); }
print_timings() {
  echo "== timings"
  local t; for t in "${TIMINGS[@]}"; do echo "  $t"; done
  printf '  %-34s %6s s\n' total "$(since "$T0")"
}
PASSED=0 FAILED=0
declare -a FAILURES=()
pass() { PASSED=$((PASSED + 1)); echo "ok   $1${2:+: $2}"; }
fail() { FAILED=$((FAILED + 1)); FAILURES+=("$1"); echo "FAIL $1${2:+: $2}"; }
check() {   # check NAME DETAIL CMD...: pass when CMD succeeds
  local name=$1 detail=$2; shift 2
  if "$@"; then pass "$name" "$detail"; else fail "$name" "$detail"; fi
}
abort() {   # setup could not be done: no test can run
  echo "systemd lane: FAILED during setup: $1"
  [ -n "${2:-}" ] && [ -f "$2" ] && { echo "---- last lines of $2"; tail -n 30 "$2"; echo "----"; }
  print_timings
  exit 1
}

NSPAWN_PID= LEADER=
ct() { nsenter -t "$LEADER" -a env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin SYSTEMD_COLORS=0 SYSTEMD_PAGER= "$@"; }
sctl() { timeout "$WAIT" nsenter -t "$LEADER" -a env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin SYSTEMD_COLORS=0 systemctl --no-pager "$@"; }
prop() { ct systemctl show -P "$2" "$1" 2>/dev/null; }   # prop UNIT PROPERTY
API() { echo "/proc/$LEADER/root/run/kvmvfiod/api.sock"; }
cli() { timeout "$WAIT" node "$REPO/dist/src/cli/main.js" --socket "$(API)" --timeout 10000 "$@"; }
# wait_until SECONDS CMD...: poll every 0.2 s
wait_until() {
  local end=$(($(now_us) + $1 * 1000000)); shift
  while [ "$(now_us)" -lt $end ]; do "$@" > /dev/null 2>&1 && return 0; sleep 0.2; done
  return 1
}
# journal lines since a cursor: jsince CURSOR [journalctl args]
cursor() { ct journalctl -q -n 0 --show-cursor | sed -n 's/^-- cursor: //p'; }
jsince() { local c=$1; shift; ct journalctl -q --no-pager --after-cursor="$c" "$@"; }
# The daemon's own lines (SyslogIdentifier=kvmvfiod) since a cursor: djl CURSOR. Filtered here,
# not with -t: journalctl --after-cursor skips the first entry that matches a filter when the
# cursor's own entry does not match it (the first line of each start went missing that way).
djl() {
  jsince "$1" -o json --output-fields=SYSLOG_IDENTIFIER,MESSAGE | node -e '
    for (const l of require("fs").readFileSync(0, "utf8").split("\n")) {
      if (!l) continue;
      const o = JSON.parse(l);
      if (o.SYSLOG_IDENTIFIER === "kvmvfiod") console.log(Array.isArray(o.MESSAGE) ? Buffer.from(o.MESSAGE).toString() : o.MESSAGE);
    }'
}
# wait_line SECONDS CURSOR PATTERN: until the daemon logs a line matching PATTERN (grep -E)
wait_line() {
  local end=$(($(now_us) + $1 * 1000000))
  while [ "$(now_us)" -lt $end ]; do djl "$2" | grep -qE "$3" && return 0; sleep 0.2; done
  return 1
}
# js EXPR: evaluates EXPR with `o` = the JSON on stdin, prints strings as is, the rest as JSON
js() { node -e 'let o; try { o = JSON.parse(require("fs").readFileSync(0, "utf8")); } catch { o = null; } let v; try { v = ('"$1"'); } catch { v = undefined; } process.stdout.write(v === undefined ? "" : typeof v === "string" ? v : JSON.stringify(v));'; }
main_pid() { prop "$UNIT" MainPID; }
# a file of the container's /proc (its pid namespace): cproc PID FILE
cproc() { cat "/proc/$LEADER/root/proc/$1/$2" 2> /dev/null; }

cleanup() {
  local rc=$?
  if [ -n "$NSPAWN_PID" ] && kill -0 "$NSPAWN_PID" 2> /dev/null; then
    if [ "$KEEP" = 1 ]; then
      echo "container kept: nsenter -t $LEADER -a systemctl status $UNIT; stop it with: kill -TERM $NSPAWN_PID"
      return $rc
    fi
    [ -n "$LEADER" ] && ct journalctl -b -q --no-pager -o short-monotonic > "$LOGS/journal.txt" 2>&1
    # nspawn forwards SIGTERM to the container's systemd as SIGRTMIN+3: an orderly halt.
    kill -TERM "$NSPAWN_PID" 2> /dev/null
    local i; for i in $(seq 100); do kill -0 "$NSPAWN_PID" 2> /dev/null || break; sleep 0.1; done
    kill -0 "$NSPAWN_PID" 2> /dev/null && kill -KILL "$NSPAWN_PID" 2> /dev/null
    wait "$NSPAWN_PID" 2> /dev/null
  fi
  # Without a host systemd (--keep-unit, no scope), nspawn leaves empty payload/supervisor
  # cgroups at the roots of the hierarchies; rmdir, depth first, removes only empty ones.
  local h d
  for h in /sys/fs/cgroup/ /sys/fs/cgroup/*/; do
    for d in payload supervisor; do
      [ -d "$h$d" ] && find "$h$d" -depth -type d -exec rmdir {} \; 2> /dev/null
    done
  done
  rmdir "/run/systemd/nspawn/propagate/$MACHINE" 2> /dev/null
  return $rc
}

# ------------------------------------------------------------------ setup
[ "$(id -u)" = 0 ] || abort "run as root (nspawn, nsenter)"
[ -e /dev/kvm ] || abort "no /dev/kvm"
mkdir -p "$LANE" "$LOGS" || abort "cannot create $LANE"
exec 9> "$LANE/.lock"
flock -n 9 || abort "another lane run holds $LANE/.lock"
trap cleanup EXIT
trap 'exit 130' INT TERM

log "step packages"
t=$(now_us)
if ! command -v systemd-nspawn > /dev/null; then
  # The same version as the installed systemd, never an upgrade of it (libsystemd0, udev...).
  V=$(dpkg-query -W -f='${Version}' systemd) || abort "systemd is not installed"
  log "installing systemd-container=$V"
  if ! apt-get install -y -q --no-install-recommends --no-upgrade "systemd-container=$V" > "$LOGS/apt.log" 2>&1; then
    apt-get update -q >> "$LOGS/apt.log" 2>&1
    apt-get install -y -q --no-install-recommends --no-upgrade "systemd-container=$V" >> "$LOGS/apt.log" 2>&1 \
      || abort "apt-get install systemd-container=$V failed (is that version still in the archive?)" "$LOGS/apt.log"
  fi
fi
for c in systemd-nspawn nsenter flock timeout node; do command -v "$c" > /dev/null || abort "$c is not installed"; done
timing "packages" "$(since "$t")"

for f in dist/src/daemon/main.js dist/src/cli/main.js dist/src/vmm/reference.js node_modules/koffi/package.json; do
  [ -e "$REPO/$f" ] || abort "$REPO/$f is missing: run npm ci && npm run build (npm run test:systemd does)"
done

log "step gates"
t=$(now_us)
bash "$REPO/test/systemd/gates.sh" > "$LOGS/gates.txt" 2>&1
grc=$?
sed 's/^/  /' "$LOGS/gates.txt"
if [ $grc = 0 ]; then pass gates "verify, security, tmpfiles, sysusers"; else fail gates "see above"; fi
timing "static gates" "$(since "$t")"

log "step rootfs"
t=$(now_us)
rm -rf "$ROOT" "$EXTRA" || abort "cannot clear $ROOT"
mkdir -p "$ROOT"/{usr,etc/systemd/system,var/tmp,run,tmp,proc,sys,dev,root} || abort "mkdir rootfs"
for l in bin lib lib64 sbin; do ln -s "usr/$l" "$ROOT/$l"; done
cp /usr/lib/os-release "$ROOT/etc/os-release"   # nspawn wants an os-release before it mounts /usr
systemd-id128 new > "$ROOT/etc/machine-id"       # a valid machine-id: no first-boot setup
echo "$MACHINE" > "$ROOT/etc/hostname"
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n' > "$ROOT/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' > "$ROOT/etc/group"
printf 'root:*:19000:0:99999:7:::\n' > "$ROOT/etc/shadow" && chmod 640 "$ROOT/etc/shadow"
cp /etc/nsswitch.conf "$ROOT/etc/"
ln -s /usr/lib/systemd/system/multi-user.target "$ROOT/etc/systemd/system/default.target"
chmod 1777 "$ROOT/tmp" "$ROOT/var/tmp"
# The extra /usr layer: the package's files where a package puts them, and the mount point of the checkout.
mkdir -p "$EXTRA/lib/systemd/system" "$EXTRA/lib/sysusers.d" "$EXTRA/lib/tmpfiles.d" "$EXTRA/lib/node_modules/kvmvfiod"
cp "$REPO/systemd/kvmvfiod.service" "$REPO/systemd/kvmvfiod.socket" "$REPO/systemd/kvmvfiod-handoff.socket" "$EXTRA/lib/systemd/system/"
cp "$REPO/systemd/kvmvfiod.sysusers" "$EXTRA/lib/sysusers.d/kvmvfiod.conf"
cp "$REPO/systemd/kvmvfiod.tmpfiles" "$EXTRA/lib/tmpfiles.d/kvmvfiod.conf"
# The test wrapper that hides SO_PEERPIDFD (step "kernel without SO_PEERPIDFD"); not part of the package.
mkdir -p "$EXTRA/lib/kvmvfiod-lane"
gcc -O2 -Wall -Wextra -Werror -std=c11 -D_GNU_SOURCE -o "$EXTRA/lib/kvmvfiod-lane/no-peerpidfd" "$REPO/test/helpers/no-peerpidfd.c" \
  || abort "building test/helpers/no-peerpidfd.c"
timing "rootfs" "$(since "$t")"

log "step boot"
t=$(now_us)
SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1 systemd-nspawn -D "$ROOT" -M "$MACHINE" --register=no --keep-unit -b --console=pipe \
  --overlay-ro="/usr:$EXTRA:/usr" --bind-ro="$REPO:$INSTALL" --bind=/dev/kvm \
  --capability=CAP_SYS_RESOURCE,CAP_BPF,CAP_NET_ADMIN,CAP_PERFMON --system-call-filter=bpf \
  < /dev/null > "$LOGS/console.log" 2>&1 &
NSPAWN_PID=$!
for _ in $(seq 100); do
  for c in $(pgrep -P "$NSPAWN_PID" 2> /dev/null); do [ "$(cat "/proc/$c/comm" 2> /dev/null)" = systemd ] && LEADER=$c; done
  [ -n "$LEADER" ] && break
  kill -0 "$NSPAWN_PID" 2> /dev/null || break
  sleep 0.1
done
[ -n "$LEADER" ] || abort "no systemd in the container" "$LOGS/console.log"
# systemctl needs /run/systemd/private, which the container's systemd makes a little after it starts.
wait_until "$WAIT" test -S "/proc/$LEADER/root/run/systemd/private" || abort "the container's systemd never listened" "$LOGS/console.log"
st=$(timeout "$WAIT" nsenter -t "$LEADER" -a systemctl is-system-running --wait 2>&1)
timing "boot (nspawn to running)" "$(since "$t")"
log "container: $(ct systemctl --version | head -n1), leader $LEADER, state $st, cgroup $(ct stat -fc %T /sys/fs/cgroup)"
case $st in running | degraded) ;; *) abort "the container's systemd is $st" "$LOGS/console.log" ;; esac
[ "$st" = degraded ] && ct systemctl --failed --no-legend | sed 's/^/  failed unit: /'
# What the container may give its services: the bounding set and the fd hard limit of its PID 1.
CT_BND=$(awk '/^CapBnd:/ { print $2 }' "/proc/$LEADER/status")
CT_NOFILE=$(awk '/^Max open files/ { print $5 }' "/proc/$LEADER/limits")
HAVE_RESOURCE_NOTE=
(( (0x$CT_BND >> 24) & 1 )) || HAVE_RESOURCE_NOTE=" (not on this host: nspawn itself runs without it)"
log "container PID 1: CapBnd $CT_BND, open files hard limit $CT_NOFILE"
# The manager's debug log shows each notification (READY=1, FDSTORE=1, WATCHDOG=1...).
ct systemd-analyze log-level debug

# ------------------------------------------------------------------ tests
T_TESTS=$(now_us)
log "step boot checks"
g=$(ct getent group kvmvfio)
check sysusers "group ${g:-missing}" test -n "$g"
d=$(ct stat -c '%a %U:%G %n' /run/kvmvfiod /var/lib/kvmvfiod /etc/kvmvfiod 2>&1 | paste -sd, -)
check tmpfiles "$d" test "$d" = "755 root:root /run/kvmvfiod,700 root:root /var/lib/kvmvfiod,755 root:root /etc/kvmvfiod"
out=$(sctl enable --now kvmvfiod.socket kvmvfiod-handoff.socket 2>&1)
en=$(ct systemctl is-enabled kvmvfiod.socket kvmvfiod-handoff.socket | paste -sd' ' -)
act=$(ct systemctl is-active kvmvfiod.socket kvmvfiod-handoff.socket $UNIT | paste -sd' ' -)
socks=$(ct stat -c '%A %U:%G %n' /run/kvmvfiod/api.sock /run/kvmvfiod/handoff.sock 2>&1 | paste -sd' ' -)
check "enable sockets" "enabled: $en; active (api, handoff, service): $act; $socks" \
  test "$en; $act; $socks" = "enabled enabled; active active inactive; srw-rw-rw- root:root /run/kvmvfiod/api.sock srw-rw-rw- root:root /run/kvmvfiod/handoff.sock"
[ -n "$out" ] && echo "$out" | sed 's/^/       | /'

# The daemon's test hook for the watchdog check: SIGUSR2 blocks its event loop this long. Set in
# the container manager's environment (every service it starts gets it), not in the unit.
STALL=30
ct systemctl set-environment KVMVFIOD_TEST_STALL_ON_SIGUSR2=$STALL

log "step activation"
c=$(cursor)
t=$(now_us)
info=$(cli --json info 2>&1)
ta=$(since "$t")
ver=$(echo "$info" | js 'o.daemon_version ?? o.daemonVersion ?? (o && Object.keys(o).join(","))')
check "activation (api)" "first call answered in ${ta}s (daemon ${ver:-?}); service $(prop $UNIT ActiveState)" \
  test "$(prop $UNIT ActiveState)" = active -a -n "$ver"
[ -n "$ver" ] || echo "$info" | head -n 5 | sed 's/^/       | /'
wait_line 10 "$c" '"event":"ready"'
jl=$(djl "$c")
names=$(echo "$jl" | grep '"event":"fds-from-systemd"' | head -n1 | js 'o.names.slice().sort().join(":")')
listening=$(echo "$jl" | grep -cE '"event":"(api|handoff)-listening".*"activated":true')
check "activation by name" "fds-from-systemd names: ${names:-none}; listeners from systemd: $listening of 2" \
  test "$names" = "api:handoff" -a "$listening" = 2

log "step readiness"
sctl stop $UNIT > /dev/null 2>&1
c=$(cursor)
t=$(now_us)
sctl start $UNIT
rc=$?
ts=$(since "$t")
st="$(prop $UNIT ActiveState)/$(prop $UNIT SubState)"
status=$(prop $UNIT StatusText)
ready=$(jsince "$c" -o cat | grep -m1 -E 'Got notification message from PID [0-9]+ \(READY=1' )
check readiness "systemctl start rc=$rc after ${ts}s, $st, manager: ${ready:-no READY=1 seen}" \
  test $rc = 0 -a "$st" = active/running -a -n "$ready"
check status "StatusText=\"$status\"" bash -c '[[ $1 =~ [0-9]+\ VMs ]]' _ "$status"
check "type and access" "$(prop $UNIT Type) $(prop $UNIT NotifyAccess) watchdog $(prop $UNIT WatchdogUSec)" \
  test "$(prop $UNIT Type) $(prop $UNIT NotifyAccess)" = "notify main"

log "step sandbox"
MP=$(main_pid)
caps=$(cproc "$MP" status | awk '/^CapEff:/ { print $2 }')
bnd=$(cproc "$MP" status | awk '/^CapBnd:/ { print $2 }')
nnp=$(cproc "$MP" status | awk '/^NoNewPrivs:/ { print $2 }')
sec=$(cproc "$MP" status | awk '/^Seccomp:/ { print $2 }')
nofile=$(cproc "$MP" limits | awk '/^Max open files/ { print $4 "/" $5 }')
# CAP_DAC_READ_SEARCH = bit 2, CAP_KILL = bit 5, CAP_SYS_PTRACE = bit 19, CAP_SYS_RESOURCE = bit 24:
# what the unit keeps, of what the container has
want=$(printf '%016x' $((0x1080024 & 0x$CT_BND)))
check capabilities "CapEff=$caps CapBnd=$bnd (want $want: CAP_DAC_READ_SEARCH, CAP_KILL, CAP_SYS_PTRACE, CAP_SYS_RESOURCE$HAVE_RESOURCE_NOTE), NoNewPrivs=$nnp, Seccomp=$sec" \
  test "$caps/$bnd/$nnp/$sec" = "$want/$want/1/2"
# LimitNOFILE=65536, or the container's hard limit when it is lower and cannot be raised
# (systemd then logs "Will attempt setting value N instead"; no drop-in needed).
wantfd=$((CT_NOFILE < 65536 ? CT_NOFILE : 65536))
check "fd limit" "open files soft/hard $nofile (want $wantfd/$wantfd; container hard limit $CT_NOFILE); store max $(prop $UNIT FileDescriptorStoreMax)" \
  test "$nofile" = "$wantfd/$wantfd"
# The daemon's own view of the file system (its mount namespace).
ro=$(ct nsenter -t "$MP" -m sh -c 'for f in /usr/lib/x /etc/x /run/kvmvfiod/x /var/lib/kvmvfiod/x; do if touch $f 2>/dev/null; then rm -f $f; echo "$f writable"; else echo "$f read-only"; fi; done' | paste -sd, -)
check "read-only file system" "$ro" test "$ro" = "/usr/lib/x read-only,/etc/x read-only,/run/kvmvfiod/x read-only,/var/lib/kvmvfiod/x writable"
# InaccessiblePaths=: from the daemon's mount namespace, neither PID 1's private socket nor D-Bus answers.
bus=$(ct nsenter -t "$MP" -m timeout 10 systemctl is-system-running 2>&1 | head -n 1)
check "no PID 1, no D-Bus" "systemctl from the daemon's mount namespace: $bus" bash -c '[[ $1 == "Failed to connect to bus"* ]]' _ "$bus"
# DevicePolicy=closed: a process put into the unit's cgroup may open /dev/kvm (DeviceAllow=) but
# not a device left out; /dev/fuse's numbers (10:229) on a scratch node: EPERM is the BPF device
# program's verdict (with the device allowed, the open would go on to the driver).
cg=$(ct sh -c "sed -n 's/^0:://p' /proc/$MP/cgroup")
dev=$(ct sh -c "rm -f /dev/lane-fuse && mknod /dev/lane-fuse c 10 229 && echo \$\$ > '/sys/fs/cgroup$cg/cgroup.procs' && exec /usr/bin/node -e '
  const fs = require(\"fs\"); const r = [];
  for (const p of [\"/dev/kvm\", \"/dev/lane-fuse\"]) { try { fs.closeSync(fs.openSync(p, \"r+\")); r.push(p + \" ok\"); } catch (e) { r.push(p + \" \" + e.code); } }
  console.log(r.join(\", \"));'" 2>&1)
ct rm -f /dev/lane-fuse
check "device policy" "in $cg: $dev" test "$dev" = "/dev/kvm ok, /dev/lane-fuse EPERM"

log "step security"
sec=$(ct systemd-analyze security --no-pager $UNIT 2>&1)
score=$(echo "$sec" | sed -n 's/.*Overall exposure level for kvmvfiod.service: \([0-9.]*\).*/\1/p')
check "security (live unit)" "exposure ${score:-?}" awk -v s="${score:-99}" 'BEGIN { exit !(s <= 2.0) }'

log "step vmm"
VM=lane-vm
VMM=kvmvfio-vmm-lane
GROUPS0=$(cli --json groups 2>&1 | js 'o.groups')
# --memlock makes the daemon prlimit the VMM, a process of another uid: CAP_SYS_RESOURCE.
MEMLOCK=(); [ -z "$HAVE_RESOURCE_NOTE" ] && MEMLOCK=(--memlock 64M)
created=$(cli --json vm create $VM --vmm-uid 65534 --vfio-device "${MEMLOCK[@]}" --label lane=systemd 2>&1)
VMID=$(echo "$created" | js 'o.vm.id')
TOKEN=$(echo "$created" | js 'o.attach_token.token')
[ -n "$TOKEN" ] || echo "$created" | head -n 5 | sed 's/^/       | /'
# The VMM: its own transient unit, uid 65534, no device at all (DevicePolicy=closed): what it
# gets, it gets from kvmvfiod over the handoff socket.
ct systemd-run --quiet --unit=$VMM --property=User=nobody --property=Group=nogroup --property=DevicePolicy=closed \
  --property=NoNewPrivileges=yes --property=SyslogIdentifier=lane-vmm --setenv=KVMVFIO_TOKEN="$TOKEN" \
  /usr/bin/node $INSTALL/dist/src/vmm/reference.js --socket /run/kvmvfiod/handoff.sock > "$LOGS/systemd-run.txt" 2>&1
vmm_lines() { ct journalctl -q --no-pager -t lane-vmm -o cat | grep '^{'; }
vm_json() { cli --json vm get $VM 2>/dev/null; }
vm_state() { vm_json | js 'o.vm ? o.vm.state : o.state'; }
running() { [ "$(vm_state)" = VM_STATE_RUNNING ]; }
wait_until "$WAIT" running
VMM_PID=$(prop $VMM MainPID)
guest=$(vmm_lines | grep '"event":"guest"' | head -n1)
check "vmm attach" "VM $VMID $(vm_state), VMM pid $VMM_PID uid $(ct stat -c %u /proc/$VMM_PID 2>/dev/null), guest: ${guest:-none}" running
memlock=$(cproc "$VMM_PID" limits | awk '/^Max locked memory/ { print $4 }')
if [ -z "$HAVE_RESOURCE_NOTE" ]; then
  check "vmm memlock (prlimit, CAP_SYS_RESOURCE)" "VMM RLIMIT_MEMLOCK soft $memlock (asked 64M = 67108864)" test "$memlock" = 67108864
else
  echo "skip vmm memlock: this host gives no CAP_SYS_RESOURCE to the container (VMM RLIMIT_MEMLOCK stays $memlock)"
fi
wait_until 12 bash -c "[[ \"\$(nsenter -t $LEADER -a systemctl show -P StatusText $UNIT)\" == *'1 running'* ]]"
status=$(prop $UNIT StatusText)
check "status counts" "\"$status\"" bash -c '[[ $1 == *"1 running"* ]]' _ "$status"
nstore=$(prop $UNIT NFileDescriptorStore)
check "fd store" "NFileDescriptorStore=$nstore (kvm, session-$VMID, pidfd-$VMID)" test "${nstore:-0}" -ge 3

# What every restart must keep: the VMs and groups as listed now, the VMM's process, one attach.
snapshot() { cli --json vm list 2>/dev/null | js 'o.vms.map(v => [v.id, v.name, v.state, v.vmm_pid, v.vfio_device, v.groups].join("|")).join(";")'; }
VMS0=$(snapshot)
log "  VMs: $VMS0; groups: $GROUPS0"
# after_restart NAME OLD_MAIN_PID CURSOR: the checks after each kind of restart
after_restart() {
  local name=$1 old=$2 c=$3 newpid jl restored st vms groups alive attached req0 req1 answer
  wait_until "$WAIT" bash -c "p=\$(nsenter -t $LEADER -a systemctl show -P MainPID $UNIT); s=\$(nsenter -t $LEADER -a systemctl show -P ActiveState $UNIT); [ \"\$s\" = active ] && [ \"\$p\" != 0 ] && [ \"\$p\" != $old ]"
  newpid=$(main_pid)
  st="$(prop $UNIT ActiveState)/$(prop $UNIT SubState)"
  wait_line 10 "$c" '"event":"ready"'
  jl=$(djl "$c")
  restored=$(echo "$jl" | grep -m1 '"event":"restored"' | js '`vms ${o.vms}, claims ${o.claims}, sessions ${o.sessions}`')
  passed=$(echo "$jl" | grep -m1 '"event":"fds-from-systemd"' | js 'o.count')
  check "$name: daemon back" "pid $old -> $newpid, $st, NRestarts=$(prop $UNIT NRestarts), fds passed back: ${passed:-0}, restored: ${restored:-nothing}" \
    test "$st" = active/running -a "$newpid" != "$old" -a -n "$restored"
  vms=$(snapshot)
  groups=$(cli --json groups 2>&1 | js 'o.groups')
  check "$name: same VMs and groups" "VMs: ${vms:-none}; groups: ${groups:-?}" test "$vms" = "$VMS0" -a "$groups" = "$GROUPS0"
  alive=$(prop $VMM MainPID)
  attached=$(vmm_lines | grep -c '"event":"attached"')
  check "$name: VMM kept running" "VMM pid $VMM_PID -> $alive ($(prop $VMM ActiveState)), attached $attached time(s), closed: $(vmm_lines | grep -c '"event":"closed"')" \
    test "$alive" = "$VMM_PID" -a "$attached" = 1
  req0=$(vmm_lines | grep -c '"event":"request"')
  answer=$(cli vm vfio-device $VM 2>&1 | head -n 1)
  wait_until 5 bash -c "[ \$(nsenter -t $LEADER -a journalctl -q --no-pager -u $VMM -o cat | grep -c '\"event\":\"request\"') -gt $req0 ]"
  req1=$(vmm_lines | grep '"event":"request"' | tail -n 1)
  check "$name: VMM answers" "CreateVfioDevice again -> ${answer:-nothing}; VMM: ${req1:-no request seen} (errno 16 = EBUSY)" \
    bash -c '[[ $1 == *ALREADY_EXISTS* && $2 == *\"errno\":16* && $3 -gt $4 ]]' _ "$answer" "$req1" "$(vmm_lines | grep -c '"event":"request"')" "$req0"
}

log "step crash (SIGKILL, Restart=on-failure)"
t=$(now_us)
old=$(main_pid); c=$(cursor)
sctl kill --signal=SIGKILL --kill-who=main $UNIT
after_restart crash "$old" "$c"
timing "crash: kill to checked" "$(since "$t")"

log "step systemctl restart"
t=$(now_us)
old=$(main_pid); c=$(cursor)
sctl restart $UNIT
after_restart restart "$old" "$c"
timing "restart: restart to checked" "$(since "$t")"

log "step watchdog (the event loop stalled for ${STALL}s; WatchdogSec=$(prop $UNIT WatchdogUSec))"
t=$(now_us)
old=$(main_pid); c=$(cursor)
ct kill -USR2 "$old"
wait_until $((WAIT + 15)) bash -c "nsenter -t $LEADER -a journalctl -q --no-pager --after-cursor='$c' -o cat | grep -q 'kvmvfiod.service: Watchdog timeout'"
wd=$(jsince "$c" -o cat | grep -m1 'kvmvfiod.service: Watchdog timeout')
how=$(jsince "$c" -o cat | grep -m1 'kvmvfiod.service: Main process exited')
stalled=$(djl "$c" | grep -m1 -o '"event":"test-stall"[^}]*')
check "watchdog: caught" "daemon: ${stalled:-no test-stall line (hook not armed?)}; manager: ${wd:-no watchdog timeout} after $(since "$t")s; ${how#kvmvfiod.service: }" \
  test -n "$wd" -a -n "$stalled"
after_restart watchdog "$old" "$c"
timing "watchdog: stall to checked" "$(since "$t")"

log "step crash loop (6 SIGKILLs in a row: more starts than the default start limit allows)"
t=$(now_us)
for i in 1 2 3 4 5; do
  old=$(main_pid)
  sctl kill --signal=SIGKILL --kill-who=main $UNIT
  wait_until "$WAIT" bash -c "p=\$(nsenter -t $LEADER -a systemctl show -P MainPID $UNIT); [ \"\$(nsenter -t $LEADER -a systemctl show -P ActiveState $UNIT)\" = active ] && [ \"\$p\" != 0 ] && [ \"\$p\" != $old ]"
done
old=$(main_pid); c=$(cursor)
sctl kill --signal=SIGKILL --kill-who=main $UNIT
after_restart "crash loop" "$old" "$c"
timing "crash loop: 6 kills to checked" "$(since "$t")"

log "step flush (systemctl stop, then start)"
t=$(now_us)
c=$(cursor)
sctl stop $UNIT 2> /dev/null   # (its warning: the sockets can still start it)
nstore=$(prop $UNIT NFileDescriptorStore)
wait_until "$WAIT" bash -c "nsenter -t $LEADER -a journalctl -q --no-pager -u $VMM -o cat | grep -q '\"event\":\"closed\"'"
closed=$(vmm_lines | grep -m1 '"event":"closed"')
wait_until 10 bash -c "[ \"\$(nsenter -t $LEADER -a systemctl is-active $VMM)\" != active ]"
check "flush: VMM session ended" "store after stop: ${nstore:-?}; VMM: ${closed:-no closed event}; VMM unit $(ct systemctl is-active $VMM)" \
  test "$nstore" = 0 -a -n "$closed"
c2=$(cursor)
sctl start $UNIT
st=$(vm_state)
wait_line 10 "$c2" '"event":"ready"'
aside=$(djl "$c2" | grep -m1 -o '"event":"state-set-aside"[^}]*')
check "flush: fresh start" "$(prop $UNIT ActiveState); VM $VM now: ${st:-not listed}; ${aside:-no state-set-aside line}" \
  test "$(prop $UNIT ActiveState)" = active -a "$st" != VM_STATE_RUNNING
timing "flush" "$(since "$t")"

log "step handoff activation"
sctl stop $UNIT > /dev/null 2>&1
ct timeout "$WAIT" systemd-run --quiet --wait --collect --unit=kvmvfio-vmm-bogus --property=User=nobody --property=SyslogIdentifier=lane-vmm-bogus \
  --setenv=KVMVFIO_TOKEN=not-a-token /usr/bin/node $INSTALL/dist/src/vmm/reference.js > /dev/null 2>&1
refused=$(ct journalctl -q --no-pager -t lane-vmm-bogus -o cat | grep -m1 '"event":"attach-refused"')
# The daemon may answer the VMM a moment before its READY=1 (the state file is flushed last): wait for it.
unit_active() { [ "$(prop $UNIT ActiveState)" = active ]; }
wait_until "$WAIT" unit_active || true
check "activation (handoff)" "service $(prop $UNIT ActiveState) after a VMM's connect; VMM: ${refused:-no refusal seen}" \
  test "$(prop $UNIT ActiveState)" = active -a -n "$refused"

log "step force delete (CAP_KILL)"
# DeleteVm --force kills the VMM, a process of another uid, through its pidfd: CAP_KILL.
created=$(cli --json vm create lane-vm2 --vmm-uid 65534 2>&1)
TOKEN2=$(echo "$created" | js 'o.attach_token.token')
ct systemd-run --quiet --unit=kvmvfio-vmm-lane2 --property=User=nobody --property=SyslogIdentifier=lane-vmm2 \
  --setenv=KVMVFIO_TOKEN="$TOKEN2" /usr/bin/node $INSTALL/dist/src/vmm/reference.js > /dev/null 2>&1
wait_until "$WAIT" bash -c "[ \"\$(node '$REPO/dist/src/cli/main.js' --socket '$(API)' --json vm get lane-vm2 2>/dev/null | grep -c VM_STATE_RUNNING)\" -gt 0 ]"
pid2=$(prop kvmvfio-vmm-lane2 MainPID)
n2=$(prop $UNIT NFileDescriptorStore)
del=$(cli vm delete lane-vm2 --force 2>&1 | head -n 1)
wait_until 10 bash -c "[ \"\$(nsenter -t $LEADER -a systemctl show -P MainPID kvmvfio-vmm-lane2)\" = 0 ]"
how="$(prop kvmvfio-vmm-lane2 Result) $(prop kvmvfio-vmm-lane2 ExecMainCode)/$(prop kvmvfio-vmm-lane2 ExecMainStatus)"
check "force delete (CAP_KILL)" "VMM pid ${pid2:-?} of uid 65534: delete --force -> ${del:-nothing}; the VMM unit: $how (signal 9 = SIGKILL)" \
  test "$how" = "signal 2/9"
# FDSTOREREMOVE=1: the VM's session socket and pidfd leave the store with it.
wait_until 5 bash -c "[ \"\$(nsenter -t $LEADER -a systemctl show -P NFileDescriptorStore $UNIT)\" = $((n2 - 2)) ]"
n3=$(prop $UNIT NFileDescriptorStore)
check "fd store remove" "NFileDescriptorStore $n2 with the VM, $n3 after its delete (want $((n2 - 2)): session and pidfd removed)" test "$n3" = $((n2 - 2))
ct systemctl reset-failed kvmvfio-vmm-lane2 > /dev/null 2>&1

log "step kernel without SO_PEERPIDFD"
# Debian 12's kernel (6.1) has no SO_PEERPIDFD: the daemon opens the VMM's pidfd from its pid. In
# the unit's sandbox (private network namespace, AF_UNIX only) sock_diag cannot show who holds the
# connection, so the proof is the ATTACH's sender (SCM_CREDENTIALS) with a start time before the
# accept, read from /proc/PID/stat — visible under ProtectProc=invisible only with the unit's
# CAP_SYS_PTRACE. Played with a drop-in (the one of the lane) that runs the shipped ExecStart under
# a seccomp filter making getsockopt(SO_PEERPIDFD) fail with ENOPROTOOPT.
ct mkdir -p /run/systemd/system/kvmvfiod.service.d
ct sh -c "printf '[Service]\nExecStart=\nExecStart=/usr/lib/kvmvfiod-lane/no-peerpidfd $(prop $UNIT ExecStart | sed -n 's/.*argv\[\]=\([^;]*\) ;.*/\1/p')\n' > /run/systemd/system/kvmvfiod.service.d/lane-no-peerpidfd.conf"
sctl daemon-reload
c=$(cursor)
sctl restart $UNIT > /dev/null 2>&1
wait_line 15 "$c" '"event":"ready"'
created=$(cli --json vm create lane-vm3 --vmm-uid 65534 2>&1)
TOKEN3=$(echo "$created" | js 'o.attach_token.token')
ct systemd-run --quiet --unit=kvmvfio-vmm-lane3 --property=User=nobody --property=SyslogIdentifier=lane-vmm3 \
  --setenv=KVMVFIO_TOKEN="$TOKEN3" /usr/bin/node $INSTALL/dist/src/vmm/reference.js > /dev/null 2>&1
wait_line 15 "$c" '"event":"vmm-attached"'
attached=$(djl "$c" | grep -m1 '"event":"vmm-attached"' | js 'o.pidfd')
exec_start=$(prop $UNIT ExecStart | sed -n 's/.*path=\([^ ;]*\).*/\1/p')
check "no SO_PEERPIDFD: attach" "ExecStart path $exec_start; vm lane-vm3 $(cli --json vm get lane-vm3 2>/dev/null | js 'o.state'); the VMM's pidfd proven by: ${attached:-no attach}" \
  test "$attached" = sent-record
cli vm delete lane-vm3 --force > /dev/null 2>&1
ct rm -f /run/systemd/system/kvmvfiod.service.d/lane-no-peerpidfd.conf
sctl daemon-reload
ct systemctl reset-failed kvmvfio-vmm-lane3 > /dev/null 2>&1

log "step sockets stop"
sctl stop kvmvfiod.socket kvmvfiod-handoff.socket
left=$(ct sh -c 'ls -A /run/kvmvfiod' 2>&1 | tr '\n' ' ')
check "sockets stop" "service $(prop $UNIT ActiveState), /run/kvmvfiod holds: ${left:-nothing}" \
  test "$(prop $UNIT ActiveState)" = inactive -a -z "$left"
timing "tests" "$(since "$T_TESTS")"

echo
print_timings
echo "logs: $LOGS (journal.txt: the container's whole journal at debug level)"
[ ${#FAILURES[@]} -gt 0 ] && echo "failed: ${FAILURES[*]}"
echo "$PASSED passed, $FAILED failed"
[ $FAILED = 0 ]
