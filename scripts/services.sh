#!/usr/bin/env bash
# Local services for Tally: Kafka (KRaft, single node), PostgreSQL and Redis on 127.0.0.1.
#
#   scripts/services.sh up       start whatever is not running yet (idempotent) and wait for it
#   scripts/services.sh down     stop what `up` started
#   scripts/services.sh status   one line per service; exit 0 only if all three answer
#   scripts/services.sh logs [-f]  last lines of the three logs (-f: follow)
#
# With a working Docker engine, `up`/`down`/`logs` drive docker-compose.yml instead. Without
# one (CI, this project's dev VMs) everything runs natively from packages: Kafka from Maven
# Central jars (scripts/kafka/pom.xml), PostgreSQL and Redis from Debian (apt-installed if
# missing). All native state lives under $TALLY_CACHE_DIR (default: <repo>/.cache):
#
#   kafka/lib/  kafka/data/  kafka/server.properties  kafka/kafka.log  kafka/kafka.pid
#   pg/data/    pg/run/ (unix socket)  pg/pg.log
#   redis/ (working dir)  redis/redis.log  redis/redis.pid
#
# Environment:
#   TALLY_CACHE_DIR                 state directory (default <repo>/.cache)
#   TALLY_KAFKA_PORT                default 9092
#   TALLY_KAFKA_CONTROLLER_PORT     default 9093 (KRaft controller listener)
#   TALLY_PG_PORT                   default 5432
#   TALLY_REDIS_PORT                default 6379
#   TALLY_SERVICES_MODE             auto (default: docker if an engine answers) | native | docker
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
# Absolute, because the paths end up in the processes' command lines and pidfile checks.
CACHE_DIR=$(realpath -m "${TALLY_CACHE_DIR:-$REPO_ROOT/.cache}")

KAFKA_PORT=${TALLY_KAFKA_PORT:-9092}
KAFKA_CONTROLLER_PORT=${TALLY_KAFKA_CONTROLLER_PORT:-9093}
PG_PORT=${TALLY_PG_PORT:-5432}
REDIS_PORT=${TALLY_REDIS_PORT:-6379}
MODE=${TALLY_SERVICES_MODE:-auto}

KAFKA_POM=$SCRIPT_DIR/kafka/pom.xml
KAFKA_TEMPLATE=$SCRIPT_DIR/kafka/server.properties
KAFKA_LOG4J=$SCRIPT_DIR/kafka/log4j.properties
KAFKA_DIR=$CACHE_DIR/kafka
KAFKA_LIB=$KAFKA_DIR/lib
KAFKA_DATA=$KAFKA_DIR/data
KAFKA_PROPS=$KAFKA_DIR/server.properties
KAFKA_LOG=$KAFKA_DIR/kafka.log
KAFKA_PIDFILE=$KAFKA_DIR/kafka.pid
# Fixed so the data dir stays valid across re-renders; any 16 bytes, base64url without padding.
KAFKA_CLUSTER_ID=dGFsbHktbG9jYWwta2Fmaw
KAFKA_TIMEOUT=90

PG_DIR=$CACHE_DIR/pg
PG_DATA=$PG_DIR/data
PG_SOCKET_DIR=$PG_DIR/run
PG_LOG=$PG_DIR/pg.log
PG_TIMEOUT=30
PG_DATABASE=tally

REDIS_DIR=$CACHE_DIR/redis
REDIS_LOG=$REDIS_DIR/redis.log
REDIS_PIDFILE=$REDIS_DIR/redis.pid
REDIS_TIMEOUT=10

LOG_TAIL_LINES=40

PROG=services.sh
# shellcheck source=lib/common.sh
. "$SCRIPT_DIR/lib/common.sh"
# shellcheck source=lib/kafka.sh
. "$SCRIPT_DIR/lib/kafka.sh"

