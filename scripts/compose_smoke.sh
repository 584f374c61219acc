#!/usr/bin/env bash
# Bring docker-compose.yml up for real, smoke-test it through its proxy, tear everything down.
#
#   bash scripts/compose_smoke.sh          # CI: .ci/run / Makefile call this
#
# 1. docker-compose (Debian's 1.29 package) installed if neither it nor `docker compose` is there;
# 2. every image built from LSL_BASE_IMAGE (default lsl-test/debian:bookworm, the offline Debian test
#    image: no registry needed; LSL_BASE_IMAGE= (empty) builds from the public images instead);
# 3. `up -d` as its own compose project, proxy on a free loopback port, its own LSL_INSTANCE label,
#    keeper directory, secret key and database password; waits (bounded) for every service healthy;
# 4. tests/compose_smoke.py through the proxy only: a browser-style sign-in and an API token, create an
#    environment from catalog/test.yaml, a shell over the terminal websocket, share it, a second user
#    joins the same session through the other web process and both see each other's output; a rolling
#    restart of web1 and web2 (deploy/rolling-restart.sh) under API traffic keeps the shell; delete;
# 5. always (on success, failure or Ctrl-C): on failure `ps` and the logs' tails first, then `down -v`,
#    then whatever LSL created on the host's engine under this run's instance label (environments'
#    containers and volumes), a keeper volume this run added, and the temporary directory.
#
# The built images are kept (tagged <project>_<service>), so the next run builds from cache; set
# LSL_SMOKE_RMI=1 to remove them too. Exit status: 0 only if every step passed.
#
# Settings: LSL_BASE_IMAGE, LSL_SMOKE_PROJECT (compose project, default lslsmoke), LSL_SMOKE_PYTHON
# (default .venv/bin/python: needs requests, websockets, pyte), LSL_SMOKE_BUILD_TIMEOUT (s, 1800),
# LSL_SMOKE_UP_TIMEOUT (s, 300), LSL_SMOKE_TEST_TIMEOUT (s, 300), LSL_SMOKE_RMI.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
export DEBIAN_FRONTEND=noninteractive

BASE_IMAGE="${LSL_BASE_IMAGE-lsl-test/debian:bookworm}"
PROJECT="${LSL_SMOKE_PROJECT:-lslsmoke}"
PY="${LSL_SMOKE_PYTHON:-.venv/bin/python}"
BUILD_TIMEOUT="${LSL_SMOKE_BUILD_TIMEOUT:-1800}"
UP_TIMEOUT="${LSL_SMOKE_UP_TIMEOUT:-300}"
TEST_TIMEOUT="${LSL_SMOKE_TEST_TIMEOUT:-300}"
ADMIN=smoke-admin
USER2=smoke-bob

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo -n"; fi

T_START=$SECONDS
declare -a TIMINGS=()
FAILED=""
summary() {
    echo
    echo "=== [compose-smoke] timings"
    printf '  %s\n' "${TIMINGS[@]}"
    printf '  %-34s %4ss\n' total "$((SECONDS - T_START))"
}
step() {  # step NAME COMMAND...: run, time, remember; on failure the EXIT trap tears down
    local name="$1" t0=$SECONDS rc=0
    shift
    echo
    echo "=== [compose-smoke] $name"
    "$@" || rc=$?
    local dt=$((SECONDS - t0))
    TIMINGS+=("$(printf '%-34s %4ss%s' "$name" "$dt" "$([ "$rc" -eq 0 ] || echo "  FAILED ($rc)")")")
    echo "=== [compose-smoke] $name: $([ "$rc" -eq 0 ] && echo ok || echo "FAILED ($rc)") in ${dt}s"
    if [ "$rc" -ne 0 ]; then
        FAILED="$name"
        exit "$rc"
    fi
}

# --- compose itself --------------------------------------------------------------------------------
COMPOSE=()
find_compose() {
    if command -v docker-compose >/dev/null 2>&1; then
        COMPOSE=(docker-compose)
    elif docker compose version >/dev/null 2>&1; then
        COMPOSE=(docker compose)
    fi
}
ensure_compose() {
    find_compose
    if [ "${#COMPOSE[@]}" -eq 0 ]; then
        $SUDO apt-get update -q && $SUDO apt-get install -y -q --no-install-recommends docker-compose
        find_compose
    fi
    [ "${#COMPOSE[@]}" -gt 0 ] || { echo "no docker-compose and no docker compose" >&2; return 1; }
    "${COMPOSE[@]}" version
}
dc() { "${COMPOSE[@]}" -p "$PROJECT" "$@"; }

