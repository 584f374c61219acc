#!/usr/bin/env bash
# Restart (re-create) the web processes one at a time, so the site never goes down:
#
#   docker compose build && bash deploy/rolling-restart.sh         # an upgrade (docs/deploy.md)
#
# For each of web1, web2: re-create its container from the current image (`up -d --no-deps
# --force-recreate`: a new image, a changed LSL_ENV_FILE), wait until it is healthy, then have the
# proxy re-resolve the names (`nginx -s reload`: a re-created container may have a new address). While
# one is down the proxy sends everything to the other. Terminals on the restarting process are told to
# reconnect (`server_restarting`) and reattach through the other one; the shells themselves live in
# the environments' keepers and never notice. Run the worker's restart separately
# (`up -d --no-deps worker`): its jobs are leased and resumed by whichever worker runs.
#
# Uses docker-compose, or `docker compose` when that is what is installed; COMPOSE_PROJECT_NAME and the
# .env of the compose file's directory apply as for any compose command. Every wait is bounded
# (LSL_RESTART_TIMEOUT seconds per service, default 180).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
TIMEOUT="${LSL_RESTART_TIMEOUT:-180}"
if command -v docker-compose >/dev/null 2>&1; then
    COMPOSE=(docker-compose)
else
    COMPOSE=(docker compose)
fi

healthy() {
    local id
    id="$("${COMPOSE[@]}" ps -q "$1")"
    [ -n "$id" ] && [ "$(docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{end}}' "$id")" = healthy ]
}

for service in ${LSL_WEB_SERVICES:-web1 web2}; do
    t0=$SECONDS
    echo "rolling restart: $service"
    timeout "$TIMEOUT" "${COMPOSE[@]}" up -d --no-deps --force-recreate "$service"
    until healthy "$service"; do
        if [ $((SECONDS - t0)) -ge "$TIMEOUT" ]; then
            echo "rolling restart: $service is not healthy after ${TIMEOUT}s; stopping here (the other web process still serves)" >&2
            exit 1
        fi
        sleep 1
    done
    timeout 30 "${COMPOSE[@]}" exec -T proxy nginx -c /etc/nginx/lsl.conf -s reload
    echo "rolling restart: $service healthy again after $((SECONDS - t0))s"
done
