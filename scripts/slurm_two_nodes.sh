#!/usr/bin/env bash
# A real two-node Slurm on this one machine, for the multi-node cluster tests (make test-cluster).
#
#   scripts/slurm_two_nodes.sh up      # munged + slurmctld on the host, node1 and node2 in namespaces
#   export SLURM_CONF=$(scripts/slurm_two_nodes.sh conf)
#   scripts/slurm_two_nodes.sh status
#   scripts/slurm_two_nodes.sh kill-slurmd node2   # the node's slurmd dies, its job steps live on
#   scripts/slurm_two_nodes.sh kill-node node2     # the whole node dies (its PID namespace)
#   scripts/slurm_two_nodes.sh start-node node2    # the node boots again (ReturnToService=2)
#   scripts/slurm_two_nodes.sh down    # cancel its jobs; remove only the daemons, namespaces and links `up` made
#
# The host is the login node: munged and slurmctld run here, listening on a bridge (scbr2n,
# 10.231.77.1). Each compute node is a slurmd in its own network, UTS, PID and mount namespace
# (hostname node1/node2, address 10.231.77.11/.12 on a veth pair into the bridge, its own /proc
# and an /etc/hosts that names the nodes, bind-mounted inside the node only). Rank-to-rank
# traffic crosses the bridge; the file system is the host's (one kernel: a perfect shared file
# system). Ways round the walls of running Slurm 22.05 like this:
# - the network namespace is entered with `nsenter --net=/run/netns/<ns>`, not `ip netns exec`,
#   which remounts /sys (slurmd: "No filesystem mounted on /sys/fs/cgroup");
# - nodes are addressed by IP (NodeAddr), never a name the host must resolve;
# - no accounting database (sacct: submitit then reads its own result files).
# Everything lives in $SLURM_TWO_NODES_DIR (default /tmp/score_exp_slurm2); ports 6827/6828 keep
# clear of scripts/slurm_local.sh's cluster, which may run at the same time. Needs root.
set -euo pipefail

DIR="${SLURM_TWO_NODES_DIR:-/tmp/score_exp_slurm2}"
CTLD_PORT="${SLURM_TWO_NODES_CTLD_PORT:-6827}"
SLURMD_PORT="${SLURM_TWO_NODES_SLURMD_PORT:-6828}"
WAIT_S="${SLURM_TWO_NODES_WAIT_S:-60}"
NET="${SLURM_TWO_NODES_NET:-10.231.77}"
BRIDGE=scbr2n
NODES=(node1 node2)
CONF="$DIR/slurm.conf"

SAY=slurm_two_nodes
# shellcheck source=scripts/slurm_common.sh
. "$(dirname "$0")/slurm_common.sh"

elapsed() { local d=$((($(date +%s%N) - $1) / 100000000)); echo "$((d / 10)).$((d % 10))"; }
addr() { echo "$NET.1$((${1#node}))"; }  # node1 -> 10.231.77.11
netns() { echo "score2n_$1"; }
veth() { echo "sc2n_$1"; }