# --------------------------------------------------------------------------------------------
# Small helpers (the shared ones are in lib/common.sh and lib/kafka.sh)
# --------------------------------------------------------------------------------------------

# Our server is running but on another port than the one asked for now: waiting for it to
# answer would only time out.
wrong_port() {
    die "$1: ours is running (pid $2) but not on port $3; run 'scripts/services.sh down' first, or unset the TALLY_*_PORT change"
}

# --------------------------------------------------------------------------------------------
# Packages (native path only)
# --------------------------------------------------------------------------------------------

pg_bindir() {
    # Debian installs each major version side by side; use the newest.
    find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin -type d 2>/dev/null | sort -V | tail -n 1
}

redis_installed() { command -v redis-server >/dev/null && command -v redis-cli >/dev/null; }

# Install PostgreSQL / Redis / kcat / wrk (and Java / Maven, if even those are missing) from apt.
ensure_packages() {
    local missing=()
    [ -n "$(pg_bindir)" ] || missing+=(postgresql)
    redis_installed || missing+=(redis-server)
    command -v java >/dev/null || missing+=(default-jre-headless)
    command -v mvn >/dev/null || missing+=(maven)
    # kcat: the README's produce-by-hand example, and the test that proves it works.
    command -v kcat >/dev/null || missing+=(kcat)
    # wrk: the load generator of `tally bench http` (make bench).
    command -v wrk >/dev/null || missing+=(wrk)
    apt_install "${missing[@]}"
}

# apt-get install the packages named (none: nothing to do); also what scripts/redis-cluster.sh
# calls, having sourced this file. Debian's postinst scripts would start a system postgres on
# 5432 and a system redis on 6379, which would then occupy our ports; a policy-rc.d that exits
# 101 tells invoke-rc.d (and deb-systemd-invoke) not to start anything during the install.
apt_install() {
    local missing=("$@") sudo=() policy=/usr/sbin/policy-rc.d created_policy=0
    [ "${#missing[@]}" -gt 0 ] || return 0

    if ! is_root; then
        command -v sudo >/dev/null || die "need root or sudo to install: ${missing[*]}"
        sudo=(sudo)
    fi
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them with"

    say "packages: installing ${missing[*]} (apt)"
    if [ ! -e "$policy" ]; then
        "${sudo[@]}" sh -c "printf '#!/bin/sh\n# services.sh: no service starts during apt installs\nexit 101\n' >$policy && chmod 755 $policy"
        created_policy=1
        # Remove it again even if apt fails half way (set -e exits through this trap).
        # shellcheck disable=SC2064 # expand now: `sudo` is local to this function
        trap "${sudo[*]:-} rm -f $policy" EXIT
    fi
    local t0=$EPOCHREALTIME apt_log=$CACHE_DIR/apt.log
    mkdir -p "$CACHE_DIR"
    {
        "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q &&
            "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
                apt-get install -y -q --no-install-recommends "${missing[@]}"
    } >"$apt_log" 2>&1 || {
        show_log apt "$apt_log"
        die "packages: apt-get could not install ${missing[*]}"
    }
    if [ "$created_policy" -eq 1 ]; then
        "${sudo[@]}" rm -f "$policy"
        trap - EXIT
    fi
    say "packages: installed ${missing[*]} ($(since "$t0"))"
}

# --------------------------------------------------------------------------------------------
# Kafka
# --------------------------------------------------------------------------------------------

kafka_pid() { live_pid "$KAFKA_PIDFILE" "kafka.Kafka $KAFKA_PROPS"; }

# Rendered on every start so port changes apply; data dir and cluster id never change.
kafka_render_config() {
    sed -e "s|@KAFKA_PORT@|$KAFKA_PORT|g" \
        -e "s|@CONTROLLER_PORT@|$KAFKA_CONTROLLER_PORT|g" \
        -e "s|@DATA_DIR@|$KAFKA_DATA|g" \
        "$KAFKA_TEMPLATE" >"$KAFKA_PROPS.tmp"
    mv "$KAFKA_PROPS.tmp" "$KAFKA_PROPS"
}

