# kvmvfiod as a container image: the daemon runs as root and needs the host's
# /dev/kvm (and /dev/vfio/*) and a host folder for its sockets. How to run it
# (podman, docker, a Kubernetes DaemonSet) and what it gives up compared with
# the systemd service: docs/operations.md, "In a container, and on Kubernetes".
#
#   docker build -t kvmvfiod .
#   podman build --format docker -t kvmvfiod .
#
# podman's default image format (OCI) has no HEALTHCHECK, hence --format docker.
# test/container/lane.sh builds and runs this file in CI.

# ---- build: the full toolchain, the generated proto types, tsc
FROM node:20-bookworm-slim AS build
WORKDIR /src
# Dependencies first, so this layer is reused until the lock file changes.
# --ignore-scripts: the package's own `prepare` runs the build, and the sources
# are not here yet. No dependency needs its install script: koffi's binary
# comes prebuilt in its @koromix/koffi-<os>-<arch> optional package.
COPY package.json package-lock.json ./
RUN npm ci --ignore-scripts --no-audit --no-fund
COPY tsconfig.json ./
COPY proto ./proto
COPY src ./src
RUN npm run build

# ---- runtime: production dependencies, the compiled JavaScript, the proto
FROM node:20-bookworm-slim

WORKDIR /opt/kvmvfiod
ENV NODE_ENV=production \
    KVMVFIOD_RUNTIME_DIR=/run/kvmvfiod \
    KVMVFIOD_STATE_DIR=/var/lib/kvmvfiod

# Production dependencies, less what nothing loads at run time: source maps,
# TypeScript sources and declarations, Markdown, and koffi's musl binaries
# (this base is glibc). About 9 MB of 21.
COPY package.json package-lock.json ./
RUN npm ci --omit=dev --ignore-scripts --no-audit --no-fund \
 && npm cache clean --force \
 && find node_modules -type f \( -name '*.map' -o -name '*.ts' -o -name '*.md' \) -delete \
 && rm -rf node_modules/@koromix/*/musl_* /root/.npm /tmp/*
COPY --from=build /src/dist/src ./dist/src
COPY proto ./proto
# The systemd units ship for reference only: a container has no fd store.
COPY systemd ./systemd
RUN ln -s /opt/kvmvfiod/dist/src/daemon/main.js /usr/local/bin/kvmvfiod \
 && ln -s /opt/kvmvfiod/dist/src/cli/main.js /usr/local/bin/kvmvfioctl \
 && mkdir -p /run/kvmvfiod /var/lib/kvmvfiod /etc/kvmvfiod

# Root: the daemon opens /dev/kvm and /dev/vfio/*, raises VMMs' RLIMIT_MEMLOCK
# and watches them through pidfds.
USER root
# The sockets (api.sock, handoff.sock) go to /run/kvmvfiod: bind-mount a host
# folder there (-v /run/kvmvfiod:/run/kvmvfiod) so the host's VMMs and
# orchestrator reach them. It is not a VOLUME: an anonymous volume would hide
# the sockets from the host.
VOLUME ["/var/lib/kvmvfiod"]

# SIGTERM: the daemon stops accepting, lets calls in flight finish (5 s grace),
# ends its sessions and exits 0. The VMs live on in their VMMs.
STOPSIGNAL SIGTERM
# grpc.health.v1.Health/Check on the API socket; exit 0 only when SERVING.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD kvmvfioctl --timeout 3000 --socket "${KVMVFIOD_RUNTIME_DIR:-/run/kvmvfiod}/api.sock" health

ENTRYPOINT ["node", "--max-semi-space-size=2", "/opt/kvmvfiod/dist/src/daemon/main.js"]
CMD []

# Last, so that a new revision or build date does not invalidate the layers above
# (build arguments are part of the cache key of every RUN after their ARG).
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="kvmvfiod" \
      org.opencontainers.image.description="Root broker of /dev/kvm and VFIO groups for sandboxed VMMs: gRPC API on /run/kvmvfiod/api.sock, VMM sessions on /run/kvmvfiod/handoff.sock" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.base.name="docker.io/library/node:20-bookworm-slim"
