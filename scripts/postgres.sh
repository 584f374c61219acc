#!/usr/bin/env bash
# A PostgreSQL server for the test suite (`make test-postgres`), and the URL to reach it.
#
#   bash scripts/postgres.sh           install `postgresql` if missing, start the test cluster,
#                                      create the role and database; print LSL_DATABASE_URL on stdout
#   bash scripts/postgres.sh stop      stop the test cluster (its data stays; `start` again is quick)
#   bash scripts/postgres.sh status    say whether it runs (exit 0) or not (exit 1)
#
#   export LSL_DATABASE_URL="$(bash scripts/postgres.sh)"
#
# Only the URL goes to stdout; progress and errors go to stderr. Idempotent: a second call finds
# everything in place and only prints the URL.
#
# The server is a cluster of its own, never the machine's `main` one (which may be down, hold
# real data, or have settings we must not change): as root, a Debian cluster `lsl_test`
# (pg_createcluster; data in /var/lib/postgresql/<ver>/lsl_test, start.conf `manual` so nothing
# starts it at boot); otherwise a data directory under var/postgres owned by the calling user.
# Either way it is started with pg_ctl directly, not through systemd (CI machines and containers
# have none), listens on 127.0.0.1:$LSL_PG_PORT only, and runs with fsync off: it holds nothing
# but throw-away test databases, and durability would only slow the suite's many flushes down.
#
# The role (LSL_PG_USER, default lsl) has CREATEDB because pytest-django creates and drops
# test_<database> itself; the URL names the database `lsl`, so the suite runs in `test_lsl`.
#
# Settings (environment): LSL_PG_PORT (5433), LSL_PG_USER / LSL_PG_PASSWORD (lsl / lsl),
# LSL_PG_DATABASE (lsl), LSL_PG_CLUSTER (lsl_test), LSL_PG_MAX_CONNECTIONS (300: every daphne
# and worker the suite starts holds a few connections, one per database thread).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ACTION="${1:-start}"
PORT="${LSL_PG_PORT:-5433}"
PGUSER_="${LSL_PG_USER:-lsl}"
PGPASS_="${LSL_PG_PASSWORD:-lsl}"
PGDB_="${LSL_PG_DATABASE:-lsl}"
CLUSTER="${LSL_PG_CLUSTER:-lsl_test}"
MAX_CONNECTIONS="${LSL_PG_MAX_CONNECTIONS:-300}"
START_TIMEOUT=60          # seconds for the server to accept connections
PRIVATE_DIR="$PWD/var/postgres"   # the non-root cluster: data/, its socket and its log

say() { echo "postgres: $*" >&2; }
die() { echo "postgres: ERROR: $*" >&2; exit 1; }

case "$ACTION" in start|stop|status) ;; *) echo "usage: $0 [start|stop|status]" >&2; exit 2 ;; esac
[[ "$PORT" =~ ^[0-9]+$ ]] || die "LSL_PG_PORT must be a port number, not '$PORT'"
[[ "$PGUSER_" =~ ^[a-z_][a-z0-9_]*$ && "$PGDB_" =~ ^[a-z_][a-z0-9_]*$ ]] \
    || die "LSL_PG_USER and LSL_PG_DATABASE must be plain lower-case identifiers"

