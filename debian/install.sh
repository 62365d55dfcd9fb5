#!/usr/bin/env bash
# Install milterguard as a Debian package and start it with its default
# configuration.  Run as root on Debian 12:
#
#   debian/install.sh                      build the package from this checkout, install it
#   debian/install.sh milterguard_*.deb    install a package built before
#
# Running it again upgrades the package and restarts the filter; apt keeps
# every file in /etc/milterguard that the administrator changed.
#
# What goes where (docs/install.md has the details):
#   /usr/lib/milterguard        the package's private Python environment
#   /usr/sbin/milterguard       the command
#   /usr/share/milterguard      the shipped rules/, rules/maps/ and conf/ (replaced on upgrade)
#   /etc/milterguard            local.d/ (with an example), override.d/, rules.d/, maps/
#   /lib/systemd/system         milterguard.service, milterguard-daily.timer
#   without systemd: /run/milterguard/milterguard.pid and /var/log/milterguard/milterguard.log
#
# Environment (all optional):
#   MILTERGUARD_DEB           the package to install (as the first argument)
#   MILTERGUARD_SOCKET        milter socket; default: milter.socket of the configuration
#                             (inet:11339@127.0.0.1); when set, it is given to `serve --socket`
#   MILTERGUARD_NO_SYSTEMD=1  leave systemd alone and run the filter in the background
#   MILTERGUARD_WAIT          seconds to wait for the socket (default 20)
set -euo pipefail

# The caller's Python environment must not leak into the build or the filter.
unset PYTHONPATH PYTHONHOME PYTHONSTARTUP PYTHONUSERBASE

SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEB="${1:-${MILTERGUARD_DEB:-}}"
SOCKET="${MILTERGUARD_SOCKET:-}"
WAIT="${MILTERGUARD_WAIT:-20}"
BIN=/usr/sbin/milterguard
ETC=/etc/milterguard
RUN=/run/milterguard
LOG=/var/log/milterguard
RUN_USER=milterguard

