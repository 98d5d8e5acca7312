#!/usr/bin/env bash
# A private PostgreSQL cluster on 127.0.0.1, for tests and benchmarks.
#
#   scripts/pg.sh start DIR [PORT]   initdb into DIR (if new) and start it; prints its URL
#   scripts/pg.sh stop DIR           stop it (fast shutdown)
#   scripts/pg.sh kill DIR           SIGKILL the server (fault tests)
#
# PostgreSQL refuses to run as root: as root, the cluster belongs to the `postgres` user (DIR
# is chowned to it). Debian's postgresql-15 is installed when missing (as root). The server
# listens on 127.0.0.1 only, on PORT or a free port; trust authentication for user postgres.
set -euo pipefail

cmd=${1:?usage: scripts/pg.sh start|stop|kill DIR [PORT]}
dir=${2:?usage: scripts/pg.sh start|stop|kill DIR [PORT]}
bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)

as_owner() {
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

case "$cmd" in
start)
    if [ -z "$bin" ] || [ ! -x "$bin/initdb" ]; then
        [ "$(id -u)" = 0 ] || { echo "PostgreSQL is not installed (apt-get install postgresql-15)" >&2; exit 1; }
        echo "installing PostgreSQL from Debian's packages" >&2
        # (Another apt-get may be running beside this one: wait for its lock.)
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q -o DPkg::Lock::Timeout=600 postgresql-15 >/dev/null \
            || { apt-get update -q -o DPkg::Lock::Timeout=600 >/dev/null \
                 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q -o DPkg::Lock::Timeout=600 postgresql-15 >/dev/null; }
        bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
    fi
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    [ "$(id -u)" = 0 ] && chown postgres "$dir"
    port=${3:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}
    if [ ! -f "$dir/data/PG_VERSION" ]; then
        as_owner "$bin/initdb" -D "$dir/data" -A trust -U postgres >"$dir/initdb.log" 2>&1 \
            || { cat "$dir/initdb.log" >&2; exit 1; }
    fi
    as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/log" -w -t 60 \
        -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c max_connections=200" start >/dev/null \
        || { cat "$dir/log" >&2; exit 1; }
    echo "$port" >"$dir/port"
    echo "postgres://postgres@127.0.0.1:$port/postgres"
    ;;
stop)
    [ -f "$dir/data/postmaster.pid" ] && as_owner "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null
    ;;
kill)
    pid=$(head -1 "$dir/data/postmaster.pid")
    kill -9 "$pid"
    ;;
*)
    echo "unknown command $cmd" >&2; exit 2
    ;;
esac