SUDO=""
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
fi
AS_ROOT=""; { [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; } && AS_ROOT=1

# --- the package --------------------------------------------------------------------------
pg_bindir() {  # the newest installed server's bin directory
    local dir
    dir="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"
    [ -n "$dir" ] && [ -x "$dir/pg_ctl" ] && echo "$dir"
}

install_postgresql() {
    pg_bindir >/dev/null && command -v psql >/dev/null 2>&1 && return 0
    [ "$ACTION" = start ] || die "PostgreSQL is not installed"
    command -v apt-get >/dev/null 2>&1 || die "PostgreSQL is missing and this script knows only apt-get: install postgresql"
    [ -n "$AS_ROOT" ] || die "PostgreSQL is missing. Run: sudo apt-get install -y postgresql   (or run this script as root)"
    say "installing postgresql"
    # As scripts/machine.sh does: keep apt from starting services (here: the `main` cluster, which
    # the postgresql-common postinst creates and would start); we start only our own cluster.
    local policy=/usr/sbin/policy-rc.d added="" rc=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
        $SUDO chmod 0755 "$policy"
        added=1
    fi
    $SUDO timeout 600 apt-get update -q >&2 || rc=$?
    [ "$rc" -ne 0 ] || $SUDO env DEBIAN_FRONTEND=noninteractive NEEDRESTART_MODE=l \
        timeout 900 apt-get install -y -q --no-install-recommends postgresql >&2 || rc=$?
    [ -z "$added" ] || $SUDO rm -f "$policy"
    [ "$rc" -eq 0 ] || die "installing postgresql failed (exit $rc)"
    pg_bindir >/dev/null || die "postgresql installed, but no server binaries under /usr/lib/postgresql"
}

install_postgresql
BIN="$(pg_bindir)"
VERSION="$(basename "$(dirname "$BIN")")"

# --- the cluster: Debian-managed as root, a private directory otherwise ---------------------
if [ -n "$AS_ROOT" ]; then
    DATA="/var/lib/postgresql/$VERSION/$CLUSTER"
    CONF="/etc/postgresql/$VERSION/$CLUSTER"
    SOCKET_DIR=/var/run/postgresql
    LOG="/var/log/postgresql/postgresql-$VERSION-$CLUSTER.log"
    as_pg() { $SUDO runuser -u postgres -- "$@"; }   # the cluster's files belong to `postgres`
else
    DATA="$PRIVATE_DIR/data"
    CONF="$DATA"
    SOCKET_DIR="$PRIVATE_DIR"
    LOG="$PRIVATE_DIR/server.log"
    as_pg() { "$@"; }
fi
running() { as_pg "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; }

psql_admin() {  # psql as the cluster's superuser, over the unix socket
    local superuser=postgres
    [ -n "$AS_ROOT" ] || superuser="$(id -un)"
    as_pg psql -X -q -v ON_ERROR_STOP=1 -h "$SOCKET_DIR" -p "$PORT" -U "$superuser" -d postgres "$@"
}

if [ "$ACTION" = status ]; then
    if [ -d "$DATA" ] && running; then say "running on 127.0.0.1:$PORT ($DATA)"; exit 0; fi
    say "not running"; exit 1
fi
if [ "$ACTION" = stop ]; then
    if [ -d "$DATA" ] && running; then
        as_pg "$BIN/pg_ctl" -D "$DATA" stop -m fast -w -t "$START_TIMEOUT" >&2 || die "pg_ctl stop failed"
        say "stopped"
    else
        say "not running"
    fi
    exit 0
fi

create_cluster() {
    [ -f "$DATA/PG_VERSION" ] && return 0
    say "creating the cluster in $DATA (PostgreSQL $VERSION, port $PORT)"
    if [ -n "$AS_ROOT" ]; then
        # A cluster left half-made by an interrupted run has a config dir but no data: start over.
        [ ! -d "$CONF" ] || $SUDO pg_dropcluster "$VERSION" "$CLUSTER" >&2 2>/dev/null || $SUDO rm -rf "$CONF"
        $SUDO pg_createcluster --port "$PORT" --start-conf manual "$VERSION" "$CLUSTER" >&2 \
            || die "pg_createcluster $VERSION $CLUSTER failed"
    else
        rm -rf "$DATA"
        mkdir -p "$PRIVATE_DIR"
        chmod 0700 "$PRIVATE_DIR"
        # trust on the socket (a directory only this user can enter); passwords over TCP.
        "$BIN/initdb" -D "$DATA" -U "$(id -un)" --auth-local=trust --auth-host=scram-sha-256 \
            -E UTF8 --locale=C.UTF-8 >"$PRIVATE_DIR/initdb.log" 2>&1 \
            || die "initdb failed: $(tail -n 5 "$PRIVATE_DIR/initdb.log")"
    fi
}

configure_cluster() {
    # Written on every run, so a changed port or connection limit takes effect after a restart.
    local conf_file="$CONF/postgresql.conf" extra
    extra="$(cat <<EOF
# Written by LSL's scripts/postgres.sh: a test-only cluster. Its databases are throw-away, so
# durability is traded for speed (the suite flushes and reloads tables after many tests).
port = $PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$SOCKET_DIR'
max_connections = $MAX_CONNECTIONS
fsync = off
synchronous_commit = off
full_page_writes = off
EOF
)"
    if [ -n "$AS_ROOT" ]; then
        $SUDO mkdir -p "$CONF/conf.d"
        printf '%s\n' "$extra" | $SUDO tee "$CONF/conf.d/lsl-test.conf" >/dev/null
        # pg_createcluster wrote port= into postgresql.conf too; conf.d comes later and wins.
    else
        grep -q "^include_if_exists = 'lsl-test.conf'" "$conf_file" \
            || printf "\ninclude_if_exists = 'lsl-test.conf'\n" >>"$conf_file"
        printf '%s\n' "$extra" >"$DATA/lsl-test.conf"
    fi
}

start_cluster() {
    if running; then
        # Already up (a previous call, or another run sharing the machine). postmaster.pid's fourth
        # line is the port it listens on: it must be ours, and it must answer.
        local actual
        actual="$(as_pg sed -n 4p "$DATA/postmaster.pid" 2>/dev/null || true)"
        [ "$actual" = "$PORT" ] \
            || die "the cluster in $DATA runs on port ${actual:-?}, not $PORT (changed LSL_PG_PORT? run '$0 stop' first)"
        pg_isready -q -h 127.0.0.1 -p "$PORT" -t "$START_TIMEOUT" \
            || die "the cluster in $DATA runs but does not answer on 127.0.0.1:$PORT within ${START_TIMEOUT}s"
        return 0
    fi
    if pg_isready -q -h 127.0.0.1 -p "$PORT" -t 2; then
        die "something else already answers on 127.0.0.1:$PORT; choose another port: LSL_PG_PORT=... $0"
    fi
    say "starting the cluster (log: $LOG)"
    # pg_ctl directly rather than pg_ctlcluster/systemctl: works the same with and without systemd.
    # -w -t: wait, bounded, until it accepts connections; on failure the log says why.
    local options=""
    if [ -n "$AS_ROOT" ]; then
        options="-c config_file=$CONF/postgresql.conf"
        # /run is a tmpfs: after a reboot without systemd's tmpfiles nobody recreates the socket dir.
        $SUDO install -d -o postgres -g postgres -m 2775 "$SOCKET_DIR"
    fi
    if ! as_pg "$BIN/pg_ctl" -D "$DATA" -l "$LOG" -o "$options" -w -t "$START_TIMEOUT" start >/dev/null 2>&1; then
        die "the server did not start within ${START_TIMEOUT}s; last lines of $LOG:
$(tail -n 15 "$LOG" 2>/dev/null)"
    fi
    pg_isready -q -h 127.0.0.1 -p "$PORT" -t "$START_TIMEOUT" || die "the server started but does not answer on 127.0.0.1:$PORT"
}

ensure_role_and_database() {
    # CREATEDB: pytest-django creates (and drops) test_$PGDB_ itself. The password is set every
    # time so that a changed LSL_PG_PASSWORD takes effect.
    psql_admin -v user="$PGUSER_" -v password="$PGPASS_" <<'SQL' >&2 || die "creating the role failed"
SELECT format('CREATE ROLE %I LOGIN CREATEDB', :'user')
 WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'user') \gexec
SELECT format('ALTER ROLE %I LOGIN CREATEDB PASSWORD %L', :'user', :'password') \gexec
SQL
    psql_admin -v user="$PGUSER_" -v db="$PGDB_" <<'SQL' >&2 || die "creating the database failed"
SELECT format('CREATE DATABASE %I OWNER %I', :'db', :'user')
 WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = :'db') \gexec
SQL
}

create_cluster
configure_cluster
start_cluster
ensure_role_and_database
PGPASSWORD="$PGPASS_" psql -X -q -h 127.0.0.1 -p "$PORT" -U "$PGUSER_" -d "$PGDB_" -c 'SELECT 1' >/dev/null \
    || die "cannot log in as $PGUSER_ over TCP on 127.0.0.1:$PORT"
say "ready: PostgreSQL $VERSION on 127.0.0.1:$PORT, role $PGUSER_ (CREATEDB), database $PGDB_"
echo "postgres://$PGUSER_:$PGPASS_@127.0.0.1:$PORT/$PGDB_"
