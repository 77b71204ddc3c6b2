#!/usr/bin/env bash
# Start/stop a private OpenSSH server on 127.0.0.1 for the rpg test-suite.
#
# Usage: .ci/sshd.sh start|stop|status|env
#
#   start   install openssh-server if needed, generate fresh keys, start sshd
#           on 127.0.0.1:${RPG_SSH_PORT:-2222}, verify a real login, write and
#           print STATE/env.sh.  No-op (re-verify + print env) if running.
#   stop    stop the sshd started by `start` (pid file) and its sessions.
#   status  exit 0 if our sshd is running.
#   env     print STATE/env.sh (source it: `eval "$(.ci/sshd.sh env)"`).
#
# Environment: RPG_CI_DIR (default /tmp/rpg-ci), RPG_SSH_PORT (default 2222),
#              RPG_SSHD_DIR (state dir, default $RPG_CI_DIR/sshd).
set -euo pipefail

export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

CI_DIR="${RPG_CI_DIR:-/tmp/rpg-ci}"
STATE="${RPG_SSHD_DIR:-$CI_DIR/sshd}"
PORT="${RPG_SSH_PORT:-2222}"
HOST=127.0.0.1
USER_NAME=root

CONFIG="$STATE/sshd_config"
PIDFILE="$STATE/sshd.pid"
LOG="$STATE/sshd.log"
HOSTKEY="$STATE/ssh_host_ed25519_key"
CLIENTKEY="$STATE/id_ed25519"
AUTHKEYS="$STATE/authorized_keys"
KNOWN_HOSTS="$STATE/known_hosts"
SSH_CONFIG="$STATE/ssh_config"
ENVFILE="$STATE/env.sh"

log() { echo "sshd.sh: $*" >&2; }

die() {
    log "ERROR: $*"
    if [[ -f "$LOG" ]]; then
        log "---- last lines of $LOG ----"
        tail -n 40 "$LOG" >&2 || true
        log "----------------------------"
    fi
    exit 1
}

# true if pid exists and is not a zombie (PID 1 in containers may reap late)
alive() {
    local st
    st="$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null || true)"
    [[ -n "$st" && "$st" != Z && "$st" != X ]]
}

# pid of our sshd if it is running, else empty
running_pid() {
    local pid
    [[ -f "$PIDFILE" ]] || return 0
    pid="$(cat "$PIDFILE" 2>/dev/null || true)"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 0
    alive "$pid" || return 0
    # make sure the pid was not recycled: it must be an sshd using our config
    if { tr '\0' ' ' <"/proc/$pid/cmdline"; } 2>/dev/null | grep -- "$CONFIG" >/dev/null; then
        echo "$pid"
    fi
}

port_open() {
    timeout 2 bash -c "exec 3<>/dev/tcp/$HOST/$PORT" 2>/dev/null
}

ssh_opts() {
    printf '%s\n' -F /dev/null -n \
        -i "$CLIENTKEY" -p "$PORT" \
        -o BatchMode=yes -o IdentitiesOnly=yes -o IdentityAgent=none \
        -o StrictHostKeyChecking=yes -o "UserKnownHostsFile=$KNOWN_HOSTS" \
        -o GlobalKnownHostsFile=/dev/null -o ConnectTimeout=5 \
        -o LogLevel=ERROR
}

verify_login() {
    local -a opts
    mapfile -t opts < <(ssh_opts)
    local out
    out="$(ssh "${opts[@]}" "$USER_NAME@$HOST" 'echo rpg-ssh-ok' 2>&1)" || {
        log "ssh login failed: $out"
        return 1
    }
    [[ "$out" == *rpg-ssh-ok* ]] || { log "unexpected ssh output: $out"; return 1; }
}