kafka_format() { kafka_format_storage kafka "$KAFKA_DATA" "$KAFKA_PROPS" "$KAFKA_LOG" "$KAFKA_CLUSTER_ID"; }

# Sets KAFKA_LOG_OFFSET: readiness only looks at log lines written after this point.
kafka_launch() {
    KAFKA_LOG_OFFSET=$(kafka_log_start "$KAFKA_LOG" services.sh)
    # G1 with the pause goal Kafka's own launcher (kafka-run-class.sh) sets, which running
    # the JVM directly would lose: with G1's default goal (200 ms) the heap filled to
    # 440-490 MB between young pauses, which took 19 ms (median) to 56 ms on this box,
    # each one a stall of every request; with 20 ms, 13 ms and 30 ms at most
    # (-Xlog:gc over four `tally bench engine --count 200000` runs at 8 and 64 partitions).
    kafka_launch_jvm "$KAFKA_PIDFILE" "$KAFKA_LOG" "$KAFKA_PROPS" "$KAFKA_DIR" \
        -Xms512m -Xmx512m -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
        -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent
}

kafka_show_failure_here() { kafka_show_failure kafka "$KAFKA_LOG" "${KAFKA_LOG_OFFSET:-0}"; }

# Ready = the client port speaks Kafka AND this run's log says the server finished starting
# (the port opens a moment before the broker has caught up with the metadata log).
kafka_wait_ready() {
    local pid=$1 deadline=$((SECONDS + KAFKA_TIMEOUT))
    while :; do
        if ! alive "$pid"; then
            kafka_show_failure_here
            die "kafka: the broker (pid $pid) exited during startup"
        fi
        if kafka_probe "$KAFKA_PORT" && kafka_log_says_started "$KAFKA_LOG" "$KAFKA_LOG_OFFSET"; then
            return 0
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            kafka_show_failure_here
            die "kafka: not ready on 127.0.0.1:$KAFKA_PORT after ${KAFKA_TIMEOUT}s (pid $pid still running; log above)"
        fi
        sleep 0.5
    done
}

# Phase 1 of `up`: reuse or launch. Sets KAFKA_STARTED_PID when a new broker was launched, so
# the caller can start PostgreSQL and Redis while the JVM boots, then call kafka_up_finish.
kafka_up_begin() {
    local pid
    KAFKA_STARTED_PID=
    KAFKA_T0=$EPOCHREALTIME
    mkdir -p "$KAFKA_DIR"
    if pid=$(kafka_pid); then
        grep -q "^listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT," "$KAFKA_PROPS" ||
            wrong_port kafka "$pid" "$KAFKA_PORT"
        KAFKA_LOG_OFFSET=0
        kafka_probe "$KAFKA_PORT" || kafka_wait_ready "$pid"
        say "kafka: already running (pid $pid)"
        return 0
    fi
    # A pidfile whose process is gone (kill -9, reboot) is just stale.
    rm -f "$KAFKA_PIDFILE"
    if kafka_probe "$KAFKA_PORT"; then
        say "kafka: already running (not ours: a broker answers on 127.0.0.1:$KAFKA_PORT)"
        return 0
    fi
    port_open "$KAFKA_PORT" && die "kafka: port $KAFKA_PORT is taken by something that is not Kafka"
    port_open "$KAFKA_CONTROLLER_PORT" &&
        die "kafka: controller port $KAFKA_CONTROLLER_PORT is taken (set TALLY_KAFKA_CONTROLLER_PORT)"

    kafka_fetch_lib
    kafka_render_config
    kafka_format
    KAFKA_T0=$EPOCHREALTIME # time the broker start itself, not the one-off download
    kafka_launch
    KAFKA_STARTED_PID=$(kafka_pid) || {
        show_log kafka "$KAFKA_LOG"
        die "kafka: the broker did not come up (no live pid in $KAFKA_PIDFILE)"
    }
}

