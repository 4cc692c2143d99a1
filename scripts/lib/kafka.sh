# shellcheck shell=bash
# Kafka helpers shared by services.sh (one broker) and kafka-cluster.sh (three): the probes,
# the one classpath both run from, storage formatting, the JVM launch and the failure report.
# Sourced after common.sh. The caller sets:
#   KAFKA_DIR    $TALLY_CACHE_DIR/kafka: where the jars live (KAFKA_LIB) and mvn logs to
#   KAFKA_LIB    $KAFKA_DIR/lib
#   KAFKA_POM    scripts/kafka/pom.xml
#   KAFKA_LOG4J  scripts/kafka/log4j.properties

# Send the Kafka request $2 (printf escapes, size prefix included) to 127.0.0.1:$1 and print
# the first $3 bytes of the reply as hex, after checking it echoes correlation id 42 (which
# every request here carries): a Kafka listener, not whatever else might hold the port.
kafka_request() {
    local reply
    reply=$(timeout 3 bash -c '
        exec 3<>/dev/tcp/127.0.0.1/'"$1"'
        printf "'"$2"'" >&3
        head -c '"$3"' <&3 | od -An -tx1' 2>/dev/null | tr -d ' \n') || return 1
    [ "${reply:8:8}" = 0000002a ] || return 1
    printf '%s\n' "$reply"
}

# Is a Kafka broker answering on port $1? An ApiVersions v0 request (api key 18, client id
# "tally").
kafka_probe() {
    kafka_request "$1" '\x00\x00\x00\x0f\x00\x12\x00\x00\x00\x00\x00\x2a\x00\x05tally' 8 >/dev/null
}

# Print how many brokers the metadata of the broker on port $1 lists (fails if it does not
# answer). A Metadata v1 request (api key 3) for no topics at all: the reply is its size,
# the correlation id and then the broker array's length. In KRaft the metadata lists only
# brokers that registered with the controller quorum and are not fenced, which is what
# "the cluster is ready" means to a client.
kafka_broker_count() {
    local reply
    reply=$(kafka_request "$1" '\x00\x00\x00\x13\x00\x03\x00\x01\x00\x00\x00\x2a\x00\x05tally\x00\x00\x00\x00' 12) || return 1
    printf '%d\n' "0x${reply:16:8}"
}

# Are the jars in KAFKA_LIB the ones scripts/kafka/pom.xml asks for? The lib dir keeps the
# sha256 of the pom it was fetched from. (Not the pom's mtime: every git worktree of the repo
# has its own checkout time, and they share one TALLY_CACHE_DIR.) A lib fetched before the
# stamp existed counts as current unless the pom is newer, and is stamped.
kafka_lib_current() {
    local want
    [ -d "$KAFKA_LIB" ] || return 1
    want=$(sha256sum <"$KAFKA_POM" | cut -d' ' -f1)
    if [ -f "$KAFKA_LIB/.pom.sha256" ]; then
        [ "$(cat "$KAFKA_LIB/.pom.sha256")" = "$want" ]
        return
    fi
    [ ! "$KAFKA_POM" -nt "$KAFKA_LIB" ] || return 1
    echo "$want" >"$KAFKA_LIB/.pom.sha256"
}

# The classpath: resolved by Maven from scripts/kafka/pom.xml when kafka_lib_current says
# so; fetched into a temp dir first so a failed download never leaves a half-filled lib
# that would look current next time. (The JVM's `lib/*` classpath reads only *.jar.)
kafka_fetch_lib() {
    kafka_lib_current && return 0
    local t0=$EPOCHREALTIME tmp=$KAFKA_DIR/lib.tmp
    mkdir -p "$KAFKA_DIR"
    say "kafka: fetching jars from Maven Central into $KAFKA_LIB"
    rm -rf "$tmp"
    # Output to a file: -q still prints colour escapes, and the full text only matters on failure.
    mvn -q -B -f "$KAFKA_POM" dependency:copy-dependencies \
        -DincludeScope=runtime -DoutputDirectory="$tmp" >"$KAFKA_DIR/mvn.log" 2>&1 || {
        show_log mvn "$KAFKA_DIR/mvn.log"
        die "kafka: mvn could not resolve $KAFKA_POM (is Maven Central reachable?)"
    }
    sha256sum <"$KAFKA_POM" | cut -d' ' -f1 >"$tmp/.pom.sha256"
    rm -rf "$KAFKA_LIB"
    mv "$tmp" "$KAFKA_LIB"
    say "kafka: fetched $(find "$KAFKA_LIB" -name '*.jar' | wc -l) jars ($(since "$t0"))"
}

# KRaft refuses to start on an unformatted log dir. Only the first start formats;
# --ignore-formatted makes a repeat harmless anyway.
#   kafka_format_storage NAME DATA_DIR PROPS LOG CLUSTER_ID
kafka_format_storage() {
    local name=$1 data=$2 props=$3 log=$4 cluster_id=$5
    [ -f "$data/meta.properties" ] && return 0
    mkdir -p "$data"
    java -Dlog4j.configuration="file:$KAFKA_LOG4J" -cp "$KAFKA_LIB/*" kafka.tools.StorageTool \
        format -t "$cluster_id" -c "$props" --ignore-formatted >>"$log" 2>&1 || {
        show_log "$name" "$log"
        die "$name: formatting $data failed"
    }
    say "$name: formatted $data (cluster id $cluster_id)"
}

# Keep one old log (a broker logs every partition at start, so its log grows fast), mark the
# start in the log and print the offset this run's lines begin at: readiness and the failure
# report only look at those.
#   kafka_log_start LOG WHO
kafka_log_start() {
    local log=$1 who=$2
    if [ "$(stat -c %s "$log" 2>/dev/null || echo 0)" -gt $((64 * 1024 * 1024)) ]; then
        mv -f "$log" "$log.1"
    fi
    stat -c %s "$log" 2>/dev/null || echo 0
    printf '\n==== %s: starting kafka %s ====\n' "$who" "$(date -Is)" >>"$log"
}

# Launch a broker in its own session (setsid) so it outlives this shell and its terminal.
# The inner shell writes its own pid and then execs java, so the pidfile holds the JVM's pid.
# fd 9 (the callers' lock) is closed in the JVM, or it would hold the lock for its lifetime.
#   kafka_launch_jvm PIDFILE LOG PROPS LOGS_DIR JVM_OPTION...
kafka_launch_jvm() {
    local pidfile=$1 log=$2 props=$3 logs_dir=$4
    shift 4
    # shellcheck disable=SC2016 # $$ and $@ belong to the inner shell
    setsid nohup bash -c 'echo $$ >"$1"; shift; exec "$@"' _ "$pidfile" \
        java "$@" -Djava.awt.headless=true \
        -Dlog4j.configuration="file:$KAFKA_LOG4J" -Dkafka.logs.dir="$logs_dir" \
        -cp "$KAFKA_LIB/*" kafka.Kafka "$props" \
        >>"$log" 2>&1 </dev/null 9>&- &
    # Wait for the pidfile (written by the child a few ms from now).
    for _ in $(seq 50); do
        [ -s "$pidfile" ] && break
        sleep 0.1
    done
}

# The last lines of a failed broker are mostly its orderly shutdown; the cause is the first
# ERROR of this run (with the exception line under it), so print those after the tail.
#   kafka_show_failure NAME LOG OFFSET
kafka_show_failure() {
    local name=$1 log=$2 offset=${3:-0} errors
    show_log "$name" "$log"
    errors=$(tail -c +"$((offset + 1))" "$log" 2>/dev/null |
        grep -A1 -m3 -E '^\[[^]]*\] (ERROR|FATAL)' | cut -c1-400) || true
    [ -z "$errors" ] || warn "---- first errors of this start ----"$'\n'"$errors"
}

# Has this run of the broker logging to $1 (its lines from offset $2 on) finished starting?
# grep reads a file, not a pipe from tail: grep -q stops at the first match, and under
# pipefail the SIGPIPE that kills tail (once this run's log outgrows the pipe buffer, as it
# does with many partitions) would read as "not started" forever.
kafka_log_says_started() {
    grep -q 'Kafka Server started' <(tail -c +"$(($2 + 1))" "$1")
}