write_conf() {
  local cpus mem
  cpus=$(nproc)
  # Both nodes share this machine: each offers its CPUs and a quarter of its memory.
  mem=$(($(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$(slurmd -C | head -1)") / 4))
  cat >"$CONF" <<EOF
# Written by scripts/slurm_two_nodes.sh: a two-node test cluster (nodes in namespaces).
ClusterName=scoreexp2
SlurmctldHost=$(hostname -s)($NET.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/%n/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/%n/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/%n/slurmd.log
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
# A node that comes back is usable again at once; a job on a node that failed is requeued.
ReturnToService=2
JobRequeue=1
# A dead slurmd is noticed within 10 s (the controller pings every SlurmdTimeout/3).
SlurmctldTimeout=30
SlurmdTimeout=10
InactiveLimit=0
KillWait=10
MinJobAge=600
MaxArraySize=1001
NodeName=node1 NodeAddr=$(addr node1) CPUs=$cpus RealMemory=$mem State=UNKNOWN
NodeName=node2 NodeAddr=$(addr node2) CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=node1,node2 Default=YES MaxTime=INFINITE State=UP
EOF
  : >"$DIR/hosts"
  printf '127.0.0.1 localhost\n' >>"$DIR/hosts"
  for n in "${NODES[@]}"; do printf '%s %s\n' "$(addr "$n")" "$n" >>"$DIR/hosts"; done
}

net_up() {  # the bridge on the host, one veth pair and network namespace per node
  ip link show "$BRIDGE" >/dev/null 2>&1 || {
    ip link add "$BRIDGE" type bridge
    ip addr add "$NET.1/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
  }
  local n
  for n in "${NODES[@]}"; do
    [ -e "/run/netns/$(netns "$n")" ] && continue
    ip netns add "$(netns "$n")"
    ip link add "$(veth "$n")" type veth peer name eth0 netns "$(netns "$n")"
    ip link set "$(veth "$n")" master "$BRIDGE"
    ip link set "$(veth "$n")" up
    ip -n "$(netns "$n")" addr add "$(addr "$n")/24" dev eth0
    ip -n "$(netns "$n")" link set eth0 up
    ip -n "$(netns "$n")" link set lo up
    ip -n "$(netns "$n")" route add default via "$NET.1"
  done
}

node_state() { sinfo -h -n "$1" -o %T 2>/dev/null | tr -d '*~#'; }

start_node() {  # $1 = node: boot it (new namespaces) or, if only its slurmd died, restart slurmd
  local n=$1 init
  [ -e "/run/netns/$(netns "$n")" ] || die "$n has no network namespace (run up first)"
  if init=$(ns_init "$n"); then
    slurmd_pid "$n" >/dev/null && { say "$n already running"; return; }
    nsenter --target "$init" --all slurmd -N "$n" -f "$CONF" || die "slurmd did not start on $n"
    say "$n: slurmd started again"
    return
  fi
  mkdir -p "$DIR/$n/spool"
  # unshare stays in the host's PID namespace (its pid is the node's handle); its child, the
  # node's init (PID 1: a shell that outlives slurmd, as a host outlives a daemon), names the
  # host, mounts the node's /etc/hosts, starts slurmd (which daemonises) and sleeps.
  setsid nsenter --net="/run/netns/$(netns "$n")" \
    unshare --uts --pid --mount --fork --mount-proc --propagation private \
    sh -c "hostname $n && mount --bind '$DIR/hosts' /etc/hosts && slurmd -N $n -f '$CONF' &&
      while :; do sleep 3600; done" \
    </dev/null >>"$DIR/$n/console.log" 2>&1 &
  echo $! >"$DIR/$n/init.pid"
}

node_up() { [[ "$(node_state "$1")" =~ ^(idle|mixed|allocated|completing)$ ]]; }

install_if_missing() {  # Debian's packages of the commands this script runs
  local missing=() b
  for b in slurmctld:slurm-wlm slurmd:slurm-wlm sbatch:slurm-wlm munged:munge ip:iproute2 \
    nsenter:util-linux unshare:util-linux pgrep:procps; do
    command -v "${b%%:*}" >/dev/null || missing+=("${b##*:}")
  done
  [ "${#missing[@]}" = 0 ] && return
  command -v apt-get >/dev/null || die "missing packages and no apt-get: ${missing[*]}"
  say "installing ${missing[*]} (apt-get)"
  apt-get update -qq >/dev/null
  # shellcheck disable=SC2068
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(printf '%s\n' ${missing[@]} | sort -u) >/dev/null
}

up() {
  [ "$(id -u)" = 0 ] || die "namespaces and the daemons need root"
  install_if_missing
  local t0 n
  t0=$(date +%s%N)
  mkdir -p "$DIR"/{munge,ctld}
  chmod 0755 "$DIR" "$DIR/ctld"
  chmod 0700 "$DIR/munge"
  if [ ! -s "$DIR/munge/munge.key" ]; then
    dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
    chmod 0400 "$DIR/munge/munge.key"
  fi
  write_conf
  export SLURM_CONF="$CONF"
  net_up
  if ! live_pid "$DIR/munge/munged.pid" munged >/dev/null; then
    munged --force --socket="$DIR/munge/munge.socket" --key-file="$DIR/munge/munge.key" \
      --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/munged.log" \
      --seed-file="$DIR/munge/munged.seed" || die "munged did not start (see $DIR/munge/munged.log)"
  fi
  wait_for "$WAIT_S" munge --socket="$DIR/munge/munge.socket" -n ||
    die "munged did not answer within ${WAIT_S}s (see $DIR/munge/munged.log)"
  live_pid "$DIR/slurmctld.pid" slurmctld >/dev/null ||
    slurmctld -c -i -f "$CONF" || die "slurmctld did not start (see $DIR/slurmctld.log)"
  wait_for "$WAIT_S" scontrol ping || die "slurmctld did not answer within ${WAIT_S}s (see $DIR/slurmctld.log)"
  for n in "${NODES[@]}"; do start_node "$n"; done
  for n in "${NODES[@]}"; do
    wait_for "$WAIT_S" node_up "$n" ||
      die "$n did not become idle within ${WAIT_S}s: $(sinfo -h -N -o '%N %T %E' 2>&1) (see $DIR/$n/slurmd.log)"
  done
  say "up in $(elapsed "$t0")s: $(sinfo -h -N -o '%N(%T)' | tr '\n' ' ')"
  say "export SLURM_CONF=$CONF"
}

ns_init() {  # $1 = node: host pid of its PID namespace's init (the child of unshare)
  local u
  u=$(live_pid "$DIR/$1/init.pid" unshare) || return 1
  local c
  c=$(cat "/proc/$u/task/$u/children" 2>/dev/null | awk '{print $1}')
  [ -n "$c" ] && echo "$c"
}

kill_node() {  # the whole node: SIGKILL to its PID namespace's init ends every process in it
  local n=$1 init u t=0
  u=$(live_pid "$DIR/$n/init.pid" unshare) || { say "$n is not running"; return 0; }
  init=$(ns_init "$n") || true
  [ -n "$init" ] && kill -KILL "$init" 2>/dev/null
  kill -KILL "$u" 2>/dev/null || true
  while [ -d "/proc/$u" ] && [ "$t" -lt 40 ]; do sleep 0.25; t=$((t + 1)); done
  rm -f "$DIR/$n/init.pid" "$DIR/$n/slurmd.pid"
  say "$n killed (its PID namespace: init $init)"
}

slurmd_pid() {  # $1 = node: host pid of its slurmd
  local init p
  init=$(ns_init "$1") || return 1
  for p in $(pgrep -x slurmd); do
    [ "$(readlink "/proc/$p/ns/pid")" = "$(readlink "/proc/$init/ns/pid")" ] && { echo "$p"; return; }
  done
  return 1
}

kill_slurmd() {  # slurmd only (SIGKILL): the node's job steps (slurmstepd and the ranks) live on
  local n=$1 pid
  pid=$(slurmd_pid "$n") || { say "$n has no slurmd"; return 0; }
  kill -KILL "$pid"
  say "$n: slurmd ($pid) killed; its job steps run on"
}

down() {
  export SLURM_CONF="$CONF"
  local t0 n jobs t=0
  t0=$(date +%s%N)
  if live_pid "$DIR/slurmctld.pid" slurmctld >/dev/null; then
    jobs=$(squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ') || true
    if [ -n "${jobs// /}" ]; then
      # shellcheck disable=SC2086
      scancel $jobs 2>/dev/null || true
      while [ -n "$(squeue -h -t R,CG -o %A 2>/dev/null)" ] && [ "$t" -lt 30 ]; do sleep 0.5; t=$((t + 1)); done
    fi
  fi
  for n in "${NODES[@]}"; do kill_node "$n" >/dev/null 2>&1 || true; done
  stop_pid "$DIR/slurmctld.pid" slurmctld
  stop_pid "$DIR/munge/munged.pid" munged
  for n in "${NODES[@]}"; do
    ip link del "$(veth "$n")" 2>/dev/null || true
    [ -e "/run/netns/$(netns "$n")" ] && ip netns del "$(netns "$n")"
  done
  ip link show "$BRIDGE" >/dev/null 2>&1 && ip link del "$BRIDGE"
  say "down in $(elapsed "$t0")s"
}

status() {
  local ok=0 n
  live_pid "$DIR/munge/munged.pid" munged >/dev/null || { say "munged not running"; ok=1; }
  live_pid "$DIR/slurmctld.pid" slurmctld >/dev/null || { say "slurmctld not running"; ok=1; }
  for n in "${NODES[@]}"; do
    live_pid "$DIR/$n/init.pid" unshare >/dev/null || { say "$n not running"; ok=1; }
  done
  [ "$ok" = 0 ] && SLURM_CONF="$CONF" sinfo -N >&2
  return "$ok"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  conf) echo "$CONF" ;;
  kill-node) kill_node "${2:?node}" ;;
  kill-slurmd) kill_slurmd "${2:?node}" ;;
  start-node) start_node "${2:?node}" ;;
  *) echo "usage: $0 up|down|status|conf|kill-node NODE|kill-slurmd NODE|start-node NODE" >&2; exit 2 ;;
esac