# --- this run's settings ---------------------------------------------------------------------------
WORK=""
INSTANCE=""
KEEPER_VOLUMES_BEFORE=""
prepare() {
    WORK="$(mktemp -d /tmp/lsl-smoke.XXXXXX)"
    INSTANCE="compose-smoke-$(basename "$WORK" | cut -d. -f2 | tr 'A-Z' 'a-z')"
    KEEPER_VOLUMES_BEFORE="$(docker volume ls -q --filter name=lsl-keeper- | sort)"
    local port secret
    port="$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    secret="$("$PY" -c 'import secrets; print(secrets.token_urlsafe(50))')"
    ADMIN_PASSWORD="$("$PY" -c 'import secrets; print(secrets.token_urlsafe(16))')"
    USER2_PASSWORD="$("$PY" -c 'import secrets; print(secrets.token_urlsafe(16))')"
    # The server's settings (LSL_ENV_FILE), as a deployment would keep them outside the repository.
    cat > "$WORK/lsl.env" <<EOF
LSL_SECRET_KEY=$secret
LSL_INSTANCE=$INSTANCE
LSL_CATALOG=catalog/test.yaml
LSL_ALLOWED_HOSTS=127.0.0.1,localhost
EOF
    chmod 600 "$WORK/lsl.env"
    mkdir -p "$WORK/keepers"
    export COMPOSE_PROJECT_NAME="$PROJECT"
    export LSL_BASE_IMAGE="$BASE_IMAGE"
    export LSL_ENV_FILE="$WORK/lsl.env"
    export LSL_PORT="$port"
    export LSL_BIND=127.0.0.1
    export LSL_KEEPER_DIR="$WORK/keepers"
    export LSL_PROXY_UPSTREAM_HEADER=1  # tests/compose_smoke.py joins through the other web process
    export LSL_DB_PASSWORD="$("$PY" -c 'import secrets; print(secrets.token_hex(16))')"
    # The build trusts what this host trusts: extra CA certificates (a TLS-intercepting egress proxy)
    # reach pip and npm in the build, and no image (deploy/base/lsl-fetch).
    LSL_BUILD_CA="$(cat /usr/local/share/ca-certificates/*.crt 2>/dev/null | base64 -w0 || true)"
    export LSL_BUILD_CA
    URL="http://127.0.0.1:$port"
    echo "project $PROJECT, instance $INSTANCE, base image ${BASE_IMAGE:-(public images)}, proxy $URL, work dir $WORK"
}

# --- teardown: always --------------------------------------------------------------------------------
teardown() {
    local rc=$?
    trap - EXIT INT TERM
    [ -n "$WORK" ] || exit "$rc"
    set +e
    if [ "$rc" -ne 0 ] && [ "${#COMPOSE[@]}" -gt 0 ]; then
        echo
        echo "=== [compose-smoke] FAILED${FAILED:+ in: $FAILED}: state and logs"
        timeout 30 "${COMPOSE[@]}" -p "$PROJECT" ps
        for c in $(timeout 30 "${COMPOSE[@]}" -p "$PROJECT" ps -q 2>/dev/null); do
            docker inspect -f '{{.Name}} {{.State.Status}} health={{if .State.Health}}{{.State.Health.Status}} {{range .State.Health.Log}}{{.Output}}{{end}}{{end}}' "$c" 2>/dev/null | tail -c 600
        done
        timeout 60 "${COMPOSE[@]}" -p "$PROJECT" logs --no-color --tail=60
    fi
    local t0=$SECONDS
    echo
    echo "=== [compose-smoke] teardown"
    if [ "${#COMPOSE[@]}" -gt 0 ]; then
        local rmi=()
        [ "${LSL_SMOKE_RMI:-0}" = 1 ] && rmi=(--rmi local)
        timeout 180 "${COMPOSE[@]}" -p "$PROJECT" down -v --remove-orphans -t 20 "${rmi[@]}"
    fi
    # What LSL created on the host's engine for this run: environments' containers and workspace
    # volumes carry lsl.instance=<this run's LSL_INSTANCE>.
    local leftovers
    leftovers="$(docker ps -aq --filter "label=lsl.instance=$INSTANCE")"
    [ -z "$leftovers" ] || { echo "removing containers: $leftovers"; docker rm -f $leftovers >/dev/null; }
    leftovers="$(docker volume ls -q --filter "label=lsl.instance=$INSTANCE")"
    [ -z "$leftovers" ] || { echo "removing volumes: $leftovers"; docker volume rm -f $leftovers >/dev/null; }
    # The keeper's binary volume is shared by every LSL on the engine (named after the binary's hash):
    # remove it only if this run added it and nothing uses it (rm refuses a volume in use).
    for volume in $(comm -13 <(echo "$KEEPER_VOLUMES_BEFORE") <(docker volume ls -q --filter name=lsl-keeper- | sort)); do
        docker volume rm "$volume" >/dev/null 2>&1 && echo "removed keeper volume $volume"
    done
    rm -rf "$WORK"
    TIMINGS+=("$(printf '%-34s %4ss' teardown "$((SECONDS - t0))")")
    summary
    if [ "$rc" -eq 0 ]; then
        echo "=== [compose-smoke] PASSED"
    else
        echo "=== [compose-smoke] FAILED (exit $rc)${FAILED:+ in: $FAILED}"
    fi
    exit "$rc"
}
trap teardown EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- the steps -------------------------------------------------------------------------------------
build() {
    # Sequential (not --parallel): web1, web2, worker and migrate share one Dockerfile, so the first
    # build fills the cache and the other three are cache hits.
    timeout "$BUILD_TIMEOUT" "${COMPOSE[@]}" -p "$PROJECT" build
}

