#!/bin/bash
# A one-node SLURM on this machine, for tests and demos (Debian's slurm-wlm and munge, run as root).
#   slurm/local_cluster.sh start   # installs the packages if missing, starts munged, slurmctld, slurmd
#   slurm/local_cluster.sh stop    # stops the daemons started here
#   slurm/local_cluster.sh env     # prints the export line for SLURM_CONF
# State lives in $CM_SLURM_DIR (default /tmp/cross_model_slurm); ports 16817/16818 (not SLURM's defaults).
set -euo pipefail
DIR=${CM_SLURM_DIR:-/tmp/cross_model_slurm}
CONF=$DIR/slurm.conf
HOST=$(hostname -s)
CPUS=$(nproc)
MEM_MB=${CM_SLURM_MEM_MB:-20000}

need_root() {
    if [ "$(id -u)" != 0 ]; then echo "local_cluster.sh: needs root (it installs packages and runs the daemons)" >&2; exit 3; fi
}

install_packages() {
    if command -v slurmctld >/dev/null && command -v munged >/dev/null && command -v sbatch >/dev/null; then return; fi
    echo "installing slurm-wlm and munge ..."
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null 2>&1 || {
        DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null 2>&1
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null
    }
}

start() {
    need_root
    install_packages
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
    if [ ! -s /etc/munge/munge.key ]; then
        mkdir -p /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown munge:munge /etc/munge/munge.key 2>/dev/null || true
    chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge && chown munge:munge /run/munge 2>/dev/null || true
    pgrep -x munged >/dev/null || runuser -u munge -- munged --force 2>/dev/null || munged --force
    cat > "$CONF" <<CONFEOF
ClusterName=crossmodel
SlurmctldHost=$HOST
SlurmUser=root
SlurmctldPort=16817
SlurmdPort=16818
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
KillWait=30
MinJobAge=600
NodeName=$HOST CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONFEOF
    export SLURM_CONF=$CONF
    [ -f "$DIR/slurmctld.pid" ] && kill -0 "$(cat "$DIR/slurmctld.pid")" 2>/dev/null || slurmctld -f "$CONF"
    [ -f "$DIR/slurmd.pid" ] && kill -0 "$(cat "$DIR/slurmd.pid")" 2>/dev/null || slurmd -f "$CONF"
    for _ in $(seq 1 60); do
        if sinfo -h -o %T 2>/dev/null | grep -qE "idle|mixed|allocated"; then
            echo "SLURM is up: export SLURM_CONF=$CONF"; return
        fi
        scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true
        sleep 1
    done
    echo "local_cluster.sh: the node did not become idle; see $DIR/log" >&2
    exit 1
}

stop() {
    for daemon in slurmd slurmctld; do
        if [ -f "$DIR/$daemon.pid" ]; then kill "$(cat "$DIR/$daemon.pid")" 2>/dev/null || true; rm -f "$DIR/$daemon.pid"; fi
    done
    echo "SLURM stopped"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 start|stop|env" >&2; exit 2 ;;
esac
