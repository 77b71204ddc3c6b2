#!/usr/bin/env bash
# Start/stop a private single-node Slurm cluster (+ munge) for the rpg test-suite.
#
# Usage: .ci/slurm.sh start|stop|status|env
#
#   start   install slurm-wlm/munge if needed, start munged (if not running),
#           write STATE/slurm.conf, start slurmctld + slurmd, wait until the
#           node is idle, verify sbatch + srun, write and print STATE/env.sh.
#           No-op (re-check + print env) if already running.
#   stop    cancel all jobs, stop slurmd, slurmctld and munged (only if this
#           script started it).
#   status  exit 0 if slurmctld and slurmd are running.
#   env     print STATE/env.sh (source it: `eval "$(.ci/slurm.sh env)"`).
#
# Environment: RPG_CI_DIR (default /tmp/rpg-ci), RPG_SLURM_DIR (state dir,
#   default $RPG_CI_DIR/slurm), RPG_SLURMCTLD_PORT (6817), RPG_SLURMD_PORT (6818).
set -euo pipefail

export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

CI_DIR="${RPG_CI_DIR:-/tmp/rpg-ci}"
STATE="${RPG_SLURM_DIR:-$CI_DIR/slurm}"
CTLD_PORT="${RPG_SLURMCTLD_PORT:-6817}"
SLURMD_PORT="${RPG_SLURMD_PORT:-6818}"
NODE=localhost
PARTITION=debug

CONF="$STATE/slurm.conf"
ENVFILE="$STATE/env.sh"
CTLD_PID="$STATE/slurmctld.pid"
SLURMD_PID="$STATE/slurmd.pid"
CTLD_LOG="$STATE/slurmctld.log"
SLURMD_LOG="$STATE/slurmd.log"
MUNGED_MARK="$STATE/munged.started-by-us"
MUNGE_KEY=/etc/munge/munge.key
MUNGE_RUN=/run/munge
MUNGED_PIDFILE="$MUNGE_RUN/munged.pid"
MUNGED_LOG=/var/log/munge/munged.log

export SLURM_CONF="$CONF"

log() { echo "slurm.sh: $*" >&2; }

SHOW_MUNGE_LOG=0

show_logs() {
    local f files=("$CTLD_LOG" "$SLURMD_LOG")
    ((SHOW_MUNGE_LOG)) && files+=("$MUNGED_LOG" "$STATE/munged.out")
    for f in "${files[@]}"; do
        if [[ -s "$f" ]]; then
            log "---- last lines of $f ----"
            tail -n 30 "$f" >&2 || true
        fi
    done
    log "----------------------------"
}

die() {
    log "ERROR: $*"
    show_logs
    exit 1
}

# print pid from a pid file if that process is alive and its command matches
pid_alive() {
    local pidfile=$1 pattern=$2 pid
    [[ -f "$pidfile" ]] || return 0
    pid="$(tr -dc '0-9' <"$pidfile" 2>/dev/null || true)"
    [[ -n "$pid" ]] && alive "$pid" || return 0
    if { tr '\0' ' ' <"/proc/$pid/cmdline"; } 2>/dev/null | grep -- "$pattern" >/dev/null; then
        echo "$pid"
    fi
}

ctld_pid() { pid_alive "$CTLD_PID" slurmctld; }
slurmd_pid() { pid_alive "$SLURMD_PID" slurmd; }

port_open() {
    timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null
}

# true if pid exists and is not a zombie (PID 1 in containers may reap late)
alive() {
    local st
    st="$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null || true)"
    [[ -n "$st" && "$st" != Z && "$st" != X ]]
}

# stop a process (TERM, bounded wait, KILL)
stop_pid() {
    local pid=$1 name=$2 secs=${3:-15}
    [[ -n "$pid" ]] || return 0
    kill -TERM "$pid" 2>/dev/null || return 0
    local deadline
    deadline=$((SECONDS + secs))
    while ((SECONDS < deadline)); do
        alive "$pid" || { log "stopped $name (pid $pid)"; return 0; }
        sleep 0.2
    done
    log "$name (pid $pid) did not exit on SIGTERM within ${secs}s, sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    sleep 0.5
    if alive "$pid"; then die "could not stop $name (pid $pid)"; fi
}