# 0: every service's container is running and, where it has a healthcheck, healthy (migrate: exited
# 0); 1: not yet; 2: one has failed for good.
all_healthy() {
    local id name state health code pending=0
    for id in $(dc ps -q); do
        read -r name state health code < <(docker inspect -f '{{index .Config.Labels "com.docker.compose.service"}} {{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}} {{.State.ExitCode}}' "$id")
        case "$name/$state/$health" in
            migrate/exited/*) [ "$code" = 0 ] || { echo "migrate exited $code"; return 2; } ;;
            */running/healthy | */running/none) ;;
            */exited/* | */dead/*) echo "$name is $state (exit $code)"; return 2 ;;
            *) pending=1 ;;
        esac
    done
    return "$pending"
}
up() {
    # compose waits for each dependency's condition itself (healthy, completed), bounded here.
    timeout "$UP_TIMEOUT" "${COMPOSE[@]}" -p "$PROJECT" up -d
    local deadline=$((SECONDS + UP_TIMEOUT)) rc
    while true; do
        rc=0
        all_healthy || rc=$?
        [ "$rc" -eq 0 ] && break
        [ "$rc" -eq 2 ] && return 1
        [ "$SECONDS" -lt "$deadline" ] || { echo "not every service became healthy in ${UP_TIMEOUT}s"; return 1; }
        sleep 1
    done
    dc ps
    local expected="migrate postgres proxy redis web1 web2 worker" services
    services="$(for id in $(dc ps -q); do docker inspect -f '{{index .Config.Labels "com.docker.compose.service"}}' "$id"; done | sort | tr '\n' ' ' | sed 's/ $//')"
    [ "$services" = "$expected" ] || { echo "services: '$services', expected '$expected'"; return 1; }
}
users() {
    # Through manage.py in a web container (as an operator would), never the database directly.
    timeout 120 "${COMPOSE[@]}" -p "$PROJECT" exec -T -e LSL_ADMIN_USERNAME="$ADMIN" -e LSL_ADMIN_PASSWORD="$ADMIN_PASSWORD" \
        web1 python manage.py lsl_ensure_admin --url "$URL/" >/dev/null  # (it prints the password)
    echo "created $ADMIN"
    timeout 120 "${COMPOSE[@]}" -p "$PROJECT" exec -T -e SMOKE_USER="$USER2" -e SMOKE_PASSWORD="$USER2_PASSWORD" web2 \
        python manage.py shell -c "import os; from django.contrib.auth import get_user_model; \
get_user_model().objects.create_user(os.environ['SMOKE_USER'], password=os.environ['SMOKE_PASSWORD']); print('created', os.environ['SMOKE_USER'])"
}
smoke() {
    timeout "$TEST_TIMEOUT" "$PY" tests/compose_smoke.py --url "$URL" --admin "$ADMIN:$ADMIN_PASSWORD" --user "$USER2:$USER2_PASSWORD" \
        --restart-cmd "bash deploy/rolling-restart.sh"
    # Which web process carried what (the proxy's access log names the upstream of every request).
    echo "requests per upstream (proxy access log):"
    dc logs --no-color proxy | grep -o 'upstream=[0-9.:]*' | sort | uniq -c
    echo "terminal websockets:"
    dc logs --no-color proxy | grep '/ws/sessions/' | grep -o '"GET [^"]*" [0-9]* .* upstream=[0-9.:]*' | sed 's/?[^ ]*//' || true
    echo "web containers: $(for s in web1 web2; do printf '%s=%s ' "$s" "$(docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$(dc ps -q "$s")")"; done)"
}

step "docker-compose" ensure_compose
prepare
step "build (${BASE_IMAGE:-public images})" build
step "up -d, wait until healthy" up
step "users (manage.py)" users
step "smoke test through the proxy" smoke
