#!/usr/bin/env bash
# A local three-broker Kafka cluster (KRaft) on 127.0.0.1, for the cluster tests and chaos.
#
#   scripts/kafka-cluster.sh up       start the brokers that are not running (idempotent), wait
#                                     until all three are registered and metadata answers
#   scripts/kafka-cluster.sh down     stop the three brokers (together: see cmd_down)
#   scripts/kafka-cluster.sh status   one line per broker and one for the cluster; exit 0 only
#                                     if all three answer and the metadata lists all three
#   scripts/kafka-cluster.sh logs [-f]  last lines of the three logs (-f: follow)
#   scripts/kafka-cluster.sh purge    down, then delete the cluster's state (every topic)
#
# Node n (1..3) is broker and controller in one JVM: client port 2909(1+n), controller port
# 2919(1+n), a 3-voter controller quorum. It runs from the same jars as the single broker of
# scripts/services.sh ($TALLY_CACHE_DIR/kafka/lib, fetched by Maven on first use) and beside
# it: nothing here touches 127.0.0.1:9092. State, per node:
#
#   $TALLY_CACHE_DIR/kafka-cluster/broker-<n>/{data/,server.properties,kafka.log,kafka.pid}
#
# Clients bootstrap with TALLY_KAFKA_BOOTSTRAP=127.0.0.1:29092,127.0.0.1:29093,127.0.0.1:29094.
# Sized for a 2-core machine that also runs the single broker: 512 MiB heaps, one GC thread
# each, few network/io threads (scripts/kafka/cluster.properties).
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
# Absolute, because the paths end up in the processes' command lines and pidfile checks.
CACHE_DIR=$(realpath -m "${TALLY_CACHE_DIR:-$REPO_ROOT/.cache}")

PROG=kafka-cluster.sh
# shellcheck source=lib/common.sh
. "$SCRIPT_DIR/lib/common.sh"
# shellcheck source=lib/kafka.sh
. "$SCRIPT_DIR/lib/kafka.sh"

# Shared with services.sh: the jars and where Maven logs to.
KAFKA_POM=$SCRIPT_DIR/kafka/pom.xml
KAFKA_LOG4J=$SCRIPT_DIR/kafka/log4j.properties
KAFKA_DIR=$CACHE_DIR/kafka
KAFKA_LIB=$KAFKA_DIR/lib

TEMPLATE=$SCRIPT_DIR/kafka/cluster.properties
CLUSTER_DIR=$CACHE_DIR/kafka-cluster
NODES=(1 2 3)
BROKER_BASE_PORT=29091
CONTROLLER_BASE_PORT=29191
VOTERS=1@127.0.0.1:29192,2@127.0.0.1:29193,3@127.0.0.1:29194
# Fixed so the data dirs stay valid across re-renders; not the single broker's id, so a data
# dir of one can never be mistaken for the other's ("tally-kafka-clus", base64url).
CLUSTER_ID=dGFsbHkta2Fma2EtY2x1cw
# Three JVMs booting at once on two cores, then electing a controller: ~20 s; the bound
# leaves room for a loaded machine.
TIMEOUT=150
# Small heaps, and one GC thread each: three brokers' collectors must not take both cores.
JVM_OPTS=(-Xms256m -Xmx512m -XX:+UseG1GC -XX:ParallelGCThreads=1 -XX:ConcGCThreads=1
    -XX:+ExitOnOutOfMemoryError)

broker_port() { echo $((BROKER_BASE_PORT + $1)); }
controller_port() { echo $((CONTROLLER_BASE_PORT + $1)); }
node_dir() { echo "$CLUSTER_DIR/broker-$1"; }
bootstrap() {
    local n out=()
    for n in "${NODES[@]}"; do out+=("127.0.0.1:$(broker_port "$n")"); done
    (IFS=,; echo "${out[*]}")
}

node_pid() { live_pid "$(node_dir "$1")/kafka.pid" "kafka.Kafka $(node_dir "$1")/server.properties"; }

render_config() {
    local n=$1 dir
    dir=$(node_dir "$n")
    mkdir -p "$dir"
    sed -e "s|@NODE_ID@|$n|g" \
        -e "s|@BROKER_PORT@|$(broker_port "$n")|g" \
        -e "s|@CONTROLLER_PORT@|$(controller_port "$n")|g" \
        -e "s|@VOTERS@|$VOTERS|g" \
        -e "s|@DATA_DIR@|$dir/data|g" \
        "$TEMPLATE" >"$dir/server.properties.tmp"
    mv "$dir/server.properties.tmp" "$dir/server.properties"
}