kafka_up_finish() {
    [ -n "$KAFKA_STARTED_PID" ] || return 0
    kafka_wait_ready "$KAFKA_STARTED_PID"
    say "kafka: started (pid $KAFKA_STARTED_PID, $(since "$KAFKA_T0"))"
}

kafka_down() {
    local pid t0=$EPOCHREALTIME
    if ! pid=$(kafka_pid); then
        rm -f "$KAFKA_PIDFILE"
        say "kafka: not running"
        return 0
    fi
    # SIGTERM = controlled shutdown: flushes logs, so the next start skips log recovery.
    kill -TERM "$pid" 2>/dev/null || true
    if ! wait_exit "$pid" 30; then
        warn "kafka: pid $pid ignored SIGTERM for 30s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        wait_exit "$pid" 10 || die "kafka: pid $pid survived SIGKILL"
    fi
    rm -f "$KAFKA_PIDFILE"
    say "kafka: stopped (pid $pid, $(since "$t0"))"
}

kafka_status() {
    local pid
    if pid=$(kafka_pid) && kafka_probe "$KAFKA_PORT"; then
        say "kafka: up (pid $pid, 127.0.0.1:$KAFKA_PORT)"
    elif [ -n "${pid:-}" ]; then
        say "kafka: starting or stuck (pid $pid, port $KAFKA_PORT not answering)"
        return 1
    elif kafka_probe "$KAFKA_PORT"; then
        say "kafka: up (not ours, 127.0.0.1:$KAFKA_PORT)"
    else
        say "kafka: down"
        return 1
    fi
}

# --------------------------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------------------------

# initdb and pg_ctl refuse to run as root, so as root every server-side command runs as the
# `postgres` system user (created by Debian's package), which then owns the data dir.
as_pg() {
    if is_root; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

pg_require() {
    PG_BIN=$(pg_bindir)
    [ -n "$PG_BIN" ] || die "postgres: no /usr/lib/postgresql/*/bin (run 'scripts/services.sh up' to install)"
    if is_root; then
        id -u postgres >/dev/null 2>&1 || die "postgres: running as root needs the 'postgres' system user"
    fi
}

pg_isready() { "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" -t 2; }

# The postmaster pid, if a server is running on our data dir. (Not `pg_ctl status`: it uses
# kill -0 and so reports a killed postmaster as running until its zombie is reaped.)
pg_pid() { live_pid "$PG_DATA/postmaster.pid" "$PG_DATA"; }

# A postmaster killed with -9 leaves postmaster.pid behind. The next postmaster removes it
# itself, but refuses while that pid still exists, even as an unreaped zombie: wait that out.
pg_clear_stale_pid() {
    local pid deadline=$((SECONDS + 15))
    [ -s "$PG_DATA/postmaster.pid" ] || return 0
    pid=$(head -n 1 "$PG_DATA/postmaster.pid" | tr -dc '0-9')
    [ -n "$pid" ] || return 0
    while [ -e "/proc/$pid" ] && ! alive "$pid"; do
        [ "$SECONDS" -lt "$deadline" ] || break
        sleep 0.2
    done
}

pg_wait_ready() {
    local deadline=$((SECONDS + PG_TIMEOUT))
    until pg_isready; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            show_log postgres "$PG_LOG"
            die "postgres: not accepting connections on 127.0.0.1:$PG_PORT after ${PG_TIMEOUT}s (log above)"
        fi
        sleep 0.2
    done
}

# Directories the server writes to must belong to the user it runs as; as root that means
# handing them to `postgres`, which in turn needs to traverse every parent directory.
pg_prepare_dirs() {
    mkdir -p "$PG_DIR" "$PG_SOCKET_DIR"
    if is_root; then
        chown postgres: "$PG_DIR" "$PG_SOCKET_DIR"
        [ -e "$PG_LOG" ] && chown postgres: "$PG_LOG"
        runuser -u postgres -- test -w "$PG_DIR" ||
            die "postgres: the 'postgres' user cannot reach $PG_DIR; every parent directory must be traversable by it (chmod o+x), or point TALLY_CACHE_DIR somewhere that is"
    fi
    chmod 700 "$PG_SOCKET_DIR"
}

# First start only. Settings that never change go into postgresql.conf; port, listen address
# and socket dir are passed on the pg_ctl command line so TALLY_PG_PORT can change between runs.
pg_init() {
    [ -f "$PG_DATA/PG_VERSION" ] && return 0
    local t0=$EPOCHREALTIME
    as_pg "$PG_BIN/initdb" -D "$PG_DATA" -A trust -U postgres -E UTF8 --no-locale \
        >"$PG_DIR/initdb.log" 2>&1 || {
        show_log postgres "$PG_DIR/initdb.log"
        die "postgres: initdb failed"
    }
    as_pg tee -a "$PG_DATA/postgresql.conf" >/dev/null <<'EOF'

# ---- added by scripts/services.sh (port/listen/socket come from pg_ctl -o) ----
max_connections = 200
shared_buffers = 256MB
EOF
    say "postgres: initialised $PG_DATA ($(since "$t0"))"
}

pg_start() {
    as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$PG_LOG" -w -t "$PG_TIMEOUT" \
        -o "-c listen_addresses=127.0.0.1 -c port=$PG_PORT -c unix_socket_directories=$PG_SOCKET_DIR" \
        start >/dev/null 2>&1 9>&- || {
        show_log postgres "$PG_LOG"
        die "postgres: pg_ctl start failed or not ready within ${PG_TIMEOUT}s (log above)"
    }
}

