#!/usr/bin/env bash
# Bring up / tear down a single-node Slurm on this machine, for labkit's tests and for
# instructors rehearsing a workshop on a laptop or VM.
#
#   scripts/local-slurm.sh up       # munge + slurmctld + slurmd, partitions "gpu" (2 fake GPUs) and "cpu" (no nodes)
#   scripts/local-slurm.sh up --nodes 2   # the same, plus partition "nodes": compute hosts node1, node2
#   scripts/local-slurm.sh status   # sinfo, and each compute host with its address
#   scripts/local-slurm.sh down     # stop the daemons (the config stays); munged only if "up" started it;
#                                   # removes every namespace, bridge and veth "up --nodes" made
#   scripts/local-slurm.sh fail-node node2    # a node crash: kill its slurmd and every process on it
#
# With --nodes N each compute node is its own host as far as the network and the hostname go: its
# slurmd runs in a network namespace (labkit-nodeI, address $SUBNET.(10+I) on interface "labkit0"),
# a UTS namespace (hostname nodeI) and a mount namespace whose /tmp is node-local
# ($STATE_DIR/nodes/nodeI/tmp). The host is the login node: slurmctld, munge and the notebook kernel
# stay here, reachable from the nodes at $SUBNET.1 on the bridge "labkit0" this script creates
# (the same interface name on every host, as ib0 is on a real cluster). The checkout and $HOME are
# the shared filesystem (kept visible even when they lie under /tmp). The nodes reach only addresses
# on that bridge: no route leads anywhere else. /etc/hosts inside the nodes names every host.
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
NODES=${LABKIT_SLURM_NODES:-0}          # compute hosts in namespaces (0: the one-node cluster only)
SUBNET=${LABKIT_SLURM_SUBNET:-10.77.0}  # the bridge is $SUBNET.1/24, node I is $SUBNET.(10+I)
BRIDGE=${LABKIT_SLURM_BRIDGE:-labkit0}   # on the host; each node's end of its veth has the same name
NETNS_PREFIX=${LABKIT_SLURM_NETNS_PREFIX:-labkit-}   # node I's network namespace: ${NETNS_PREFIX}nodeI
VETH_PREFIX=${LABKIT_SLURM_VETH_PREFIX:-lkv-}        # the host's end of its veth: ${VETH_PREFIX}nodeI
HOSTS_FILE=${LABKIT_SLURM_HOSTS_FILE:-/etc/hosts}    # where the login node learns the nodes' names
MADE="$STATE_DIR/made"                  # what "up --nodes" created, one "kind name" per line, for "down"
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SHARED=${LABKIT_SLURM_SHARED:-$REPO:${HOME:-/root}}   # paths every node sees as the host does

die() { echo "local-slurm: $*" >&2; exit 1; }

need_root() {
    [ "$(id -u)" = 0 ] || die "must run as root (try: sudo $0 $*)"
    for b in slurmctld slurmd sinfo munged; do
        command -v "$b" >/dev/null 2>&1 || [ -x "/usr/sbin/$b" ] \
            || die "'$b' not found: install Debian's packages with: apt-get install slurmctld slurmd slurm-client munge"
    done
}

node_names() {  # node1 .. nodeN
    local i
    for i in $(seq 1 "$NODES"); do echo "node$i"; done
}

node_addr() {  # NODE: its address on the bridge
    echo "$SUBNET.$(( 10 + ${1#node} ))"
}

