#!/usr/bin/env bash
# A Redis Cluster for the cluster tests: 3 masters + 3 replicas on 127.0.0.1:17001..17006.
#
#   scripts/redis-cluster.sh up       reuse a healthy cluster, else start the nodes (creating
#                                     the cluster, or recreating a broken one) and wait for it
#   scripts/redis-cluster.sh down     stop the six nodes (their cluster config is kept)
#   scripts/redis-cluster.sh status   one line per node, then the cluster; exit 0 only if healthy
#
# It runs beside the single Redis of scripts/services.sh (6379), which it never touches, from
# the same Debian redis-server (apt-installed if missing, by services.sh's own helper). Each
# node's state lives in $TALLY_CACHE_DIR/redis-cluster/<port>/: nodes.conf (the cluster
# config), redis.pid, redis.log. Like the single Redis it is a cache: no RDB, no AOF, so a
# node that restarts comes back empty and (its slots having failed over) rejoins as a replica.
#
# Tally uses it with TALLY_REDIS_CLUSTER=true TALLY_REDIS_URL=redis://127.0.0.1:17001/0.
#
# Environment:
#   TALLY_CACHE_DIR                        state directory (default <repo>/.cache)
#   TALLY_REDIS_CLUSTER_PORT               the first node's port (default 17001; six in a row,
#                                          and their cluster-bus ports 10000 above)
#   TALLY_REDIS_CLUSTER_NODE_TIMEOUT_MS    cluster-node-timeout (default 3000): how long a
#                                          master may be silent before its replica takes over
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# The helpers (say, die, alive, live_pid, wait_exit, show_log, since, apt_install,
# redis_installed...) and CACHE_DIR come from services.sh, which only defines them when sourced.
# shellcheck source=services.sh
source "$SCRIPT_DIR/services.sh"
die() { warn "redis-cluster.sh: $*"; exit 1; }

FIRST_PORT=${TALLY_REDIS_CLUSTER_PORT:-17001}
NODE_TIMEOUT_MS=${TALLY_REDIS_CLUSTER_NODE_TIMEOUT_MS:-3000}
NODES=6
PORTS=()
for ((i = 0; i < NODES; i++)); do PORTS+=($((FIRST_PORT + i))); done
CLUSTER_DIR=$CACHE_DIR/redis-cluster
# How long `up` waits for the cluster to be whole (all nodes cluster_state:ok, replicas synced),
# after starting nodes of an existing cluster (rejoining) and after creating one.
REJOIN_TIMEOUT=20
CREATE_TIMEOUT=60

node_dir() { printf '%s/%s\n' "$CLUSTER_DIR" "$1"; }
node_pid() { live_pid "$(node_dir "$1")/redis.pid" "redis-server 127.0.0.1:$1"; }
cli() {
    local port=$1
    shift
    timeout 3 redis-cli -h 127.0.0.1 -p "$port" "$@" 2>/dev/null
}
node_ping() { [ "$(cli "$1" ping)" = PONG ]; }
# One field of `CLUSTER INFO` (or of `INFO replication` with $3 = replication).
info_field() {
    if [ "${3:-}" = replication ]; then
        cli "$1" info replication | tr -d '\r' | sed -n "s/^$2://p"
    else
        cli "$1" cluster info | tr -d '\r' | sed -n "s/^$2://p"
    fi
}

# ---------------------------------------------------------------------------------------------
# One node
# ---------------------------------------------------------------------------------------------

node_start() {
    local port=$1 dir
    dir=$(node_dir "$port")
    mkdir -p "$dir"
    rm -f "$dir/redis.pid"
    port_open "$port" && die "node $port: the port is taken by something that is not our node"
    port_open $((port + 10000)) && die "node $port: cluster-bus port $((port + 10000)) is taken"
    # maxmemory + noeviction: a full node refuses writes (the sink retries) rather than
    # silently evicting balances the audit would then miss. replica-validity-factor 0: a
    # replica always takes over from a dead master, however long it was disconnected (a
    # test cluster prefers available to strictly fresh). Full coverage off: while one
    # master's slots fail over, the other two keep answering for theirs.
    redis-server --bind 127.0.0.1 --port "$port" --dir "$dir" \
        --daemonize yes --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" \
        --cluster-enabled yes --cluster-config-file "$dir/nodes.conf" \
        --cluster-node-timeout "$NODE_TIMEOUT_MS" --cluster-replica-validity-factor 0 \
        --cluster-require-full-coverage no \
        --maxmemory 128mb --maxmemory-policy noeviction \
        --save '' --appendonly no --protected-mode yes 9>&- || {
        show_log "node $port" "$dir/redis.log"
        die "node $port: redis-server failed to start"
    }
}