# The app's database. Over TCP (trust auth on loopback), so this works as any OS user.
pg_ensure_database() {
    local psql=("$PG_BIN/psql" -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -v ON_ERROR_STOP=1 -qtA)
    if [ "$("${psql[@]}" -c "select 1 from pg_database where datname = '$PG_DATABASE'")" != 1 ]; then
        "${psql[@]}" -c "create database $PG_DATABASE owner postgres" >/dev/null
    fi
}

pg_up() {
    local pid t0=$EPOCHREALTIME
    pg_require
    if pid=$(pg_pid); then
        cmdline_has "$pid" "port=$PG_PORT " || wrong_port postgres "$pid" "$PG_PORT"
        pg_wait_ready # it may still be starting or recovering
        pg_ensure_database
        say "postgres: already running (pid $pid)"
        return 0
    fi
    if pg_isready; then
        pg_ensure_database || warn "postgres: could not create database '$PG_DATABASE' on the existing server"
        say "postgres: already running (not ours: a server answers on 127.0.0.1:$PG_PORT)"
        return 0
    fi
    port_open "$PG_PORT" && die "postgres: port $PG_PORT is taken by something that is not PostgreSQL"

    pg_init
    pg_clear_stale_pid
    pg_start
    pg_ensure_database
    pid=$(pg_pid) || die "postgres: started, but no live postmaster in $PG_DATA/postmaster.pid"
    say "postgres: started (pid $pid, $(since "$t0"))"
}

pg_down() {
    local pid t0=$EPOCHREALTIME
    PG_BIN=$(pg_bindir)
    if [ -z "$PG_BIN" ] || ! pid=$(pg_pid); then
        say "postgres: not running"
        return 0
    fi
    # fast = roll back open transactions and disconnect clients instead of waiting for them.
    as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -m fast -w -t 60 stop >/dev/null ||
        die "postgres: pg_ctl stop failed (see $PG_LOG)"
    say "postgres: stopped (pid $pid, $(since "$t0"))"
}

