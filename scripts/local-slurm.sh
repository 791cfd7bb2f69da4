#!/usr/bin/env bash
# Bring up / tear down a single-node Slurm on this machine, for labkit's tests and for
# instructors rehearsing a workshop on a laptop or VM.
#
#   scripts/local-slurm.sh up       # munge + slurmctld + slurmd, partitions "gpu" (2 fake GPUs) and "cpu" (no nodes)
#   scripts/local-slurm.sh status   # sinfo
#   scripts/local-slurm.sh down     # stop the daemons (the config stays); munged only if "up" started it
#
# Needs root and Debian's packages: slurmctld slurmd slurm-client munge.
# The GPUs are GRES on character devices (/dev/labkit-gpu0, /dev/labkit-gpu1): Slurm hands
# each job its own CUDA_VISIBLE_DEVICES, exactly as on a real GPU node; nothing can run CUDA.
# Idempotent: "up" twice is fine; "down" when nothing runs is fine.
# munged may serve other things on this machine: "up" records the munged it starts itself in
# $STATE_DIR/munged.pid, and "down" stops that one only, never a munged it found running.
# The functions can be sourced without running anything (tests do: source scripts/local-slurm.sh).
set -euo pipefail

CONF_DIR=${LABKIT_SLURM_CONF_DIR:-/etc/slurm}
STATE_DIR=${LABKIT_SLURM_STATE_DIR:-/var/lib/labkit-slurm}
LOG_DIR=${LABKIT_SLURM_LOG_DIR:-/var/log/labkit-slurm}
NODE=$(hostname -s)
NGPU=${LABKIT_SLURM_GPUS:-2}
NCPU=${LABKIT_SLURM_CPUS:-$(( $(nproc) > 4 ? $(nproc) : 4 ))}
MEM_MB=${LABKIT_SLURM_MEM_MB:-$(( $(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo) * 3 / 4 ))}
MUNGED_RECORD="$STATE_DIR/munged.pid"   # exists only while a munged started by "up" runs

die() { echo "local-slurm: $*" >&2; exit 1; }

need_root() {
    [ "$(id -u)" = 0 ] || die "must run as root (try: sudo $0 $*)"
    for b in slurmctld slurmd sinfo munged; do
        command -v "$b" >/dev/null 2>&1 || [ -x "/usr/sbin/$b" ] \
            || die "'$b' not found: install Debian's packages with: apt-get install slurmctld slurmd slurm-client munge"
    done
}

write_config() {
    mkdir -p "$CONF_DIR" "$STATE_DIR/ctld" "$STATE_DIR/d" "$LOG_DIR"
    local gpu_last=$(( NGPU - 1 ))
    for i in $(seq 0 "$gpu_last"); do
        [ -e "/dev/labkit-gpu$i" ] || mknod "/dev/labkit-gpu$i" c 1 3
    done
    cat > "$CONF_DIR/slurm.conf.new" <<EOF
# Written by labkit scripts/local-slurm.sh: one node, $NGPU fake GPUs as GRES.
ClusterName=labkit
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/d
SlurmctldPidFile=/run/labkit-slurmctld.pid
SlurmdPidFile=/run/labkit-slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
SlurmdParameters=config_overrides
GresTypes=gpu
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MinJobAge=30
KillWait=5
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$NCPU RealMemory=$MEM_MB Gres=gpu:$NGPU State=UNKNOWN
PartitionName=gpu Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
# A partition without GPU nodes, so labkit's pre-flight check can refuse GPUs there. GRES are per
# node and adding a node needs a daemon restart, so it has no nodes at all (jobs there would pend).
PartitionName=cpu MaxTime=INFINITE State=UP
EOF
    cat > "$CONF_DIR/gres.conf.new" <<EOF
NodeName=$NODE Name=gpu File=/dev/labkit-gpu[0-$gpu_last]
EOF
    mv "$CONF_DIR/slurm.conf.new" "$CONF_DIR/slurm.conf"
    mv "$CONF_DIR/gres.conf.new" "$CONF_DIR/gres.conf"
}

