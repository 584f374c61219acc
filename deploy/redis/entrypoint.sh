#!/bin/sh
# Redis's entrypoint on either base image (deploy/redis/Dockerfile): the official image's own
# docker-entrypoint.sh (it drops to the `redis` user), or on Debian the server as `redis` directly.
set -eu
if command -v docker-entrypoint.sh >/dev/null 2>&1; then
    exec docker-entrypoint.sh "$@"
fi
if [ "${1:-}" = redis-server ] && [ "$(id -u)" = 0 ] && id redis >/dev/null 2>&1; then
    cd /tmp
    exec setpriv --reuid=redis --regid=redis --init-groups "$@"
fi
exec "$@"