ensure_installed() {
    if command -v sshd >/dev/null 2>&1 && command -v ssh >/dev/null 2>&1 \
        && command -v ssh-keygen >/dev/null 2>&1; then
        return 0
    fi
    command -v apt-get >/dev/null 2>&1 || die "sshd not found and apt-get is unavailable"
    log "installing openssh-server/openssh-client via apt"
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=600 update -q >"$STATE/apt.log" 2>&1 \
        || { tail -n 30 "$STATE/apt.log" >&2; die "apt-get update failed"; }
    apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends \
        openssh-server openssh-client >>"$STATE/apt.log" 2>&1 \
        || { tail -n 30 "$STATE/apt.log" >&2; die "apt-get install openssh-server failed"; }
    command -v sshd >/dev/null 2>&1 || die "sshd still not found after install"
}

write_env() {
    cat >"$ENVFILE" <<EOF
export RPG_SSH_HOST=$HOST
export RPG_SSH_PORT=$PORT
export RPG_SSH_USER=$USER_NAME
export RPG_SSH_KEY=$CLIENTKEY
export RPG_SSH_KNOWN_HOSTS=$KNOWN_HOSTS
export RPG_SSH_CONFIG=$SSH_CONFIG
EOF
    chmod 644 "$ENVFILE"
}