node_wait_ping() {
    local port=$1 deadline=$((SECONDS + REDIS_TIMEOUT))
    until node_ping "$port"; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            show_log "node $port" "$(node_dir "$port")/redis.log"
            die "node $port: no PONG after ${REDIS_TIMEOUT}s (log above)"
        fi
        sleep 0.1
    done
}

node_stop() {
    local port=$1 pid
    pid=$(node_pid "$port") || {
        rm -f "$(node_dir "$port")/redis.pid"
        return 0
    }
    cli "$port" shutdown nosave >/dev/null || kill -TERM "$pid" 2>/dev/null || true
    if ! wait_exit "$pid" 10; then
        kill -KILL "$pid" 2>/dev/null || true
        wait_exit "$pid" 5 || die "node $port: pid $pid survived SIGKILL"
    fi
    rm -f "$(node_dir "$port")/redis.pid"
}

# ---------------------------------------------------------------------------------------------
# The cluster
# ---------------------------------------------------------------------------------------------

# Empty if the cluster is whole, else the first reason it is not: every node answers and says
# cluster_state:ok with all 16384 slots and all six nodes known; the cluster has 3 masters and
# 3 replicas, none flagged failing; every replica's replication link is up.
unhealthy() {
    local port nodes masters replicas
    for port in "${PORTS[@]}"; do
        node_ping "$port" || { echo "node $port does not answer"; return; }
        [ "$(info_field "$port" cluster_state)" = ok ] || { echo "node $port: cluster_state not ok"; return; }
        [ "$(info_field "$port" cluster_slots_assigned)" = 16384 ] || { echo "node $port: slots not all assigned"; return; }
        [ "$(info_field "$port" cluster_known_nodes)" = "$NODES" ] || { echo "node $port: does not know all $NODES nodes"; return; }
    done
    nodes=$(cli "${PORTS[0]}" cluster nodes) || { echo "no CLUSTER NODES answer"; return; }
    # The third field holds a node's flags: myself,master / slave / master,fail? ...
    if awk '$3 ~ /fail|noaddr|handshake/ { bad = 1 } END { exit !bad }' <<<"$nodes"; then
        echo "a node is flagged failing"
        return
    fi
    masters=$(awk '$3 ~ /master/' <<<"$nodes" | wc -l)
    replicas=$(awk '$3 ~ /slave/' <<<"$nodes" | wc -l)
    [ "$masters" = 3 ] && [ "$replicas" = 3 ] || { echo "$masters masters, $replicas replicas (want 3 and 3)"; return; }
    for port in "${PORTS[@]}"; do
        if [ "$(info_field "$port" role replication)" = slave ] &&
            [ "$(info_field "$port" master_link_status replication)" != up ]; then
            echo "replica $port: replication link not up"
            return
        fi
    done
}

wait_healthy() {
    local timeout=$1 deadline=$((SECONDS + $1)) why
    while why=$(unhealthy) && [ -n "$why" ]; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            printf '%s\n' "$why"
            return 1
        fi
        sleep 0.3
    done
}

# A node never made part of a cluster: it knows only itself and serves no slot.
fresh_node() {
    [ "$(info_field "$1" cluster_known_nodes)" = 1 ] &&
        [ "$(info_field "$1" cluster_slots_assigned)" = 0 ]
}

