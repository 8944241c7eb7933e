#!/usr/bin/env bash
# A private PostgreSQL cluster for the tests and the store benchmark (not the system service): initdb in a
# temp dir, listening on 127.0.0.1 only, on a free port, with its unix socket inside that dir; fsync off
# (a throw-away cluster). The same script serves CI (.ci/run) and a developer's machine.
#
#   eval "$(scripts/ci_postgres.sh start)"    # prints: export SCALING_TEST_POSTGRES=postgresql://... SCALING_PG_DIR=...
#   scripts/ci_postgres.sh stop "$SCALING_PG_DIR"
#
# Needs Debian's PostgreSQL (apt-get install -y postgresql: the binaries in /usr/lib/postgresql/<v>/bin).
# As root (CI) the cluster runs as the package's `postgres` user: PostgreSQL refuses to run as root.
# Tests read SCALING_TEST_POSTGRES (a superuser URL of the cluster's `postgres` database) and create
# their own databases in it.
set -euo pipefail

bindir() {
    local d
    d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    if [ -z "$d" ] || [ ! -x "$d/initdb" ]; then
        echo "ci_postgres.sh: no PostgreSQL binaries (apt-get install -y postgresql)" >&2
        exit 1
    fi
    echo "$d"
}

as_owner() {  # run a command as the cluster's owner
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

start() {
    local bin dir port
    bin=$(bindir)
    dir=$(mktemp -d "${TMPDIR:-/tmp}/scaling-pg.XXXXXX")
    if [ "$(id -u)" = 0 ]; then chown postgres: "$dir"; fi
    as_owner "$bin/initdb" -D "$dir/data" -U scaling -A trust --no-sync -E UTF8 > "$dir/initdb.log" 2>&1 || {
        cat "$dir/initdb.log" >&2; exit 1; }
    port=$(free_port)
    as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 start -o \
        "-c listen_addresses=127.0.0.1 -p $port -k $dir -c fsync=off -c synchronous_commit=off \
         -c full_page_writes=off -c max_connections=300" > /dev/null || { cat "$dir/server.log" >&2; exit 1; }
    echo "export SCALING_TEST_POSTGRES=postgresql://scaling@127.0.0.1:$port/postgres SCALING_PG_DIR=$dir"
}

stop() {
    local dir=${1:?usage: ci_postgres.sh stop DIR}
    [ -d "$dir/data" ] || return 0
    as_owner "$(bindir)/pg_ctl" -D "$dir/data" -m immediate -w stop > /dev/null 2>&1 || true
    rm -rf "$dir"
}

case "${1:-}" in
    start) start ;;
    stop) stop "${2:-}" ;;
    *) echo "usage: $0 start | stop DIR" >&2; exit 2 ;;
esac