pg_status() {
    local pid
    PG_BIN=$(pg_bindir)
    if [ -z "$PG_BIN" ]; then
        say "postgres: down (not installed)"
        return 1
    fi
    if pid=$(pg_pid) && pg_isready; then
        say "postgres: up (pid $pid, 127.0.0.1:$PG_PORT)"
    elif [ -n "${pid:-}" ]; then
        say "postgres: running (pid $pid) but not accepting connections on 127.0.0.1:$PG_PORT"
        return 1
    elif pg_isready; then
        say "postgres: up (not ours, 127.0.0.1:$PG_PORT)"
    else
        say "postgres: down"
        return 1
    fi
}

# --------------------------------------------------------------------------------------------
# Redis
# --------------------------------------------------------------------------------------------

redis_pid() { live_pid "$REDIS_PIDFILE" redis-server; }

redis_ping() { [ "$(timeout 2 redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ]; }

redis_wait_ready() {
    local deadline=$((SECONDS + REDIS_TIMEOUT))
    until redis_ping; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            show_log redis "$REDIS_LOG"
            die "redis: no PONG on 127.0.0.1:$REDIS_PORT after ${REDIS_TIMEOUT}s (log above)"
        fi
        sleep 0.1
    done
}

redis_up() {
    local pid t0=$EPOCHREALTIME
    redis_installed || die "redis: redis-server/redis-cli not installed"
    mkdir -p "$REDIS_DIR"
    if pid=$(redis_pid); then
        cmdline_has "$pid" ":$REDIS_PORT" || wrong_port redis "$pid" "$REDIS_PORT"
        redis_wait_ready
        say "redis: already running (pid $pid)"
        return 0
    fi
    rm -f "$REDIS_PIDFILE"
    if redis_ping; then
        say "redis: already running (not ours: a server answers on 127.0.0.1:$REDIS_PORT)"
        return 0
    fi
    port_open "$REDIS_PORT" && die "redis: port $REDIS_PORT is taken by something that is not Redis"

    # A cache, not a store: no RDB snapshots, no AOF. daemonize = it detaches by itself.
    redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --dir "$REDIS_DIR" \
        --daemonize yes --pidfile "$REDIS_PIDFILE" --logfile "$REDIS_LOG" \
        --save '' --appendonly no --protected-mode yes 9>&- || {
        show_log redis "$REDIS_LOG"
        die "redis: redis-server failed to start"
    }
    redis_wait_ready
    pid=$(redis_pid) || die "redis: answers PONG but $REDIS_PIDFILE has no live redis-server"
    say "redis: started (pid $pid, $(since "$t0"))"
}

redis_down() {
    local pid t0=$EPOCHREALTIME
    if ! pid=$(redis_pid); then
        rm -f "$REDIS_PIDFILE"
        say "redis: not running"
        return 0
    fi
    # nosave: nothing to persist. If the port changed since `up`, SIGTERM does the same.
    timeout 5 redis-cli -h 127.0.0.1 -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 ||
        kill -TERM "$pid" 2>/dev/null || true
    if ! wait_exit "$pid" 10; then
        kill -KILL "$pid" 2>/dev/null || true
        wait_exit "$pid" 5 || die "redis: pid $pid survived SIGKILL"
    fi
    rm -f "$REDIS_PIDFILE"
    say "redis: stopped (pid $pid, $(since "$t0"))"
}

redis_status() {
    local pid
    if pid=$(redis_pid) && redis_ping; then
        say "redis: up (pid $pid, 127.0.0.1:$REDIS_PORT)"
    elif [ -n "${pid:-}" ]; then
        say "redis: running (pid $pid) but no PONG on 127.0.0.1:$REDIS_PORT"
        return 1
    elif redis_ping; then
        say "redis: up (not ours, 127.0.0.1:$REDIS_PORT)"
    else
        say "redis: down"
        return 1
    fi
}

# --------------------------------------------------------------------------------------------
# Docker (only when an engine answers)
# --------------------------------------------------------------------------------------------

COMPOSE=()

# Decide once per invocation. `docker info` fails fast when the client has no daemon.
use_docker() {
    case $MODE in
    native) return 1 ;;
    auto | docker) ;;
    *) die "TALLY_SERVICES_MODE must be auto, native or docker (got '$MODE')" ;;
    esac
    if command -v docker >/dev/null && timeout 20 docker info >/dev/null 2>&1; then
        if docker compose version >/dev/null 2>&1; then
            COMPOSE=(docker compose)
        elif command -v docker-compose >/dev/null; then
            COMPOSE=(docker-compose)
        else
            [ "$MODE" = docker ] && die "a Docker engine answers but neither 'docker compose' nor docker-compose exists"
            warn "services.sh: Docker engine found but no compose; using native services"
            return 1
        fi
        COMPOSE+=(-f "$REPO_ROOT/docker-compose.yml" -p tally)
        export TALLY_KAFKA_PORT=$KAFKA_PORT TALLY_PG_PORT=$PG_PORT TALLY_REDIS_PORT=$REDIS_PORT
        return 0
    fi
    [ "$MODE" = docker ] && die "TALLY_SERVICES_MODE=docker but no Docker engine answers"
    return 1
}

