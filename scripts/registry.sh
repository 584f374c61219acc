#!/usr/bin/env bash
# A local, throwaway Docker registry for tests that pull images (no internet
# registry is needed): Debian's docker-registry (distribution 2.8) on
# 127.0.0.1:5000, storage in var/registry/data.
#
#   scripts/registry.sh start            start it (no-op if running), wait for /v2/
#   scripts/registry.sh stop             stop it
#   scripts/registry.sh status           exit 0 if it answers
#   scripts/registry.sh push IMAGE [REF] tag IMAGE as REF (default
#                                        127.0.0.1:5000/IMAGE) and push it
#
# Docker allows plain-HTTP registries on 127.0.0.0/8 without any
# "insecure-registries" setting, so no daemon configuration is needed.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$(pwd)"
DIR="$ROOT/var/registry"
CONFIG="$DIR/config.yml"
PIDFILE="$DIR/pid"
LOG="$DIR/registry.log"
ADDR="${LSL_REGISTRY_ADDR:-127.0.0.1:5000}"  # tests pick a free port
URL="http://$ADDR/v2/"

say() { echo "registry: $*"; }
die() { echo "registry: ERROR: $*" >&2; exit 1; }

answers() { curl -fsS -o /dev/null --max-time 2 "$URL" 2>/dev/null; }

our_pid() {  # prints the pid if the pid file names a live docker-registry
    local pid
    [ -s "$PIDFILE" ] || return 1
    pid="$(cat "$PIDFILE")"
    kill -0 "$pid" 2>/dev/null || return 1
    grep -q docker-registry "/proc/$pid/cmdline" 2>/dev/null || return 1
    echo "$pid"
}

find_binary() {
    if command -v docker-registry >/dev/null 2>&1; then command -v docker-registry; return; fi
    [ -x /usr/bin/docker-registry ] && { echo /usr/bin/docker-registry; return; }
    command -v apt-get >/dev/null 2>&1 || die "docker-registry is not installed and apt-get is not available"
    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        sudo -n true 2>/dev/null || die "docker-registry is not installed (run as root to install it: apt-get install docker-registry)"
        sudo="sudo -n"
    fi
    say "installing docker-registry" >&2
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null || die "apt-get update failed"
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends docker-registry >/dev/null \
        || die "apt-get install docker-registry failed"
    # The package's init script may have started the system-wide registry on
    # :5000 (with htpasswd auth); it would take our port.
    if [ -x /etc/init.d/docker-registry ]; then $sudo /etc/init.d/docker-registry stop >/dev/null 2>&1 || true; fi
    echo /usr/bin/docker-registry
}

write_config() {
    mkdir -p "$DIR/data"
    cat >"$CONFIG" <<YAML
# Written by scripts/registry.sh: local test registry, no auth, plain HTTP.
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $DIR/data
  delete:
    enabled: true
  cache:
    blobdescriptor: inmemory
http:
  addr: $ADDR
  headers:
    X-Content-Type-Options: [nosniff]
YAML
}

cmd_start() {
    if pid="$(our_pid)" && answers; then
        say "already running on $ADDR (pid $pid)"
        return 0
    fi
    if answers; then
        die "something else already answers on $URL (the system docker-registry service? try: /etc/init.d/docker-registry stop)"
    fi
    command -v curl >/dev/null 2>&1 || die "curl is needed (apt-get install curl)"
    local bin
    bin="$(find_binary)"
    write_config
    nohup "$bin" serve "$CONFIG" >>"$LOG" 2>&1 </dev/null &
    local pid=$!
    echo "$pid" >"$PIDFILE"
    for _ in $(seq 1 100); do
        if answers; then
            say "started on $ADDR (pid $pid, data in ${DIR#"$ROOT"/}/data)"
            return 0
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            rm -f "$PIDFILE"
            tail -n 20 "$LOG" >&2 || true
            die "docker-registry exited at start-up (log: ${LOG#"$ROOT"/})"
        fi
        sleep 0.1
    done
    kill "$pid" 2>/dev/null || true
    rm -f "$PIDFILE"
    tail -n 20 "$LOG" >&2 || true
    die "docker-registry did not answer $URL within 10 s"
}

cmd_stop() {
    local pid
    if ! pid="$(our_pid)"; then
        rm -f "$PIDFILE"
        say "not running"
        return 0
    fi
    kill "$pid"
    for _ in $(seq 1 50); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
    rm -f "$PIDFILE"
    say "stopped (pid $pid)"
}

cmd_push() {
    local image="${1:-}" ref="${2:-}"
    [ -n "$image" ] || die "usage: $0 push IMAGE [REF]"
    case "$image" in
        "$ADDR"/*) ref="${ref:-$image}" ;;
        *) ref="${ref:-$ADDR/$image}" ;;
    esac
    answers || die "the registry is not running (run: $0 start)"
    docker image inspect "$image" >/dev/null 2>&1 || die "no local image $image"
    [ "$ref" = "$image" ] || docker tag "$image" "$ref"
    docker push "$ref" >/dev/null || die "docker push $ref failed"
    say "pushed $ref"
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) if answers; then say "running on $ADDR"; else say "not running"; exit 1; fi ;;
    push) shift; cmd_push "$@" ;;
    *) echo "usage: $0 start|stop|status|push IMAGE [REF]" >&2; exit 2 ;;
esac