# ----------------------------------------------------------------- install
ensure_installed() {
    local missing=()
    command -v munged >/dev/null 2>&1 || missing+=(munge)
    command -v slurmctld >/dev/null 2>&1 && command -v slurmd >/dev/null 2>&1 \
        && command -v sbatch >/dev/null 2>&1 || missing+=(slurm-wlm)
    ((${#missing[@]})) || return 0
    command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]} and apt-get is unavailable"
    log "installing ${missing[*]} via apt"
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=600 update -q >"$STATE/apt.log" 2>&1 \
        || { tail -n 30 "$STATE/apt.log" >&2; die "apt-get update failed"; }
    apt-get -o DPkg::Lock::Timeout=600 install -y -q slurm-wlm munge \
        >>"$STATE/apt.log" 2>&1 \
        || { tail -n 30 "$STATE/apt.log" >&2; die "apt-get install slurm-wlm munge failed"; }
    command -v slurmctld >/dev/null 2>&1 || die "slurmctld still not found after install"
    command -v munged >/dev/null 2>&1 || die "munged still not found after install"
}

# ------------------------------------------------------------------- munge
munge_ok() {
    command -v munge >/dev/null 2>&1 || return 1
    munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1
}

start_munge() {
    if munge_ok; then
        return 0
    fi
    SHOW_MUNGE_LOG=1
    id munge >/dev/null 2>&1 || die "user 'munge' does not exist (broken munge install?)"

    mkdir -p /etc/munge /var/lib/munge /var/log/munge "$MUNGE_RUN"
    chown munge:munge /etc/munge /var/lib/munge /var/log/munge "$MUNGE_RUN"
    chmod 700 /etc/munge /var/log/munge
    chmod 711 /var/lib/munge
    chmod 755 "$MUNGE_RUN"

    if [[ ! -s "$MUNGE_KEY" ]]; then
        log "creating munge key $MUNGE_KEY"
        if command -v mungekey >/dev/null 2>&1; then
            mungekey --create --keyfile="$MUNGE_KEY" --force
        else
            dd if=/dev/urandom of="$MUNGE_KEY" bs=1 count=1024 status=none
        fi
    fi
    chown munge:munge "$MUNGE_KEY"
    chmod 400 "$MUNGE_KEY"

    # a stale socket/lock from a dead munged makes a new one refuse to start
    local old
    old="$(pid_alive "$MUNGED_PIDFILE" munged)"
    if [[ -z "$old" ]]; then
        rm -f "$MUNGE_RUN"/munge.socket.2 "$MUNGE_RUN"/munge.socket.2.lock "$MUNGED_PIDFILE"
    fi

    local munged_bin
    munged_bin="$(command -v munged)"
    if [[ "$(id -u)" == 0 ]] && command -v runuser >/dev/null 2>&1; then
        runuser -u munge -- "$munged_bin" >"$STATE/munged.out" 2>&1 \
            || die "failed to start munged as user munge"
    else
        "$munged_bin" --force >"$STATE/munged.out" 2>&1 || die "failed to start munged"
    fi

    local deadline=$((SECONDS + 10))
    while ((SECONDS < deadline)); do
        munge_ok && break
        sleep 0.2
    done
    munge_ok || die "munged started but 'munge -n | unmunge' fails"
    local pid
    pid="$(pid_alive "$MUNGED_PIDFILE" munged)"
    echo "${pid:-unknown}" >"$MUNGED_MARK"
    log "started munged (pid ${pid:-?})"
    SHOW_MUNGE_LOG=0
}

stop_munge() {
    [[ -f "$MUNGED_MARK" ]] || return 0
    local pid
    pid="$(tr -dc '0-9' <"$MUNGED_MARK" || true)"
    if [[ -n "$pid" && -r "/proc/$pid/cmdline" ]] \
        && { tr '\0' ' ' <"/proc/$pid/cmdline"; } 2>/dev/null | grep munged >/dev/null; then
        stop_pid "$pid" munged 10
    fi
    rm -f "$MUNGED_MARK"
}

# ------------------------------------------------------------------ config
write_conf() {
    local cpus mem_kb mem_mb
    cpus="$(nproc)"
    mem_kb="$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)"
    mem_mb=$((mem_kb / 1024))
    # a bit under the real memory so slurmd never finds "low real memory"
    mem_mb=$((mem_mb * 90 / 100))
    ((mem_mb > 0)) || mem_mb=1

    mkdir -p "$STATE/ctld" "$STATE/spool" "$STATE/jobs"
    chmod 755 "$STATE" "$STATE/ctld" "$STATE/spool"
    chmod 1777 "$STATE/jobs"

    cat >"$CONF" <<EOF
# generated by .ci/slurm.sh -- single-node Slurm for the rpg test-suite
ClusterName=rpgci
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=2
PriorityType=priority/basic
ReturnToService=2
EnforcePartLimits=ALL
SlurmdParameters=config_overrides
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$CTLD_LOG
SlurmdLogFile=$SLURMD_LOG
SlurmctldDebug=info
SlurmdDebug=info
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MailProg=/bin/true
SlurmctldTimeout=30
SlurmdTimeout=30
MessageTimeout=10
MinJobAge=5
KillWait=2
InactiveLimit=0
Waittime=0
NodeName=$NODE NodeAddr=127.0.0.1 NodeHostname=$NODE CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    chmod 644 "$CONF"
}

write_env() {
    cat >"$ENVFILE" <<EOF
export SLURM_CONF=$CONF
export RPG_SLURM_PARTITION=$PARTITION
export RPG_SLURM_JOBDIR=$STATE/jobs
EOF
    chmod 644 "$ENVFILE"
}

# --------------------------------------------------------------- node state
node_state() {
    sinfo -h -N -n "$NODE" -o %T 2>/dev/null | head -n1 || true
}

wait_node_idle() {
    local secs=$1 st="" resumed=0
    local deadline=$((SECONDS + secs))
    while ((SECONDS < deadline)); do
        st="$(node_state)"
        case "$st" in
            idle | mixed | allocated | completing) return 0 ;;
            *down* | *drain* | *fail*)
                if [[ -n "$(slurmd_pid)" ]] && ((resumed < 3)); then
                    log "node state '$st' ($(sinfo -h -R -o '%E' 2>/dev/null || true)); resuming"
                    scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true
                    resumed=$((resumed + 1))
                fi
                ;;
        esac
        [[ -n "$(ctld_pid)" ]] || die "slurmctld died while waiting for the node"
        [[ -n "$(slurmd_pid)" ]] || die "slurmd died while waiting for the node"
        sleep 0.5
    done
    sinfo -N -l >&2 || true
    sinfo -R >&2 || true
    die "node $NODE not idle after ${secs}s (state '${st}')"
}

