#!/bin/sh
# PostgreSQL's entrypoint on either base image (deploy/postgres/Dockerfile).
# Official image: its own docker-entrypoint.sh. Debian's postgresql: the same contract for what LSL
# uses: on first start (an empty PGDATA) create the cluster with POSTGRES_USER / POSTGRES_PASSWORD
# (scram-sha-256 over TCP) and the database POSTGRES_DB; then run the server as `postgres`.
set -eu
if command -v docker-entrypoint.sh >/dev/null 2>&1; then
    exec docker-entrypoint.sh "$@"
fi

bindir=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
: "${PGDATA:=/var/lib/postgresql/data}"
: "${POSTGRES_USER:=postgres}"
: "${POSTGRES_DB:=$POSTGRES_USER}"
if [ -z "${POSTGRES_PASSWORD:-}" ]; then
    echo "lsl-postgres: POSTGRES_PASSWORD is required" >&2
    exit 1
fi
as_postgres() { setpriv --reuid=postgres --regid=postgres --init-groups "$@"; }

mkdir -p "$PGDATA" /run/postgresql
chown postgres:postgres "$PGDATA" /run/postgresql
chmod 0700 "$PGDATA"
chmod 2775 /run/postgresql

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    echo "lsl-postgres: initialising $PGDATA ($("$bindir/postgres" --version))"
    pwfile=$(mktemp)
    printf '%s\n' "$POSTGRES_PASSWORD" > "$pwfile"
    chown postgres "$pwfile"
    as_postgres "$bindir/initdb" -D "$PGDATA" -U "$POSTGRES_USER" --pwfile="$pwfile" \
        --auth-local=trust --auth-host=scram-sha-256 --encoding=UTF8 --locale=C.UTF-8 >/dev/null
    rm -f "$pwfile"
    echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
    # The database, on a temporary server reachable through the Unix socket only (healthchecks go
    # over TCP, so nothing counts it as ready).
    as_postgres "$bindir/pg_ctl" -D "$PGDATA" -o "-c listen_addresses=''" -w -t 60 start >/dev/null
    if [ "$POSTGRES_DB" != postgres ]; then
        as_postgres "$bindir/createdb" -U "$POSTGRES_USER" -O "$POSTGRES_USER" "$POSTGRES_DB"
    fi
    as_postgres "$bindir/pg_ctl" -D "$PGDATA" -m fast -w -t 60 stop >/dev/null
    echo "lsl-postgres: initialised"
fi

if [ "${1:-}" = postgres ]; then
    shift
    exec setpriv --reuid=postgres --regid=postgres --init-groups \
        "$bindir/postgres" -D "$PGDATA" -c listen_addresses='*' "$@"
fi
exec "$@"