create_cluster() {
    local t0=$EPOCHREALTIME addresses=() port why log=$CLUSTER_DIR/create.log
    for port in "${PORTS[@]}"; do addresses+=("127.0.0.1:$port"); done
    # The first three become masters, the last three their replicas (one each).
    redis-cli --cluster create "${addresses[@]}" --cluster-replicas 1 --cluster-yes \
        >"$log" 2>&1 || {
        show_log "redis-cli --cluster create" "$log"
        die "redis-cli --cluster create failed"
    }
    why=$(wait_healthy "$CREATE_TIMEOUT") || die "created, but not whole after ${CREATE_TIMEOUT}s: $why"
    say "redis-cluster: created (3 masters + 3 replicas, $(since "$t0"))"
}

start_missing() {
    local port started=0
    for port in "${PORTS[@]}"; do
        node_pid "$port" >/dev/null && continue
        node_start "$port"
        started=$((started + 1))
    done
    for port in "${PORTS[@]}"; do node_wait_ping "$port"; done
    STARTED=$started
}

# How many nodes are fresh: all six = a cluster to create; some = one broken beyond rejoining
# (a node lost its nodes.conf), none = an existing cluster whose restarted nodes rejoin.
fresh_count() {
    local port n=0
    for port in "${PORTS[@]}"; do
        if fresh_node "$port"; then n=$((n + 1)); fi
    done
    echo "$n"
}

recreate() {
    local port
    warn "redis-cluster: $1; recreating it empty"
    for port in "${PORTS[@]}"; do node_stop "$port"; done
    for port in "${PORTS[@]}"; do rm -f "$(node_dir "$port")"/{nodes.conf,dump.rdb}; done
    start_missing
    create_cluster
}

cmd_up() {
    local t0=$EPOCHREALTIME why fresh
    redis_installed || apt_install redis-server
    mkdir -p "$CLUSTER_DIR"
    exec 9>"$CLUSTER_DIR/.lock"
    flock -w 180 9 || die "another redis-cluster.sh up/down holds $CLUSTER_DIR/.lock"

    if [ -z "$(unhealthy)" ]; then
        say "redis-cluster: already running (127.0.0.1:${PORTS[0]}..${PORTS[-1]})"
        return 0
    fi
    start_missing
    fresh=$(fresh_count)
    if [ "$fresh" = "$NODES" ]; then
        create_cluster
        return 0
    fi
    # Broken beyond rejoining (a half-made cluster, a node's config lost): start over. It
    # holds a cache only; the sinks rebuild what they had written.
    [ "$fresh" = 0 ] || { recreate "$fresh node(s) without cluster config"; return 0; }
    # An existing cluster: nodes restarted from their nodes.conf rejoin by themselves.
    if why=$(wait_healthy "$REJOIN_TIMEOUT"); then
        say "redis-cluster: up ($STARTED node(s) started, $(since "$t0"))"
        return 0
    fi
    recreate "not whole after ${REJOIN_TIMEOUT}s ($why)"
}

cmd_down() {
    local t0=$EPOCHREALTIME port stopped=0
    mkdir -p "$CLUSTER_DIR"
    exec 9>"$CLUSTER_DIR/.lock"
    flock -w 180 9 || die "another redis-cluster.sh up/down holds $CLUSTER_DIR/.lock"
    for port in "${PORTS[@]}"; do
        node_pid "$port" >/dev/null && stopped=$((stopped + 1))
        node_stop "$port"
    done
    say "redis-cluster: stopped ($stopped node(s), $(since "$t0"))"
}

cmd_status() {
    local port pid role why
    for port in "${PORTS[@]}"; do
        if pid=$(node_pid "$port") && node_ping "$port"; then
            role=$(info_field "$port" role replication)
            say "redis-cluster: node $port up (pid $pid, $role, cluster_state $(info_field "$port" cluster_state))"
        elif [ -n "${pid:-}" ]; then
            say "redis-cluster: node $port running (pid $pid) but not answering"
        else
            say "redis-cluster: node $port down"
        fi
        pid=
    done
    why=$(unhealthy)
    if [ -n "$why" ]; then
        say "redis-cluster: not healthy ($why)"
        return 1
    fi
    say "redis-cluster: healthy (3 masters + 3 replicas, cluster_state ok on all nodes)"
}

case ${1:-} in
up) cmd_up ;;
down) cmd_down ;;
status) cmd_status ;;
-h | --help | help) sed -n '2,7p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' ;;
*)
    sed -n '2,7p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
    ;;
esac