# ------------------------------------------------------------------ verify
verify() {
    local out jobid state deadline
    out="$STATE/jobs/verify-%j.out"
    jobid="$(sbatch --parsable -p "$PARTITION" -N1 -n1 -t 1 -J rpg-ci-verify \
        -o "$out" --wrap 'hostname; id -un' 2>&1)" || die "sbatch failed: $jobid"
    jobid="${jobid%%;*}"
    [[ "$jobid" =~ ^[0-9]+$ ]] || die "sbatch printed unexpected output: $jobid"
    out="$STATE/jobs/verify-$jobid.out"

    deadline=$((SECONDS + 30))
    state=""
    while ((SECONDS < deadline)); do
        state="$(scontrol show job -o "$jobid" 2>/dev/null \
            | grep -o 'JobState=[A-Z_]*' | cut -d= -f2 || true)"
        case "$state" in
            COMPLETED | "") [[ -s "$out" ]] && break ;;
            FAILED | CANCELLED | TIMEOUT | NODE_FAIL | OUT_OF_MEMORY | BOOT_FAIL | DEADLINE)
                die "verification job $jobid ended in state $state: $(cat "$out" 2>/dev/null)" ;;
        esac
        sleep 0.3
    done
    if ! [[ -s "$out" ]] || ! grep -q root "$out"; then
        die "verification job $jobid did not complete in 30s (state '$state'): $(cat "$out" 2>/dev/null)"
    fi
    rm -f "$out"

    local srun_out
    srun_out="$(timeout 30 srun -p "$PARTITION" -N1 -n1 -t 1 -J rpg-ci-srun echo srun-ok 2>&1)" \
        || die "srun failed: $srun_out"
    [[ "$srun_out" == *srun-ok* ]] || die "srun printed unexpected output: $srun_out"
}