say() { printf 'milterguard install: %s\n' "$*"; }
die() { printf 'milterguard install: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run me as root"
export DEBIAN_FRONTEND=noninteractive

use_systemd=0
if [ "${MILTERGUARD_NO_SYSTEMD:-0}" != 1 ] && [ -d /run/systemd/system ]; then
    use_systemd=1
fi

apt_need() {
    local need=() pkg
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
    done
    if [ "${#need[@]}" -gt 0 ]; then
        say "installing ${need[*]}"
        apt-get update -q
        apt-get install -y -q --no-install-recommends "${need[@]}"
    fi
}

# ------------------------------------------------------------------ the package
stage=""
trap '[ -z "$stage" ] || rm -rf "$stage"' EXIT
if [ -z "$DEB" ]; then
    apt_need debhelper dh-virtualenv python3 python3-venv python3-dev libmilter-dev build-essential fakeroot
    # Build from a clean copy: what a clean clone of this tree has, nothing left by a
    # test run or an earlier build.
    stage="$(mktemp -d)"
    mkdir "$stage/milterguard"
    tar -C "$SRC" --exclude=.git --exclude=.venv --exclude=build --exclude=dist --exclude='*.egg-info' \
        --exclude=__pycache__ --exclude=.pytest_cache --exclude=.benchmarks --exclude=bench/results \
        -cf - . | tar -C "$stage/milterguard" -xf -
    say "building the package (dpkg-buildpackage; pip fetches the filter's requirements)"
    if ! (cd "$stage/milterguard" && dpkg-buildpackage -us -uc -b >"$stage/build.log" 2>&1); then
        tail -n 40 "$stage/build.log" >&2
        die "the package did not build; the whole log was $stage/build.log"
    fi
    DEB="$(ls "$stage"/milterguard_*.deb)"
fi
[ -f "$DEB" ] || die "no package at $DEB"
DEB="$(cd "$(dirname "$DEB")" && pwd)/$(basename "$DEB")"

say "installing $(basename "$DEB")"
# --force-confold: a configuration file the administrator changed stays as it is;
# the package's new one is put beside it as .dpkg-dist.
apt-get install -y -q --allow-downgrades -o Dpkg::Options::=--force-confold "$DEB" >/dev/null

# Refuse to (re)start with a configuration or rules that do not load: the
# running filter, if any, keeps going.
if ! lint_out="$("$BIN" lint 2>&1)"; then
    printf '%s\n' "$lint_out" >&2
    die "the configuration or rules in $ETC do not load; fix them and run me again"
fi
printf '%s\n' "$lint_out" | sed 's/^/milterguard install: lint: /'

if [ -z "$SOCKET" ]; then
    SOCKET="$(/usr/lib/milterguard/bin/python -I -c \
        'from milterguard.config import load_config; print(load_config()["milter.socket"])')"
    [ -n "$SOCKET" ] || die "cannot read milter.socket from the configuration"
fi

# ------------------------------------------------------------------ start
serve_args=(serve)
[ -z "${MILTERGUARD_SOCKET:-}" ] || serve_args+=(--socket "$SOCKET")

pid_alive() {
    local pid="$1"
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
    # A zombie (or a reused pid of something else) does not count.
    local state
    state="$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null || true)"
    [ "$state" != Z ] || return 1
    grep -qa milterguard "/proc/$pid/cmdline" 2>/dev/null
}

socket_accepts() {
    /usr/lib/milterguard/bin/python -I - "$1" <<'EOF'
import re, socket, sys
spec = sys.argv[1]
m = re.fullmatch(r"(inet6?):(\d+)(?:@(.+))?", spec)
try:
    if m:
        family = socket.AF_INET6 if m.group(1) == "inet6" else socket.AF_INET
        host = (m.group(3) or ("::1" if family == socket.AF_INET6 else "127.0.0.1")).strip("[]")
        s = socket.socket(family, socket.SOCK_STREAM)
        s.settimeout(1)
        s.connect((host, int(m.group(2))))
    else:
        path = spec.split(":", 1)[1] if ":" in spec else spec
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(1)
        s.connect(path)
    s.close()
except OSError:
    sys.exit(1)
EOF
}

stop_background() {
    local pidfile="$RUN/milterguard.pid" pid deadline
    [ -f "$pidfile" ] || return 0
    pid="$(tr -dc 0-9 <"$pidfile")"
    if pid_alive "$pid"; then
        say "stopping the running filter (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        # Open sessions finish first (at most milter.drain_timeout, 30 s); an idle filter stops at once.
        deadline=$((SECONDS + 40))
        while pid_alive "$pid" && [ "$SECONDS" -lt "$deadline" ]; do
            sleep 0.2
        done
        if pid_alive "$pid"; then
            say "pid $pid did not stop in time; killing it"
            pkill -KILL -s "$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$pidfile"
}

if [ "$use_systemd" = 1 ]; then
    stop_background  # a copy started by an earlier run without systemd
    dropin=/etc/systemd/system/milterguard.service.d/install.conf
    if [ -n "${MILTERGUARD_SOCKET:-}" ]; then
        install -d -m 0755 "$(dirname "$dropin")"
        printf '# Written by debian/install.sh (MILTERGUARD_SOCKET).\n[Service]\nExecStart=\nExecStart=%s %s\n' \
            "$BIN" "${serve_args[*]}" >"$dropin"
    elif [ -e "$dropin" ]; then
        rm -f "$dropin"
    fi
    systemctl daemon-reload
    systemctl enable milterguard.service
    say "restarting milterguard.service"
    systemctl restart milterguard.service
    where="journalctl -u milterguard"
else
    stop_background
    install -d -m 0755 -o "$RUN_USER" -g "$RUN_USER" "$RUN"
    install -d -m 0750 -o "$RUN_USER" -g "$RUN_USER" "$LOG"
    touch "$LOG/milterguard.log"
    chown "$RUN_USER:$RUN_USER" "$LOG/milterguard.log"
    chmod 0640 "$LOG/milterguard.log"
    say "starting milterguard in the background as $RUN_USER (no systemd)"
    # setsid: its own session, no terminal; the daemon writes its pid file itself.
    setsid setpriv "--reuid=$RUN_USER" "--regid=$RUN_USER" --init-groups "$BIN" "${serve_args[@]}" \
        --pid-file "$RUN/milterguard.pid" </dev/null >>"$LOG/milterguard.log" 2>&1 &
    started=$!
    where="$LOG/milterguard.log"
fi

# ------------------------------------------------------------------ ready?
deadline=$((SECONDS + WAIT))
until socket_accepts "$SOCKET"; do
    if [ "$use_systemd" = 1 ]; then
        if systemctl is-failed --quiet milterguard.service; then
            systemctl status --no-pager milterguard.service >&2 || true
            die "milterguard.service failed to start; see: $where"
        fi
    elif ! kill -0 "$started" 2>/dev/null && ! pid_alive "$(tr -dc 0-9 <"$RUN/milterguard.pid" 2>/dev/null || true)"; then
        tail -n 30 "$LOG/milterguard.log" >&2 || true
        die "milterguard exited at start; see $where"
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
        [ "$use_systemd" = 1 ] || tail -n 30 "$LOG/milterguard.log" >&2 || true
        die "milterguard does not accept connections on $SOCKET after ${WAIT}s; see $where"
    fi
    sleep 0.2
done

case "$SOCKET" in
    inet:*@*) pf="inet:${SOCKET#*@}:$(echo "$SOCKET" | sed 's/^inet:\([0-9]*\)@.*/\1/')" ;;
    inet:*) pf="inet:localhost:${SOCKET#inet:}" ;;
    inet6:*@*) pf="inet:[${SOCKET#*@}]:$(echo "$SOCKET" | sed 's/^inet6:\([0-9]*\)@.*/\1/')" ;;
    unix:* | local:*) pf="unix:${SOCKET#*:}" ;;
    *) pf="$SOCKET" ;;
esac

cat <<EOF
milterguard $("$BIN" --version | awk '{print $2}') is running and listening on $SOCKET.
Logs: $where

Hook it into Postfix (/etc/postfix/main.cf), then run: postfix reload
    smtpd_milters = $pf
    non_smtpd_milters = \$smtpd_milters
    milter_default_action = tempfail
    milter_protocol = 6
Try it first without refusing mail: put "actions: {mode: tag-only}" in
$ETC/local.d/local.yaml and reload.  See docs/postfix.md and docs/sendmail.md.
EOF