do_start() {
    mkdir -p "$STATE"
    chmod 755 "$STATE"

    local pid
    pid="$(running_pid)"
    if [[ -n "$pid" ]]; then
        verify_login || die "sshd (pid $pid) is running but ssh login fails; try '$0 stop' first"
        write_env
        log "already running (pid $pid)"
        cat "$ENVFILE"
        return 0
    fi

    ensure_installed
    local sshd_bin
    sshd_bin="$(command -v sshd)"
    [[ "$sshd_bin" == /* ]] || sshd_bin="$(readlink -f "$sshd_bin")"

    if port_open; then
        die "port $HOST:$PORT is already in use by another process (set RPG_SSH_PORT)"
    fi

    # With UsePAM=no, sshd refuses a locked account ('!' in shadow) even for
    # key auth.  On a CI box unlock root without giving it a password.
    if [[ "${CI:-}" == true && -r /etc/shadow ]] \
        && grep -q '^root:!' /etc/shadow; then
        log "root account is locked; setting its password field to '*' (CI only)"
        usermod -p '*' root || true
    fi

    local t0=$SECONDS
    rm -f "$HOSTKEY" "$HOSTKEY.pub" "$CLIENTKEY" "$CLIENTKEY.pub" \
        "$AUTHKEYS" "$KNOWN_HOSTS" "$PIDFILE" "$LOG"
    ssh-keygen -q -t ed25519 -N '' -C rpg-ci-hostkey -f "$HOSTKEY" >/dev/null
    ssh-keygen -q -t ed25519 -N '' -C rpg-ci-client -f "$CLIENTKEY" >/dev/null
    chmod 600 "$HOSTKEY" "$CLIENTKEY"
    cp "$CLIENTKEY.pub" "$AUTHKEYS"
    chmod 600 "$AUTHKEYS"

    local hostpub
    hostpub="$(cut -d' ' -f1,2 "$HOSTKEY.pub")"
    {
        echo "[$HOST]:$PORT $hostpub"
        if [[ "$PORT" == 22 ]]; then echo "$HOST $hostpub"; fi
    } >"$KNOWN_HOSTS"
    chmod 644 "$KNOWN_HOSTS"

    cat >"$CONFIG" <<EOF
# generated by .ci/sshd.sh -- rpg test-suite sshd
ListenAddress $HOST
Port $PORT
HostKey $HOSTKEY
PidFile $PIDFILE
AuthorizedKeysFile $AUTHKEYS
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin prohibit-password
UsePAM no
StrictModes no
UseDNS no
Subsystem sftp internal-sftp
AllowTcpForwarding yes
AllowStreamLocalForwarding yes
GatewayPorts no
X11Forwarding no
PermitTunnel no
ClientAliveInterval 5
ClientAliveCountMax 3
MaxStartups 100:30:200
MaxSessions 100
LogLevel INFO
PrintMotd no
# As on a login node, SLURM's commands find the cluster (.ci/slurm.sh's, if it runs)
SetEnv SLURM_CONF=${RPG_SLURM_DIR:-$CI_DIR/slurm}/slurm.conf
EOF
    chmod 644 "$CONFIG"

    # client side convenience config: `ssh -F $SSH_CONFIG rpg-ci`
    cat >"$SSH_CONFIG" <<EOF
Host rpg-ci $HOST
    HostName $HOST
    Port $PORT
    User $USER_NAME
    IdentityFile $CLIENTKEY
    IdentitiesOnly yes
    IdentityAgent none
    UserKnownHostsFile $KNOWN_HOSTS
    GlobalKnownHostsFile /dev/null
    StrictHostKeyChecking yes
    BatchMode yes
EOF
    chmod 644 "$SSH_CONFIG"

    # privilege separation directory
    mkdir -p /run/sshd
    chmod 755 /run/sshd

    "$sshd_bin" -t -f "$CONFIG" >"$STATE/sshd.out" 2>&1 \
        || { cat "$STATE/sshd.out" >&2; die "sshd config test ($sshd_bin -t -f $CONFIG) failed"; }

    "$sshd_bin" -f "$CONFIG" -E "$LOG" </dev/null >"$STATE/sshd.out" 2>&1 \
        || { cat "$STATE/sshd.out" >&2; die "failed to start $sshd_bin"; }

    # wait (bounded) for the port and a working login
    local deadline=$((SECONDS + 15)) ok=0
    while ((SECONDS < deadline)); do
        if port_open; then ok=1; break; fi
        sleep 0.2
    done
    ((ok)) || die "sshd did not open $HOST:$PORT within 15 s"
    [[ -n "$(running_pid)" ]] || die "sshd pid file $PIDFILE missing or stale"

    ok=0
    deadline=$((SECONDS + 10))
    while ((SECONDS < deadline)); do
        if verify_login 2>/dev/null; then ok=1; break; fi
        sleep 0.5
    done
    ((ok)) || { verify_login || true; die "ssh login to $USER_NAME@$HOST:$PORT failed"; }

    write_env
    log "started sshd (pid $(running_pid)) on $HOST:$PORT in $((SECONDS - t0)) s"
    cat "$ENVFILE"
}

# all descendants of a pid (per-connection sshd processes, shells, ...)
descendants() {
    local parent=$1 child
    for child in $(ps -o pid= --ppid "$parent" 2>/dev/null); do
        echo "$child"
        descendants "$child"
    done
}

do_stop() {
    local pid
    pid="$(running_pid)"
    if [[ -z "$pid" ]]; then
        rm -f "$PIDFILE"
        log "not running"
        return 0
    fi
    local -a kids
    mapfile -t kids < <(descendants "$pid")
    kill -TERM "$pid" 2>/dev/null || true
    if ((${#kids[@]})); then kill -TERM "${kids[@]}" 2>/dev/null || true; fi
    local deadline=$((SECONDS + 10))
    while ((SECONDS < deadline)); do
        alive "$pid" || break
        sleep 0.1
    done
    if alive "$pid"; then
        log "sshd $pid did not exit on SIGTERM, sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.5
    fi
    if ((${#kids[@]})); then kill -KILL "${kids[@]}" 2>/dev/null || true; fi
    alive "$pid" && die "could not stop sshd $pid"
    rm -f "$PIDFILE"
    log "stopped sshd (pid $pid)"
}

do_env() {
    [[ -f "$ENVFILE" ]] || die "no env file $ENVFILE; run '$0 start' first"
    cat "$ENVFILE"
}

do_status() {
    local pid
    pid="$(running_pid)"
    if [[ -n "$pid" ]]; then
        echo "sshd running (pid $pid) on $HOST:$PORT"
    else
        echo "sshd not running"
        return 1
    fi
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