# The most brokers any node's metadata lists (empty if none answers).
registered() {
    local n count best=
    for n in "${NODES[@]}"; do
        count=$(kafka_broker_count "$(broker_port "$n")") || continue
        if [ -z "$best" ] || [ "$count" -gt "$best" ]; then best=$count; fi
    done
    echo "$best"
}

# One up/down at a time per cache dir. Every JVM launch closes fd 9 (kafka_launch_jvm).
take_lock() {
    mkdir -p "$CACHE_DIR"
    exec 9>"$CACHE_DIR/.kafka-cluster.lock"
    flock -w 180 9 || die "another kafka-cluster.sh up/down holds $CACHE_DIR/.kafka-cluster.lock"
}

# The jars, under services.sh's own lock: the two scripts fetch into the same lib dir.
fetch_lib() {
    command -v java >/dev/null || die "java not found (scripts/services.sh up installs it)"
    kafka_lib_current && return 0
    command -v mvn >/dev/null || die "mvn not found (scripts/services.sh up installs it)"
    exec 8>"$CACHE_DIR/.services.lock"
    flock -w 300 8 || die "scripts/services.sh holds $CACHE_DIR/.services.lock"
    kafka_fetch_lib
    exec 8>&-
}

# Why the cluster is not ready yet, in one line (empty when it is).
not_ready_reason() {
    local n dir count
    for n in "${NODES[@]}"; do
        dir=$(node_dir "$n")
        if [ -n "${OFFSET[$n]:-}" ] && ! kafka_log_says_started "$dir/kafka.log" "${OFFSET[$n]}"; then
            echo "broker $n has not logged 'Kafka Server started'"
            return 0
        fi
        kafka_probe "$(broker_port "$n")" ||
            { echo "broker $n does not answer on 127.0.0.1:$(broker_port "$n")"; return 0; }
    done
    count=$(registered)
    [ "${count:-0}" -ge "${#NODES[@]}" ] ||
        echo "the metadata lists ${count:-none} of ${#NODES[@]} brokers"
}

# Render the configs of nodes $@ and format the data dirs that need it, the formatter JVMs
# side by side (each takes a few seconds to boot, most of a first start).
format_all() {
    local n dir pids=() failed=0
    for n in "$@"; do
        dir=$(node_dir "$n")
        render_config "$n"
        [ -f "$dir/data/meta.properties" ] && continue
        kafka_format_storage "kafka-$n" "$dir/data" "$dir/server.properties" "$dir/kafka.log" "$CLUSTER_ID" &
        pids+=($!)
    done
    for n in "${pids[@]}"; do
        wait "$n" || failed=1
    done
    [ "$failed" -eq 0 ] || die "formatting the brokers' data directories failed (log above)"
}

cmd_up() {
    local n pid dir t0=$EPOCHREALTIME launch=()
    declare -gA OFFSET=()
    take_lock
    # First what runs and what is in the way, so a conflict fails before anything starts.
    for n in "${NODES[@]}"; do
        dir=$(node_dir "$n")
        if pid=$(node_pid "$n"); then
            grep -q "^listeners=PLAINTEXT://127.0.0.1:$(broker_port "$n")," "$dir/server.properties" ||
                die "kafka-$n: ours is running (pid $pid) with another config; run '$0 down' first"
            say "kafka-$n: already running (pid $pid)"
            continue
        fi
        # A pidfile whose process is gone (kill -9, reboot) is just stale.
        rm -f "$dir/kafka.pid"
        # Started from another checkout's TALLY_CACHE_DIR, say: use it, as services.sh does.
        if kafka_probe "$(broker_port "$n")"; then
            say "kafka-$n: already running (not ours: a broker answers on 127.0.0.1:$(broker_port "$n"))"
            continue
        fi
        port_open "$(broker_port "$n")" && die "kafka-$n: port $(broker_port "$n") is taken by something that is not Kafka"
        port_open "$(controller_port "$n")" && die "kafka-$n: controller port $(controller_port "$n") is taken"
        launch+=("$n")
    done
    if [ "${#launch[@]}" -gt 0 ]; then
        fetch_lib
        t0=$EPOCHREALTIME # time the cluster start, not a one-off download
    fi
    format_all "${launch[@]}"
    for n in "${launch[@]}"; do
        dir=$(node_dir "$n")
        OFFSET[$n]=$(kafka_log_start "$dir/kafka.log" "$PROG")
        kafka_launch_jvm "$dir/kafka.pid" "$dir/kafka.log" "$dir/server.properties" "$dir" "${JVM_OPTS[@]}"
        node_pid "$n" >/dev/null || {
            show_log "kafka-$n" "$dir/kafka.log"
            die "kafka-$n: the broker did not come up (no live pid in $dir/kafka.pid)"
        }
    done
    wait_ready
    for n in "${launch[@]}"; do
        say "kafka-$n: started (pid $(node_pid "$n"), 127.0.0.1:$(broker_port "$n"))"
    done
    say "kafka-cluster: ${#NODES[@]} brokers registered, bootstrap $(bootstrap) ($(since "$t0"))"
}

