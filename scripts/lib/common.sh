# shellcheck shell=bash
# Helpers shared by the local-services scripts (services.sh, kafka-cluster.sh). Sourced, not
# run: every function works on the caller's globals. The caller sets PROG (the name `die`
# prefixes its message with) before sourcing; LOG_TAIL_LINES may be set too.

: "${PROG:=$(basename "$0")}"
: "${LOG_TAIL_LINES:=40}"

say() { printf '%s\n' "$*"; }
warn() { printf '%s\n' "$*" >&2; }
die() { warn "$PROG: $*"; exit 1; }

is_root() { [ "$(id -u)" -eq 0 ]; }

# Seconds since $1 (an $EPOCHREALTIME value), one decimal.
since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1fs", b - a }'; }

# Does anything accept TCP connections on 127.0.0.1:$1? (bash's /dev/tcp; no nc needed)
port_open() { timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }

# Is pid $1 a running process? A zombie is not: our daemons are re-parented to pid 1, and an
# init that reaps lazily (as in some VMs/containers) leaves them as zombies for seconds, which
# `kill -0` still reports as alive.
alive() {
    local state
    state=$(sed -E 's/^.*\) (.).*$/\1/' "/proc/$1/stat" 2>/dev/null) || return 1
    [ -n "$state" ] && [ "$state" != Z ]
}

# Does the command line of pid $1 contain the fixed string $2?
cmdline_has() { tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null | grep -qF -- "$2"; }

# Print the pid in pidfile $1 if that process is alive and its command line contains $2.
# The command-line check stops a recycled pid (after a reboot or kill -9) from passing as ours.
live_pid() {
    local pidfile=$1 pattern=$2 pid
    [ -s "$pidfile" ] || return 1
    pid=$(head -n 1 "$pidfile" | tr -dc '0-9')
    [ -n "$pid" ] && alive "$pid" && cmdline_has "$pid" "$pattern" || return 1
    printf '%s\n' "$pid"
}

# Wait up to $2 seconds for pid $1 to exit.
wait_exit() {
    local pid=$1 deadline=$((SECONDS + $2))
    while alive "$pid"; do
        [ "$SECONDS" -lt "$deadline" ] || return 1
        sleep 0.2
    done
}

show_log() {
    local name=$1 file=$2
    if [ -s "$file" ]; then
        warn "---- last $LOG_TAIL_LINES lines of $file ----"
        tail -n "$LOG_TAIL_LINES" "$file" >&2
        warn "---- end of $name log ----"
    else
        warn "($name wrote no log at $file)"
    fi
}
