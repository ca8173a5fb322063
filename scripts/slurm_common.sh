# Shell helpers of the test clusters (scripts/slurm_local.sh, scripts/slurm_two_nodes.sh): sourced,
# never run. The sourcing script sets SAY (its name in messages) first.

say() { echo "$SAY: $*" >&2; }
die() { say "error: $*"; exit 1; }

# pid of a daemon from its PID file, only while that process still runs the expected binary (comm)
live_pid() {  # $1 = pid file, $2 = binary name
  local pid
  [ -f "$1" ] || return 1
  pid=$(tr -dc 0-9 <"$1")
  [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] && grep -qx "$2" "/proc/$pid/comm" || return 1
  echo "$pid"
}

wait_for() {  # $1 = seconds, rest = command that succeeds when ready
  local limit=$1 t=0
  shift
  until "$@" >/dev/null 2>&1; do
    t=$((t + 1))
    [ "$t" -le "$((limit * 4))" ] || return 1
    sleep 0.25
  done
}

stop_pid() {  # $1 = pid file, $2 = binary name: SIGTERM, SIGKILL after 10 s
  local pid t=0
  pid=$(live_pid "$1" "$2") || { rm -f "$1"; return 0; }
  kill -TERM "$pid" 2>/dev/null || true
  while [ -d "/proc/$pid" ] && [ "$t" -lt 40 ]; do sleep 0.25; t=$((t + 1)); done
  if [ -d "/proc/$pid" ]; then
    say "$2 ($pid) did not stop within 10s: SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$1"
}