write_config() {
    mkdir -p "$CONF_DIR" "$STATE_DIR/ctld" "$LOG_DIR"
    local gpu_last=$(( NGPU - 1 )) ctld_addr=127.0.0.1 n
    for i in $(seq 0 "$gpu_last"); do
        [ -e "/dev/labkit-gpu$i" ] || mknod "/dev/labkit-gpu$i" c 1 3
    done
    # the nodes reach the controller on the bridge; the host's own slurmd reaches it there too
    [ "$NODES" -gt 0 ] && ctld_addr="$SUBNET.1"
    cat > "$CONF_DIR/slurm.conf.new" <<CONF
# Written by labkit scripts/local-slurm.sh: node $NODE (this host) with $NGPU fake GPUs as GRES,
# and $NODES compute host(s) in namespaces with $NGPU each.
ClusterName=labkit
SlurmctldHost=$NODE($ctld_addr)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/d-%n
SlurmctldPidFile=/run/labkit-slurmctld.pid
SlurmdPidFile=/run/labkit-slurmd-%n.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd-%n.log
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
CONF
    echo "NodeName=$NODE Name=gpu File=/dev/labkit-gpu[0-$gpu_last]" > "$CONF_DIR/gres.conf.new"
    if [ "$NODES" -gt 0 ]; then
        for n in $(node_names); do
            echo "NodeName=$n NodeAddr=$(node_addr "$n") CPUs=$NCPU RealMemory=$MEM_MB Gres=gpu:$NGPU State=UNKNOWN"
        done >> "$CONF_DIR/slurm.conf.new"
        echo "PartitionName=nodes Nodes=node[1-$NODES] MaxTime=INFINITE State=UP" >> "$CONF_DIR/slurm.conf.new"
        echo "NodeName=node[1-$NODES] Name=gpu File=/dev/labkit-gpu[0-$gpu_last]" >> "$CONF_DIR/gres.conf.new"
    fi
    mv "$CONF_DIR/gres.conf.new" "$CONF_DIR/gres.conf"
    if [ -f "$CONF_DIR/slurm.conf" ] && ! diff -q <(grep '^NodeName\|^SlurmctldHost\|^PartitionName' "$CONF_DIR/slurm.conf") \
            <(grep '^NodeName\|^SlurmctldHost\|^PartitionName' "$CONF_DIR/slurm.conf.new") >/dev/null; then
        NODESET_CHANGED=1  # nodes or the controller's address changed: the daemons must restart
    fi
    mv "$CONF_DIR/slurm.conf.new" "$CONF_DIR/slurm.conf"
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

live_munged() {  # pids of live munged processes (a zombie left by a stop does not count)
    local pid found=1
    for pid in $(pgrep -x munged || true); do
        is_munged "$pid" && { echo "$pid"; found=0; }
    done
    return $found
}

start_munge() {
    if live_munged >/dev/null; then
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

# ---- compute hosts in namespaces (up --nodes N) ----

netns_inode() {  # a namespace file (/proc/PID/ns/net, /var/run/netns/NAME): its inode, or nothing
    stat -L -c %i "$1" 2>/dev/null || true
}

slurmd_pids_in() {  # NSFILE: pids of the slurmd processes whose network namespace is that one
    local want pid
    want=$(netns_inode "$1")
    [ -n "$want" ] || return 0
    for pid in $(pgrep -x slurmd || true); do
        [ "$(netns_inode "/proc/$pid/ns/net")" = "$want" ] && echo "$pid"
    done
    return 0
}

host_slurmd_pids() { slurmd_pids_in /proc/self/ns/net; }
node_slurmd_pids() { slurmd_pids_in "/var/run/netns/${NETNS_PREFIX}$1"; }

made() {  # KIND NAME: whether "up --nodes" recorded making it
    [ -f "$MADE" ] && grep -qx "$1 $2" "$MADE"
}

record() { mkdir -p "$STATE_DIR"; echo "$1 $2" >> "$MADE"; }

need_net_tools() {
    for b in ip nsenter unshare mount; do
        command -v "$b" >/dev/null 2>&1 || die "'$b' not found: --nodes needs iproute2 and util-linux (apt-get install iproute2 util-linux)"
    done
}

make_bridge() {
    if ip link show "$BRIDGE" >/dev/null 2>&1; then
        made bridge "$BRIDGE" || die "an interface named $BRIDGE exists that this script did not make; remove it or run without --nodes"
        return
    fi
    if ip -4 route show | grep -q "^$SUBNET\."; then
        die "the subnet $SUBNET.0/24 is already routed here ($(ip -4 route show | grep "^$SUBNET\." | head -1)); pick a free one with LABKIT_SLURM_SUBNET=10.78.0"
    fi
    ip link add "$BRIDGE" type bridge
    record bridge "$BRIDGE"
    ip addr add "$SUBNET.1/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
}

make_node_net() {  # NODE: its network namespace, and a veth from the bridge into it
    local n=$1 ns="${NETNS_PREFIX}$1" veth="${VETH_PREFIX}$1"
    if [ ! -e "/var/run/netns/$ns" ]; then
        ip netns add "$ns"
        record netns "$ns"
    fi
    if ! ip link show "$veth" >/dev/null 2>&1; then
        ip link add "$veth" type veth peer name "$BRIDGE" netns "$ns"
        record veth "$veth"
        ip link set "$veth" master "$BRIDGE" up
        ip -n "$ns" addr add "$(node_addr "$n")/24" dev "$BRIDGE"
        ip -n "$ns" link set "$BRIDGE" up
        ip -n "$ns" link set lo up
    fi
    mkdir -p "$STATE_DIR/nodes/$n/tmp"
    chmod 1777 "$STATE_DIR/nodes/$n/tmp"
}

HOSTS_BEGIN="# labkit local-slurm compute hosts on $BRIDGE: begin (removed by scripts/local-slurm.sh down)"
HOSTS_END="# labkit local-slurm compute hosts on $BRIDGE: end"

drop_hosts_block() {  # the lines "up --nodes" added to this host's /etc/hosts, and nothing else
    grep -qxF "$HOSTS_BEGIN" "$HOSTS_FILE" 2>/dev/null || return 0
    local kept
    kept=$(awk -v b="$HOSTS_BEGIN" -v e="$HOSTS_END" '$0 == b {skip = 1; next} $0 == e {skip = 0; next} !skip' "$HOSTS_FILE")
    # rewritten in place, not replaced: /etc/hosts is often a bind mount (containers)
    printf '%s\n' "$kept" > "$HOSTS_FILE"
}

write_hosts() {  # the /etc/hosts every node sees (login node and compute hosts); the host learns the nodes' names
    {
        echo "127.0.0.1 localhost"
        echo "$SUBNET.1 $NODE login"
        for n in $(node_names); do echo "$(node_addr "$n") $n"; done
    } > "$STATE_DIR/hosts.new"
    mv "$STATE_DIR/hosts.new" "$STATE_DIR/hosts"
    # the login node resolves compute hosts by name, as a site's DNS would (a job's URL https://node1:PORT)
    drop_hosts_block
    {
        echo "$HOSTS_BEGIN"
        for n in $(node_names); do echo "$(node_addr "$n") $n"; done
        echo "$HOSTS_END"
    } >> "$HOSTS_FILE"
    made hosts "$HOSTS_FILE" || record hosts "$HOSTS_FILE"
}

node_setup() {  # NODE: inside the node's new UTS and mount namespaces: hostname, /etc/hosts, node-local /tmp
    local n=$1 p real hold i=0 keep=()
    hostname "$n"
    mount --bind "$STATE_DIR/hosts" /etc/hosts
    # shared paths under /tmp (a checkout cloned there) stay visible over the node-local /tmp
    IFS=: read -ra paths <<< "$SHARED"
    for p in "${paths[@]}"; do
        [ -d "$p" ] || continue
        real=$(realpath "$p")
        case "$real/" in /tmp/*) ;; *) continue ;; esac
        hold="/run/labkit-hold-$$-$i"  # outside /tmp, which the node-local mount is about to cover
        i=$(( i + 1 ))
        mkdir -p "$hold"
        mount --bind "$real" "$hold"
        keep+=("$hold=$real")
    done
    mount --bind "$STATE_DIR/nodes/$n/tmp" /tmp
    for p in ${keep[@]+"${keep[@]}"}; do
        mkdir -p "${p#*=}"
        mount --move "${p%%=*}" "${p#*=}"
        rmdir "${p%%=*}" 2>/dev/null || true
    done
}

node_init() {  # NODE: the node's namespaces set up, then this process becomes its slurmd
    node_setup "$1"
    exec /usr/sbin/slurmd -N "$1"
}

node_sees_checkout() {  # PID: whether that process (a node's slurmd) sees this checkout, the shared filesystem
    nsenter --target "$1" --mount -- test -e "$REPO/scripts/local-slurm.sh" 2>/dev/null
}

start_node() {  # NODE: its slurmd in the node's namespaces, unless one runs there that sees this checkout
    local n=$1 pid
    for pid in $(node_slurmd_pids "$n"); do
        node_sees_checkout "$pid" && return 0
        # started from another checkout: its jobs could not see this one's Python; restart it sharing this one
        echo "local-slurm: restarting the slurmd of $n so that it shares $REPO"
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    done
    nsenter --net="/var/run/netns/${NETNS_PREFIX}$n" unshare --uts --mount --propagation private -- \
        bash "$REPO/scripts/local-slurm.sh" node-init "$n" \
        || die "slurmd of $n did not start: see $LOG_DIR/slurmd-$n.log"
}

make_nodes() {
    need_net_tools
    make_bridge
    write_hosts
    for n in $(node_names); do make_node_net "$n"; done
}

remove_made() {  # every namespace, veth and bridge "up --nodes" made (processes in them killed first), nothing else
    [ -f "$MADE" ] || return 0
    local kind name pids
    while read -r kind name; do
        [ "$kind" = netns ] || continue
        pids=$(ip netns pids "$name" 2>/dev/null || true)
        [ -n "$pids" ] && kill -9 $pids 2>/dev/null || true
    done < "$MADE"
    tac "$MADE" | while read -r kind name; do
        case "$kind" in
            veth|bridge) ip link del "$name" 2>/dev/null || true ;;
            netns) ip netns del "$name" 2>/dev/null || true ;;
            hosts) drop_hosts_block ;;
        esac
    done
    rm -rf "$STATE_DIR/nodes" "$STATE_DIR/hosts" "$MADE"
    echo "local-slurm: removed the compute hosts' namespaces, veths and bridge $BRIDGE"
}

fail_node() {  # NODE: a crash, as the rest of the cluster sees it: its slurmd and every process on it die
    local n=${1:-} pids
    [ -n "$n" ] || die "usage: $0 fail-node NODE (one of: $(ls /var/run/netns 2>/dev/null | sed -n "s/^${NETNS_PREFIX}//p" | tr '\n' ' '))"
    made netns "${NETNS_PREFIX}$n" || die "$n is not a compute host of this cluster (start them with: $0 up --nodes N)"
    pids=$(ip netns pids "${NETNS_PREFIX}$n" || true)
    [ -n "$pids" ] && kill -9 $pids 2>/dev/null || true
    echo "local-slurm: $n failed (killed $(echo $pids | wc -w) process(es)); bring it back with: $0 up --nodes <N>"
}

# ---- the whole cluster ----

all_nodes() { echo "$NODE"; node_names; }

wait_idle() {
    local n state
    for n in $(all_nodes); do
        for _ in $(seq 150); do
            state=$(sinfo -h -n "$n" -o %T 2>/dev/null | head -1 || true)
            case "$state" in
                idle|mixed|allocated) continue 2 ;;
                drain*|down*) scontrol update NodeName="$n" State=RESUME >/dev/null 2>&1 || true ;;
            esac
            sleep 0.2
        done
        sinfo -N -l >&2 || true
        tail -n 20 "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd-$n.log" >&2 || true
        die "node $n did not become idle"
    done
}

stop_daemons() {  # Slurm's daemons on the host and on every compute host (munge stays)
    if command -v scancel >/dev/null 2>&1 && pgrep -x slurmctld >/dev/null; then
        scancel --full --quiet --user="$(id -un)" 2>/dev/null || true
    fi
    for d in slurmd slurmctld; do
        pkill -x "$d" 2>/dev/null || true
    done
    for _ in $(seq 100); do
        pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null || return 0
        sleep 0.1
    done
    # a daemon still waiting on its threads after 10 s: a later "up" must not mistake it for a live one
    pkill -9 -x slurmd 2>/dev/null || true
    pkill -9 -x slurmctld 2>/dev/null || true
    for _ in $(seq 30); do
        pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null || return 0
        sleep 0.1
    done
    die "Slurm daemons still running after SIGKILL: $(pgrep -a 'slurmd|slurmctld' | tr '\n' ' ')"
}

up() {
    need_root
    case "$NODES" in ''|*[!0-9]*) die "--nodes takes a number of compute hosts (1 or more), not '$NODES'" ;; esac
    NODESET_CHANGED=0
    write_config
    start_munge
    if [ "$NODESET_CHANGED" = 1 ]; then
        echo "local-slurm: the node set changed: restarting the Slurm daemons"
        stop_daemons
    fi
    [ "$NODES" -gt 0 ] || remove_made  # "up" alone: the one-node cluster, no compute hosts left over
    [ "$NODES" -gt 0 ] && make_nodes
    if ! pgrep -x slurmctld >/dev/null; then
        # a cold start clears jobs left by an earlier run (a killed session, a rebooted VM):
        # stale jobs would hold the fake GPUs and keep new ones pending
        /usr/sbin/slurmctld -c -i
    else
        scontrol reconfigure >/dev/null 2>&1 || true
    fi
    [ -n "$(host_slurmd_pids)" ] || /usr/sbin/slurmd -N "$NODE"
    for n in $(node_names); do start_node "$n"; done
    wait_idle
    status
}

down() {
    stop_daemons
    remove_made
    stop_munge  # after the Slurm daemons, which talk to it while they shut down
    echo "local-slurm: stopped"
}

status() {
    if ! pgrep -x slurmctld >/dev/null; then
        echo "local-slurm: slurmctld is not running (start it with: $0 up)"
        return 3
    fi
    sinfo -o "%P %a %D %T %c %m %G"
    echo
    echo "NODE ADDRESS STATE PARTITION"
    sinfo -N -h -o "%N %o %T %P" | sort -u
}

main() {
    local cmd=${1:-}
    [ $# -gt 0 ] && shift
    while [ $# -gt 0 ]; do
        case "$1" in
            --nodes) [ $# -ge 2 ] || die "--nodes needs a number"; NODES=$2; shift 2 ;;
            --nodes=*) NODES=${1#--nodes=}; shift ;;
            *) [ "$cmd" = fail-node ] || [ "$cmd" = node-init ] || die "unknown option '$1' (usage: $0 up [--nodes N]|down|status|restart [--nodes N]|fail-node NODE)"
               ARG=$1; shift ;;
        esac
    done
    case "$cmd" in
        up) up ;;
        down) down ;;
        status) status ;;
        restart) down; up ;;
        fail-node) fail_node "${ARG:-}" ;;
        node-init) node_init "$ARG" ;;
        *) echo "usage: $0 up [--nodes N]|down|status|restart [--nodes N]|fail-node NODE" >&2; exit 2 ;;
    esac
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then  # run, not sourced
    main "$@"
fi
