#!/usr/bin/env bash
# A real single-node Slurm on this machine, for the cluster tests (make test-cluster).
#
#   scripts/slurm_local.sh up      # install slurm-wlm + munge if missing, start munged, slurmctld, slurmd
#   export SLURM_CONF=$(scripts/slurm_local.sh conf)   # point sbatch/squeue/scontrol at it
#   scripts/slurm_local.sh status
#   scripts/slurm_local.sh down    # cancel its jobs, stop the daemons `up` started (and only those)
#
# Everything lives in $SLURM_LOCAL_DIR (default /tmp/score_exp_slurm): slurm.conf, the munge key and
# socket, PID files, logs, the job completion log (jobcomp.txt). No systemd, no cgroups, no
# accounting database: ProctrackType=proctrack/linuxproc, TaskPlugin=task/none, the node line from
# `slurmd -C`. Needs root (Debian's daemons run as root here); CI runs as root.
set -euo pipefail

DIR="${SLURM_LOCAL_DIR:-/tmp/score_exp_slurm}"
CTLD_PORT="${SLURM_LOCAL_CTLD_PORT:-6817}"
SLURMD_PORT="${SLURM_LOCAL_SLURMD_PORT:-6818}"
WAIT_S="${SLURM_LOCAL_WAIT_S:-60}"
CONF="$DIR/slurm.conf"

SAY=slurm_local
# shellcheck source=scripts/slurm_common.sh
. "$(dirname "$0")/slurm_common.sh"

install_if_missing() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
    && command -v sbatch >/dev/null; then
    return
  fi
  [ "$(id -u)" = 0 ] || die "slurm-wlm/munge are not installed and this is not root: apt-get install -y slurm-wlm munge"
  command -v apt-get >/dev/null || die "slurm-wlm/munge are not installed and there is no apt-get"
  say "installing slurm-wlm and munge (apt-get)"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
}

write_conf() {
  local node host
  host=$(hostname -s)
  # `slurmd -C` prints the node line (CPUs, sockets, memory); leave 512 MB to the system.
  node=$(slurmd -C | head -1)
  local mem
  mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node")
  node=$(sed "s/RealMemory=[0-9]*/RealMemory=$((mem > 1024 ? mem - 512 : mem))/" <<<"$node")
  cat >"$CONF" <<EOF
# Written by scripts/slurm_local.sh: a single-node test cluster.
ClusterName=scoreexp
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/slurmd
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/jobcomp.txt
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=10
MinJobAge=600
MaxArraySize=1001
$node State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

up() {
  install_if_missing
  [ "$(id -u)" = 0 ] || die "the local cluster's daemons run as root; run this as root"
  if live_pid "$DIR/slurmctld.pid" slurmctld >/dev/null && live_pid "$DIR/slurmd.pid" slurmd >/dev/null; then
    say "already up ($CONF)"
    return
  fi
  local t0=$SECONDS
  mkdir -p "$DIR"/{munge,ctld,slurmd}
  chmod 0755 "$DIR" "$DIR/ctld" "$DIR/slurmd"
  chmod 0700 "$DIR/munge"
  if [ ! -s "$DIR/munge/munge.key" ]; then
    dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
    chmod 0400 "$DIR/munge/munge.key"
  fi
  write_conf
  export SLURM_CONF="$CONF"
  if ! live_pid "$DIR/munge/munged.pid" munged >/dev/null; then
    # --force: the state folder may sit under a world-writable /tmp
    munged --force --socket="$DIR/munge/munge.socket" --key-file="$DIR/munge/munge.key" \
      --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/munged.log" \
      --seed-file="$DIR/munge/munged.seed" ||
      die "munged did not start (see $DIR/munge/munged.log)"
  fi
  wait_for "$WAIT_S" munge --socket="$DIR/munge/munge.socket" -n ||
    die "munged did not answer within ${WAIT_S}s (see $DIR/munge/munged.log)"
  live_pid "$DIR/slurmctld.pid" slurmctld >/dev/null ||
    slurmctld -c -i -f "$CONF" || die "slurmctld did not start (see $DIR/slurmctld.log)"
  wait_for "$WAIT_S" scontrol ping ||
    die "slurmctld did not answer within ${WAIT_S}s (see $DIR/slurmctld.log)"
  live_pid "$DIR/slurmd.pid" slurmd >/dev/null ||
    slurmd -f "$CONF" || die "slurmd did not start (see $DIR/slurmd.log)"
  # The node is usable once sinfo shows it idle (or mixed/allocated with jobs left from before).
  node_ready() { sinfo -h -N -o %T | grep -Eq '^(idle|mixed|allocated)'; }
  wait_for "$WAIT_S" node_ready ||
    die "the node did not become idle within ${WAIT_S}s: $(sinfo -h -N -o '%N %T %E' 2>&1) (see $DIR/slurmd.log)"
  say "up in $((SECONDS - t0))s: $(sinfo -h -N -o '%N %c CPUs %m MB %T')"
  say "export SLURM_CONF=$CONF"
}

down() {
  export SLURM_CONF="$CONF"
  if live_pid "$DIR/slurmctld.pid" slurmctld >/dev/null; then
    # Every job of this controller was submitted to the test cluster: cancel them, give them
    # KillWait to end, so no job step outlives its slurmd.
    local jobs t=0
    jobs=$(squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ') || true
    if [ -n "${jobs// /}" ]; then
      # shellcheck disable=SC2086
      scancel $jobs 2>/dev/null || true
      while [ -n "$(squeue -h -o %A 2>/dev/null)" ] && [ "$t" -lt 60 ]; do sleep 0.5; t=$((t + 1)); done
    fi
  fi
  stop_pid "$DIR/slurmd.pid" slurmd
  stop_pid "$DIR/slurmctld.pid" slurmctld
  stop_pid "$DIR/munge/munged.pid" munged
  say "down"
}

status() {
  local ok=0
  for d in munge/munged:munged slurmctld:slurmctld slurmd:slurmd; do
    if pid=$(live_pid "$DIR/${d%%:*}.pid" "${d##*:}"); then say "${d##*:} running ($pid)"; else
      say "${d##*:} not running"
      ok=1
    fi
  done
  [ "$ok" = 0 ] && SLURM_CONF="$CONF" sinfo -N >&2
  return "$ok"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  conf) echo "$CONF" ;;
  *) echo "usage: $0 up|down|status|conf" >&2; exit 2 ;;
esac
