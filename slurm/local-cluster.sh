#!/usr/bin/env bash
# A real two-node SLURM cluster on this one host, for vascdist's tests and for trying sbatch on a laptop.
#
#   slurm/local-cluster.sh start    # install what is missing, start munged + slurmctld + 2 slurmd, wait for idle
#   slurm/local-cluster.sh status   # print sinfo; exit non-zero unless both nodes are up
#   slurm/local-cluster.sh stop     # cancel all jobs, stop the daemons, remove the /etc/hosts line start added
#
# Everything lives under $VASCDIST_SLURM_DIR (default /tmp/vascdist-slurm): slurm.conf, a private munge key
# and socket, state, spool, pids, logs.  Nothing touches /etc/slurm or the system munged, and the ports
# (slurmctld 16817, slurmd 17001-17002) avoid a system SLURM's defaults.  After `start`:
#   source /tmp/vascdist-slurm/env.sh      # or: export SLURM_CONF=/tmp/vascdist-slurm/slurm.conf
#
# Environment: VASCDIST_SLURM_DIR (state dir), VASCDIST_SLURM_WAIT (seconds to wait for idle nodes, default 60).
# Needs root or sudo for apt-get and for adding `127.0.0.1 n1 n2` to /etc/hosts; the daemons run as the
# invoking user (jobs can then only be submitted by that user, which is all a test cluster needs).
set -euo pipefail

STATE="${VASCDIST_SLURM_DIR:-/tmp/vascdist-slurm}"
WAIT="${VASCDIST_SLURM_WAIT:-60}"
CONF="$STATE/slurm.conf"
MUNGE="$STATE/munge"
LOGS="$STATE/log"
NODES=(n1 n2)
HOSTS_TAG="# vascdist local SLURM cluster"
PACKAGES=(slurmctld slurmd slurm-client munge)
PATH="$PATH:/usr/sbin:/sbin"
export SLURM_CONF="$CONF"

die() { echo "local-cluster: $*" >&2; exit 1; }
log() { echo "local-cluster: $*" >&2; }

# Run as root: directly if we are root, else through sudo (never prompting when there is no terminal,
# so a test run fails fast instead of hanging on a password).
as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"
    elif [ -t 0 ]; then sudo "$@"
    else sudo -n "$@"
    fi
}

install_packages() {
    local missing=() p
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get; install them by hand"
    log "installing ${missing[*]} (apt-get)"
    # Update the package lists only when apt has none (a fresh container); a laptop's lists are usually fine.
    mkdir -p "$STATE"
    if ! compgen -G "/var/lib/apt/lists/*_Packages" >/dev/null; then
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q >"$STATE/apt.log" 2>&1 \
            || die "apt-get update failed: $(tail -n 5 "$STATE/apt.log")"
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        -o Dpkg::Options::=--force-confold "${missing[@]}" >>"$STATE/apt.log" 2>&1 \
        || die "apt-get install ${missing[*]} failed: $(tail -n 5 "$STATE/apt.log")"
}

# n1 and n2 must resolve to 127.0.0.1: `scontrol show hostnames` gives n1, and torchrun's rendezvous uses it.
ensure_hosts() {
    local n
    for n in "${NODES[@]}"; do
        if [ "$(getent ahostsv4 "$n" 2>/dev/null | awk 'NR==1{print $1}')" != "127.0.0.1" ]; then
            log "adding '127.0.0.1 ${NODES[*]}' to /etc/hosts"
            echo "127.0.0.1 ${NODES[*]}  $HOSTS_TAG" | as_root tee -a /etc/hosts >/dev/null
            mkdir -p "$STATE" && touch "$STATE/hosts-added"  # so that stop removes exactly what start added
            return 0
        fi
    done
}

# Undo ensure_hosts: drop the tagged line, writing /etc/hosts in place (in containers it is a bind mount, which
# a rename cannot replace).
remove_hosts() {
    [ -f "$STATE/hosts-added" ] || return 0
    if grep -q "$HOSTS_TAG\$" /etc/hosts; then
        log "removing '127.0.0.1 ${NODES[*]}' from /etc/hosts"
        grep -v "$HOSTS_TAG\$" /etc/hosts >"$STATE/hosts.new" || true
        as_root tee /etc/hosts <"$STATE/hosts.new" >/dev/null
        rm -f "$STATE/hosts.new"
    fi
    rm -f "$STATE/hosts-added"
}