# ------------------------------------------------------------------ actions
do_start() {
    mkdir -p "$STATE"
    chmod 755 "$STATE"
    local t0=$SECONDS

    if [[ -n "$(ctld_pid)" && -n "$(slurmd_pid)" ]] && munge_ok; then
        wait_node_idle 30
        write_env
        log "already running (slurmctld $(ctld_pid), slurmd $(slurmd_pid))"
        cat "$ENVFILE"
        return 0
    fi
    # partially running: restart cleanly
    if [[ -n "$(ctld_pid)" || -n "$(slurmd_pid)" ]]; then
        log "partially running; restarting"
        stop_pid "$(slurmd_pid)" slurmd
        stop_pid "$(ctld_pid)" slurmctld
    fi

    # fresh cluster state every start (job ids restart at 1)
    rm -rf "$STATE/ctld" "$STATE/spool"
    rm -f "$CTLD_LOG" "$SLURMD_LOG" "$CTLD_PID" "$SLURMD_PID" \
        "$STATE/slurmctld.out" "$STATE/slurmd.out"

    local p
    for p in "$CTLD_PORT" "$SLURMD_PORT"; do
        if port_open "$p"; then
            die "port $p already in use (another slurm?); set RPG_SLURMCTLD_PORT/RPG_SLURMD_PORT"
        fi
    done

    ensure_installed
    start_munge
    write_conf

    "$(command -v slurmctld)" -f "$CONF" -i </dev/null >"$STATE/slurmctld.out" 2>&1 \
        || { cat "$STATE/slurmctld.out" >&2; die "slurmctld failed to start"; }
    local deadline=$((SECONDS + 20))
    while ((SECONDS < deadline)); do
        [[ -n "$(ctld_pid)" ]] && scontrol ping 2>/dev/null | grep UP >/dev/null && break
        sleep 0.2
    done
    scontrol ping 2>/dev/null | grep UP >/dev/null \
        || { cat "$STATE/slurmctld.out" >&2; die "slurmctld not responding after 20s"; }

    "$(command -v slurmd)" -f "$CONF" -N "$NODE" </dev/null >"$STATE/slurmd.out" 2>&1 \
        || { cat "$STATE/slurmd.out" >&2; die "slurmd failed to start"; }
    deadline=$((SECONDS + 10))
    while ((SECONDS < deadline)); do
        [[ -n "$(slurmd_pid)" ]] && break
        sleep 0.2
    done
    [[ -n "$(slurmd_pid)" ]] || { cat "$STATE/slurmd.out" >&2; die "slurmd did not start"; }

    wait_node_idle 30
    verify
    write_env
    log "slurm $(sinfo -V | awk '{print $2}') started in $((SECONDS - t0)) s" \
        "(slurmctld $(ctld_pid), slurmd $(slurmd_pid))"
    cat "$ENVFILE"
}

# job processes that escaped their job (proctrack/linuxproc does not kill
# background/daemonized children of a finished job): they carry both our
# SLURM_CONF and a SLURM_JOB_ID in their environment.
our_job_leftovers() {
    local pid env
    for pid in $(ps -e -o pid=); do
        [[ "$pid" == "$$" || "$pid" == "$PPID" ]] && continue
        alive "$pid" || continue
        env=$'\n'"$({ tr '\0' '\n' <"/proc/$pid/environ"; } 2>/dev/null || true)"$'\n'
        if [[ "$env" == *$'\n'"SLURM_CONF=$CONF"$'\n'* && "$env" == *$'\n'SLURM_JOB_ID=* ]]; then
            echo "$pid"
        fi
    done
}

# slurmstepd processes belonging to our cluster (they inherit SLURM_CONF)
our_stepds() {
    local pid
    for pid in $(pgrep -x slurmstepd 2>/dev/null || true); do
        alive "$pid" || continue
        if { tr '\0' '\n' <"/proc/$pid/environ"; } 2>/dev/null | grep -x "SLURM_CONF=$CONF" >/dev/null; then
            echo "$pid"
        fi
    done
}

do_stop() {
    local cpid dpid
    cpid="$(ctld_pid)"
    dpid="$(slurmd_pid)"
    if [[ -n "$cpid" ]] && munge_ok; then
        local jobs
        jobs="$(squeue -h -o %A 2>/dev/null | tr '\n' ' ' || true)"
        if [[ -n "${jobs// /}" ]]; then
            log "cancelling jobs: $jobs"
            # shellcheck disable=SC2086
            scancel $jobs 2>/dev/null || true
            local deadline=$((SECONDS + 10))
            while ((SECONDS < deadline)); do
                [[ -z "$(squeue -h -o %A -t PD,R,CG,S,CF 2>/dev/null || true)" ]] && break
                sleep 0.3
            done
        fi
    fi
    stop_pid "$dpid" slurmd
    stop_pid "$cpid" slurmctld
    local s
    for s in $(our_stepds); do stop_pid "$s" slurmstepd 5; done
    local -a left
    mapfile -t left < <(our_job_leftovers)
    if ((${#left[@]})); then
        log "killing leftover job processes: ${left[*]}"
        kill -KILL "${left[@]}" 2>/dev/null || true
    fi
    rm -f "$CTLD_PID" "$SLURMD_PID"
    stop_munge
    if [[ -n "$cpid$dpid" ]]; then log "stopped"; else log "not running"; fi
}

do_env() {
    [[ -f "$ENVFILE" ]] || die "no env file $ENVFILE; run '$0 start' first"
    cat "$ENVFILE"
}

do_status() {
    local c d
    c="$(ctld_pid)"
    d="$(slurmd_pid)"
    echo "slurmctld: ${c:-not running}; slurmd: ${d:-not running}; node: $(node_state)"
    [[ -n "$c" && -n "$d" ]]
}

case "${1:-}" in
    start) do_start ;;
    stop) do_stop ;;
    env) do_env ;;
    status) do_status ;;
    *)
        echo "usage: $0 start|stop|status|env" >&2
        exit 2
        ;;
esac