wait_ready() {
    local n pid reason deadline=$((SECONDS + TIMEOUT))
    while :; do
        # The ones launched now; one that was running already is checked by its port.
        for n in "${!OFFSET[@]}"; do
            if ! pid=$(node_pid "$n"); then
                kafka_show_failure "kafka-$n" "$(node_dir "$n")/kafka.log" "${OFFSET[$n]:-0}"
                die "kafka-$n: the broker exited during startup (log above; '$0 down' stops the others)"
            fi
        done
        reason=$(not_ready_reason)
        [ -n "$reason" ] || return 0
        if [ "$SECONDS" -ge "$deadline" ]; then
            for n in "${NODES[@]}"; do
                kafka_show_failure "kafka-$n" "$(node_dir "$n")/kafka.log" "${OFFSET[$n]:-0}"
            done
            die "not ready after ${TIMEOUT}s: $reason (logs above; '$0 down' stops the brokers)"
        fi
        sleep 0.5
    done
}

# All three at once: a broker's controlled shutdown needs the controller quorum, so stopping
# them one after the other would leave the last one waiting for a quorum that is gone.
cmd_down() {
    local n pid t0=$EPOCHREALTIME pids=()
    take_lock
    for n in "${NODES[@]}"; do
        if pid=$(node_pid "$n"); then
            kill -TERM "$pid" 2>/dev/null || true
            pids[n]=$pid
        else
            rm -f "$(node_dir "$n")/kafka.pid"
            say "kafka-$n: not running"
        fi
    done
    for n in "${!pids[@]}"; do
        pid=${pids[n]}
        if ! wait_exit "$pid" 60; then
            warn "kafka-$n: pid $pid ignored SIGTERM for 60s; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            wait_exit "$pid" 10 || die "kafka-$n: pid $pid survived SIGKILL"
        fi
        rm -f "$(node_dir "$n")/kafka.pid"
        say "kafka-$n: stopped (pid $pid, $(since "$t0"))"
    done
}

cmd_purge() {
    cmd_down
    rm -rf "$CLUSTER_DIR"
    say "kafka-cluster: deleted $CLUSTER_DIR"
}

cmd_status() {
    local n pid rc=0 count
    for n in "${NODES[@]}"; do
        if pid=$(node_pid "$n") && kafka_probe "$(broker_port "$n")"; then
            say "kafka-$n: up (pid $pid, 127.0.0.1:$(broker_port "$n"))"
        elif [ -n "${pid:-}" ]; then
            say "kafka-$n: starting or stuck (pid $pid, port $(broker_port "$n") not answering)"
            rc=1
        elif kafka_probe "$(broker_port "$n")"; then
            say "kafka-$n: up (not ours, 127.0.0.1:$(broker_port "$n"))"
        else
            say "kafka-$n: down"
            rc=1
        fi
        pid=
    done
    count=$(registered)
    if [ "${count:-0}" -ge "${#NODES[@]}" ]; then
        say "kafka-cluster: up ($count brokers registered, bootstrap $(bootstrap))"
    else
        say "kafka-cluster: down (${count:-none} of ${#NODES[@]} brokers registered)"
        rc=1
    fi
    return "$rc"
}

cmd_logs() {
    local follow=() files=() n f
    [ "${1:-}" = -f ] && follow=(-F)
    for n in "${NODES[@]}"; do
        f=$(node_dir "$n")/kafka.log
        [ -e "$f" ] && files+=("$f")
    done
    [ "${#files[@]}" -gt 0 ] || die "no logs under $CLUSTER_DIR yet (run '$0 up')"
    tail -n "$LOG_TAIL_LINES" "${follow[@]}" "${files[@]}"
}

usage() {
    sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

main() {
    local cmd=${1:-}
    [ $# -gt 0 ] && shift
    case $cmd in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    logs) cmd_logs "$@" ;;
    purge) cmd_purge ;;
    -h | --help | help) usage ;;
    *)
        usage >&2
        exit 2
        ;;
    esac
}

main "$@"