# RealMemory per node: 90% of this host's memory in MB (each slurmd reports the whole host, so both fit).
# With CR_CPU memory is not consumed, so any --mem up to this is accepted on either node.
real_memory_mb() {
    awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo
}

write_conf() {
    local user host
    user="$(id -un)"
    host="$(hostname -s)"
    mkdir -p "$STATE/ctld" "$LOGS"
    cat >"$CONF.tmp" <<EOF
# Written by slurm/local-cluster.sh; rewritten on every start.
ClusterName=vascdist
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=16817
SlurmUser=$user
SlurmdUser=$user
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job waits before it may start again (default 120 s); step
# credentials only need to live from step creation to launch, which takes well under a second here.
AuthInfo=socket=$MUNGE/munge.socket,cred_expire=5
StateSaveLocation=$STATE/ctld
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdSpoolDir=$STATE/spool-%n
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmdLogFile=$LOGS/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups: they are often unavailable in containers and VMs, and a test cluster needs no confinement.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
# Main scheduler and backfill every 5 s (defaults 60 s, 30 s): a requeued job only becomes eligible
# cred_expire seconds after the requeue, and nothing but these passes then starts it.
SchedulerParameters=bf_interval=5,sched_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobRequeue=1
MinJobAge=30
KillWait=5
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
NodeName=n[1-2] NodeHostname=$host NodeAddr=127.0.0.1 Port=[17001-17002] CPUs=1 RealMemory=$(real_memory_mb) State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF.tmp" "$CONF"
    echo "export SLURM_CONF=$CONF" >"$STATE/env.sh"
}

# A private munged with its own key and socket, so the system munge (if any) is neither needed nor touched.
start_munge() {
    mkdir -p "$MUNGE"
    # munged wants the socket's directory searchable by all (it refuses 0700 unless run as root with
    # --force) and the key's directory not writable by others: 0755 satisfies both.
    chmod 0755 "$MUNGE"
    if [ ! -s "$MUNGE/munge.key" ]; then
        dd if=/dev/urandom of="$MUNGE/munge.key" bs=1024 count=1 status=none
    fi
    chmod 0400 "$MUNGE/munge.key"  # munged refuses a key readable by others
    if pid_alive "$MUNGE/munged.pid"; then return 0; fi
    local force=()
    [ "$(id -u)" -eq 0 ] && force=(--force)  # munged refuses to run as root without it
    munged "${force[@]}" --socket="$MUNGE/munge.socket" --key-file="$MUNGE/munge.key" \
        --pid-file="$MUNGE/munged.pid" --log-file="$MUNGE/munged.log" --seed-file="$MUNGE/munged.seed" 9>&- \
        || die "munged failed to start: $(tail -n 5 "$MUNGE/munged.log" 2>/dev/null)"
    munge -n -S "$MUNGE/munge.socket" | unmunge -S "$MUNGE/munge.socket" >/dev/null \
        || die "munge round trip failed; see $MUNGE/munged.log"
}

# True when the pid file names a live process of this cluster (its command line names the state dir),
# so a stale pid file whose number was reused by another process does not count.
pid_alive() {
    [ -s "$1" ] && tr '\0' ' ' <"/proc/$(cat "$1")/cmdline" 2>/dev/null | grep -qF "$STATE/"
}

start_daemons() {
    if ! pid_alive "$STATE/slurmctld.pid"; then
        # -c: start clean. `stop` cancels every job anyway, and recovered node states would read "idle"
        # before the slurmds have registered, so waiting for idle nodes would prove nothing.
        slurmctld -c -f "$CONF" 9>&- || die "slurmctld failed to start: $(tail -n 20 "$LOGS/slurmctld.log" 2>/dev/null)"
    fi
    local n
    for n in "${NODES[@]}"; do
        mkdir -p "$STATE/spool-$n"
        if ! pid_alive "$STATE/slurmd-$n.pid"; then
            slurmd -f "$CONF" -N "$n" 9>&- || die "slurmd $n failed to start: $(tail -n 20 "$LOGS/slurmd-$n.log" 2>/dev/null)"
        fi
    done
}

