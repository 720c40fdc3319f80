#!/usr/bin/env bash
# A real two-node Slurm cluster on this one machine, for tests/test_slurm.py.
#
#   tests/slurm_cluster.sh start   install slurm-wlm + munge if missing (root + apt-get), then start
#                                  munged, slurmctld and two slurmd daemons (nodes n1, n2);
#                                  prints SLURM_CONF=<path> as its last line
#   tests/slurm_cluster.sh stop    stop the daemons this script started
#
# Everything lives in $BIGTRAIN_SLURM_DIR (default /tmp/bigtrain-slurm), the config included: use it
# with SLURM_CONF=$BIGTRAIN_SLURM_DIR/slurm.conf (the system's /etc/slurm is left alone).
# Exit code 3 means "cannot be started here" (not root, no apt-get, ...), with the reason on stdout.
set -euo pipefail

DIR=${BIGTRAIN_SLURM_DIR:-/tmp/bigtrain-slurm}
CONF=$DIR/slurm.conf
export SLURM_CONF=$CONF

cannot() { echo "cannot start a Slurm cluster: $*"; exit 3; }

install_packages() {
    command -v sbatch >/dev/null && command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v munged >/dev/null && return 0
    [ "$(id -u)" = 0 ] || cannot "slurm-wlm/munge are not installed and this is not root"
    command -v apt-get >/dev/null || cannot "slurm-wlm/munge are not installed and there is no apt-get"
    echo "installing slurm-wlm and munge with apt-get" >&2
    export DEBIAN_FRONTEND=noninteractive
    # The same lock as tests/chromium.sh's: two apt-get at once fail on dpkg's own lock.
    (
        flock 9
        apt-get update -qq >&2 || exit 1
        apt-get install -y -qq --no-install-recommends slurm-wlm munge >&2 || exit 2
    ) 9>/tmp/bigtrain-apt.lock
    case $? in
        0) ;;
        1) cannot "apt-get update failed" ;;
        *) cannot "apt-get install slurm-wlm munge failed" ;;
    esac
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return 0  # a munged is already running
    fi
    mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
    if [ ! -s /etc/munge/munge.key ]; then
        if command -v mungekey >/dev/null; then mungekey --create --force >&2; else dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 2>/dev/null; fi
    fi
    chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge
    chmod 0700 /etc/munge /var/lib/munge /var/log/munge
    chmod 0755 /run/munge
    chmod 0400 /etc/munge/munge.key
    runuser -u munge -- /usr/sbin/munged
    touch "$DIR/munged.ours"
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    cannot "munged did not start"
}

write_conf() {
    local host
    host=$(hostname -s 2>/dev/null || uname -n | cut -d. -f1)
    mkdir -p "$DIR/state" "$DIR/spool/n1" "$DIR/spool/n2" "$DIR/log"
    rm -rf "${DIR:?}/state/"*  # no jobs left over from an earlier cluster
    cat > "$CONF" <<EOF
# Written by bigtrain's tests/slurm_cluster.sh: two nodes on one machine. Two CPUs per node (one
# task of each job takes one): test_slurm.py's nearly idle time-limit job runs beside the others.
ClusterName=bigtrain-test
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SlurmctldPort=16817
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
KillWait=10
MinJobAge=600
MaxJobCount=1000
SchedulerParameters=sched_interval=5
NodeName=n1 NodeHostname=$host NodeAddr=127.0.0.1 Port=17001 CPUs=2 RealMemory=8000
NodeName=n2 NodeHostname=$host NodeAddr=127.0.0.1 Port=17002 CPUs=2 RealMemory=8000
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=30:00 State=UP
EOF
}

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start() {
    install_packages
    mkdir -p "$DIR"
    if alive "$DIR/slurmctld.pid"; then
        stop >&2
    fi
    # The job script's MASTER_ADDR is the first node's name: make n1/n2 resolve.
    getent hosts n1 >/dev/null && getent hosts n2 >/dev/null || echo "127.0.0.1 n1 n2" >> /etc/hosts \
        || cannot "cannot add n1/n2 to /etc/hosts"
    start_munge
    write_conf
    /usr/sbin/slurmctld -f "$CONF"
    /usr/sbin/slurmd -f "$CONF" -N n1
    /usr/sbin/slurmd -f "$CONF" -N n2
    for _ in $(seq 150); do
        if [ "$(sinfo -h -N -o '%N %t' 2>/dev/null | grep -c ' idle$')" = 2 ]; then
            echo "SLURM_CONF=$CONF"
            return 0
        fi
        sleep 0.2
    done
    sinfo -N >&2 || true
    tail -n 20 "$DIR/log/"*.log >&2 || true
    cannot "the nodes did not come up idle (logs in $DIR/log)"
}

stop_pid() {
    local f=$1
    alive "$f" || { rm -f "$f"; return 0; }
    local pid
    pid=$(cat "$f")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$f"
}

stop() {
    [ -f "$CONF" ] && scancel --quiet --user="$(id -un)" 2>/dev/null || true
    stop_pid "$DIR/slurmd-n1.pid"
    stop_pid "$DIR/slurmd-n2.pid"
    stop_pid "$DIR/slurmctld.pid"
    if [ -f "$DIR/munged.ours" ]; then
        stop_pid /run/munge/munged.pid
        rm -f "$DIR/munged.ours"
    fi
    echo "stopped"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