is_munged() {  # PID: a live process (not a zombie) named munged
    local stat
    stat=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
    case "$stat" in Z*) return 1 ;; esac
    [ "$(ps -o comm= -p "$1" 2>/dev/null)" = munged ]
}

recorded_munged() {  # prints the pid of the munged "up" started, if it still runs; drops a stale record
    [ -f "$MUNGED_RECORD" ] || return 1
    local pid
    pid=$(tr -dc 0-9 < "$MUNGED_RECORD")
    if [ -n "$pid" ] && is_munged "$pid"; then echo "$pid"; return 0; fi
    rm -f "$MUNGED_RECORD"
    return 1
}

start_munge() {
    if pgrep -x munged >/dev/null; then
        # already running: ours from an earlier "up" (the record stays) or someone else's (no record)
        recorded_munged >/dev/null || true
        return
    fi
    rm -f "$MUNGED_RECORD"
    mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge "$STATE_DIR"
    if [ ! -s /etc/munge/munge.key ]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
    chmod 0400 /etc/munge/munge.key
    chmod 0700 /etc/munge
    chmod 0755 /run/munge
    if id munge >/dev/null 2>&1; then
        runuser -u munge -- /usr/sbin/munged
    else
        /usr/sbin/munged --force
    fi
    local pid
    for _ in $(seq 50); do
        pid=$(pgrep -nx munged || true)  # none ran before, so the newest munged is the one just started
        if [ -S /run/munge/munge.socket.2 ] && [ -n "$pid" ] && is_munged "$pid"; then
            echo "$pid" > "$MUNGED_RECORD"
            return
        fi
        sleep 0.1
    done
    die "munged did not start: see /var/log/munge/munged.log"
}

stop_munge() {  # stops the munged "up" started; leaves any other munged alone
    local pid
    if ! pid=$(recorded_munged); then
        if pgrep -x munged >/dev/null; then
            echo "local-slurm: munged left running (this script did not start it)"
        fi
        return 0
    fi
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do
        is_munged "$pid" || break
        sleep 0.1
    done
    is_munged "$pid" && die "munged (pid $pid) did not stop within 5 s: kill -9 $pid, then rm $MUNGED_RECORD"
    rm -f "$MUNGED_RECORD"
    echo "local-slurm: stopped munged (pid $pid, started by up)"
}

wait_idle() {
    for _ in $(seq 150); do
        state=$(sinfo -h -n "$NODE" -o %T 2>/dev/null | head -1 || true)
        case "$state" in
            idle|mixed|allocated) return 0 ;;
            drain*|down*) scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true ;;
        esac
        sleep 0.2
    done
    sinfo -N -l >&2 || true
    tail -20 "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" >&2 || true
    die "node $NODE did not become idle"
}

up() {
    need_root
    write_config
    start_munge
    if ! pgrep -x slurmctld >/dev/null; then
        # a cold start clears jobs left by an earlier run (a killed session, a rebooted VM):
        # stale jobs would hold the fake GPUs and keep new ones pending
        /usr/sbin/slurmctld -c -i
    else
        scontrol reconfigure >/dev/null 2>&1 || true
    fi
    if ! pgrep -x slurmd >/dev/null; then
        /usr/sbin/slurmd
    fi
    wait_idle
    status
}

down() {
    if command -v scancel >/dev/null 2>&1 && pgrep -x slurmctld >/dev/null; then
        scancel --full --quiet --user="$(id -un)" 2>/dev/null || true
    fi
    for d in slurmd slurmctld; do
        pkill -x "$d" 2>/dev/null || true
    done
    for _ in $(seq 50); do
        pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null || break
        sleep 0.1
    done
    stop_munge  # after the Slurm daemons, which talk to it while they shut down
    echo "local-slurm: stopped"
}

status() {
    if ! pgrep -x slurmctld >/dev/null; then
        echo "local-slurm: slurmctld is not running (start it with: $0 up)"
        return 3
    fi
    sinfo -o "%P %a %D %T %c %m %G"
}

main() {
    case "${1:-}" in
        up) up ;;
        down) down ;;
        status) status ;;
        restart) down; up ;;
        *) echo "usage: $0 up|down|status|restart" >&2; exit 2 ;;
    esac
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then  # run, not sourced
    main "$@"
fi