# True when slurmctld answers and both nodes are idle, allocated, mixed or completing a job (not down,
# drained, unknown or not responding: those carry another name or a suffix such as "idle*").
cluster_up() {
    local states
    # Without a live slurmctld, scontrol and sinfo would each spend ~10 s retrying the connection.
    pid_alive "$STATE/slurmctld.pid" || return 1
    scontrol ping 2>/dev/null | grep -q "is UP" || return 1
    states="$(sinfo -h -N -p debug -o '%N %t' 2>/dev/null)" || return 1
    [ "$(echo "$states" | grep -cE " (idle|alloc|mix|comp)$")" -eq ${#NODES[@]} ]
}

wait_idle() {
    local deadline=$((SECONDS + WAIT))
    while [ $SECONDS -lt $deadline ]; do
        if cluster_up; then return 0; fi
        sleep 1
    done
    sinfo -N 2>&1 >&2 || true
    for f in "$LOGS/slurmctld.log" "$LOGS"/slurmd-*.log; do
        # The pmix lines are harmless noise (libpmix is not installed; MpiDefault=none).
        [ -f "$f" ] && { echo "--- tail $f" >&2; grep -v pmix "$f" | tail -n 15 >&2; }
    done
    die "nodes not idle after ${WAIT}s (state dir $STATE)"
}

cmd_start() {
    install_packages
    ensure_hosts
    write_conf
    start_munge
    start_daemons
    wait_idle
    echo "export SLURM_CONF=$CONF"
}

any_alive() {
    local p
    for p in "$@"; do kill -0 "$p" 2>/dev/null && return 0; done
    return 1
}

# Stop the daemons named by pid files: TERM them all at once, wait up to 10 s, then KILL what is left.
stop_pidfiles() {
    local pids=() f i
    for f in "$@"; do
        if pid_alive "$f"; then pids+=("$(cat "$f")"); else rm -f "$f"; fi  # the daemons remove their own
    done
    [ ${#pids[@]} -eq 0 ] && return 0
    kill -TERM "${pids[@]}" 2>/dev/null || true
    for i in $(seq 100); do
        any_alive "${pids[@]}" || return 0
        sleep 0.1
    done
    kill -KILL "${pids[@]}" 2>/dev/null || true
}

# slurmstepd processes outlive slurmd; ours are the ones whose environment carries our SLURM_CONF.
stop_stepds() {
    local p
    for p in $(pgrep -x slurmstepd 2>/dev/null || true); do
        if tr '\0' '\n' <"/proc/$p/environ" 2>/dev/null | grep -qx "SLURM_CONF=$CONF"; then
            kill -KILL "$p" 2>/dev/null || true
        fi
    done
}

cmd_stop() {
    if pid_alive "$STATE/slurmctld.pid" && scontrol ping 2>/dev/null | grep -q "is UP"; then
        scancel --full --quiet -u "$(id -un)" 2>/dev/null || true
        local i
        for i in $(seq 20); do [ -z "$(squeue -h -t R,CG 2>/dev/null)" ] && break; sleep 0.5; done
    fi
    stop_pidfiles "$STATE/slurmctld.pid" "$STATE"/slurmd-*.pid
    stop_stepds
    stop_pidfiles "$MUNGE/munged.pid"
    remove_hosts
    log "stopped"
}

cmd_status() {
    [ -f "$CONF" ] || die "not started (no $CONF)"
    pid_alive "$STATE/slurmctld.pid" || die "not running (no slurmctld)"
    sinfo 2>&1 || true
    cluster_up || die "cluster is not up"
}

# start and stop hold a lock, so two test runs starting the cluster at once do not start it twice.
# The daemons are started with fd 9 closed, or they would hold the lock for as long as they live.
lock() {
    mkdir -p "$STATE"
    exec 9>"$STATE/lock"
    flock -w 300 9 || die "another start/stop holds $STATE/lock"
}

case "${1:-}" in
    start) lock; cmd_start ;;
    stop) lock; cmd_stop ;;
    status) cmd_status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
