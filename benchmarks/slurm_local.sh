#!/usr/bin/env bash
# A real single-node Slurm on 127.0.0.1 (Debian's slurmctld + slurmd + munge), for tests/test_slurm.py
# and for trying `train loocv --slurm-*` on one machine.
#
#   benchmarks/slurm_local.sh install     apt-get install the daemons (root)
#   benchmarks/slurm_local.sh start DIR   write DIR/slurm.conf, start munged, slurmctld, slurmd; wait until idle
#   benchmarks/slurm_local.sh stop DIR    stop the daemons this script started (by their pid files)
#
# Then `export SLURM_CONF=DIR/slurm.conf` for sbatch, squeue and dask-jobqueue. No cgroups are needed
# (ProctrackType=proctrack/linuxproc, TaskPlugin=task/none), so it also runs inside a container, as root.
set -euo pipefail

cmd=${1:-}
dir=${2:-/tmp/featcache-slurm}

case "$cmd" in
install)
    export DEBIAN_FRONTEND=noninteractive
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null && exit 0
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
    ;;
start)
    for b in slurmctld slurmd munged sbatch; do
        command -v "$b" >/dev/null || { echo "slurm_local.sh: $b not found; run '$0 install' (root)" >&2; exit 3; }
    done
    [ "$(id -u)" = 0 ] || { echo "slurm_local.sh: slurmd must run as root" >&2; exit 3; }
    mkdir -p "$dir"/{state,spool,log,munge}
    host=$(hostname -s)
    cpus=$(nproc)
    mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)
    cat >"$dir/slurm.conf" <<EOF
ClusterName=featcache-local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmctldPort=${SLURMCTLD_PORT:-6817}
SlurmdPort=${SLURMD_PORT:-6818}
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    key=$dir/munge/munge.key
    [ -s "$key" ] || { dd if=/dev/urandom of="$key" bs=1024 count=1 status=none; chmod 400 "$key"; }
    munged --force --key-file="$key" --socket="$dir/munge/munge.socket" --pid-file="$dir/munge/munged.pid" \
        --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munged.seed"
    export SLURM_CONF=$dir/slurm.conf
    slurmctld -f "$SLURM_CONF"
    slurmd -f "$SLURM_CONF"
    for _ in $(seq 1 120); do
        if sinfo -h -o %t 2>/dev/null | grep -qx idle; then
            echo "slurm up: export SLURM_CONF=$SLURM_CONF  (partition 'local', node $host, $cpus CPUs)"
            exit 0
        fi
        sleep 0.5
    done
    echo "slurm_local.sh: the node did not become idle; see $dir/log/" >&2
    sinfo >&2 || true
    exit 4
    ;;
stop)
    for pidfile in "$dir/slurmd.pid" "$dir/slurmctld.pid" "$dir/munge/munged.pid"; do
        [ -s "$pidfile" ] || continue
        pid=$(cat "$pidfile")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
        rm -f "$pidfile"
    done
    ;;
*)
    echo "usage: $0 install | start DIR | stop DIR" >&2
    exit 2
    ;;
esac