# --------------------------------------------------------------------------------------------
# Subcommands
# --------------------------------------------------------------------------------------------

# One `up`/`down` at a time per cache dir: two concurrent `up`s would both see "not running".
# Every server launch closes fd 9 (`9>&-`), or the daemons would hold the lock forever.
take_lock() {
    mkdir -p "$CACHE_DIR"
    exec 9>"$CACHE_DIR/.services.lock"
    flock -w 180 9 || die "another services.sh up/down holds $CACHE_DIR/.services.lock"
}

cmd_up() {
    if use_docker; then
        local t0=$EPOCHREALTIME
        "${COMPOSE[@]}" up -d --wait
        say "docker: kafka, postgres, redis up ($(since "$t0"))"
        return 0
    fi
    take_lock
    ensure_packages
    # Checks that can fail on a misconfigured machine, before anything is launched.
    pg_require
    pg_prepare_dirs
    # Kafka's JVM takes the longest to boot, so launch it first and start PostgreSQL and
    # Redis while it does; then wait for Kafka.
    kafka_up_begin
    pg_up
    redis_up
    kafka_up_finish
}

cmd_down() {
    # Stop native services even when Docker is around: they may predate the engine.
    if use_docker; then
        "${COMPOSE[@]}" down
    fi
    take_lock
    kafka_down
    pg_down
    redis_down
}

cmd_status() {
    local rc=0
    kafka_status || rc=1
    pg_status || rc=1
    redis_status || rc=1
    return "$rc"
}

cmd_logs() {
    local follow=()
    [ "${1:-}" = -f ] && follow=(-F)
    if use_docker; then
        "${COMPOSE[@]}" logs --tail "$LOG_TAIL_LINES" ${follow[@]:+-f}
        return 0
    fi
    local files=() f
    for f in "$KAFKA_LOG" "$PG_LOG" "$REDIS_LOG"; do
        [ -e "$f" ] && files+=("$f")
    done
    [ "${#files[@]}" -gt 0 ] || die "no logs under $CACHE_DIR yet (run 'scripts/services.sh up')"
    tail -n "$LOG_TAIL_LINES" "${follow[@]}" "${files[@]}"
}

usage() {
    sed -n '2,7p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

main() {
    local cmd=${1:-}
    [ $# -gt 0 ] && shift
    case $cmd in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    logs) cmd_logs "$@" ;;
    -h | --help | help) usage ;;
    *)
        usage >&2
        exit 2
        ;;
    esac
}

# Sourced (by scripts/redis-cluster.sh, for the helpers above): define, do not run.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    main "$@"
fi
