#!/usr/bin/env bash
# Install milterguard from this source checkout and start it with its default
# configuration.  Run as root on Debian 12; running it again upgrades in place
# and restarts the filter, and never touches a file in /etc/milterguard that
# already exists.
#
# What goes where (docs/install.md has the details):
#   /usr/lib/milterguard             a Python virtual environment holding the package
#   /usr/sbin/milterguard        a link to its console script
#   /usr/share/milterguard       the shipped rules/, rules/maps/ and conf/ (replaced on upgrade)
#   /etc/milterguard             milterguard.yaml (optional), local.d/, override.d/, rules.d/, maps/
#   /etc/systemd/system/milterguard.service
#   without systemd: /run/milterguard/milterguard.pid and /var/log/milterguard/milterguard.log
#
# Environment (all optional):
#   MILTERGUARD_PREFIX     virtual environment         (default /usr/lib/milterguard)
#   MILTERGUARD_ETC        configuration directory     (default /etc/milterguard)
#   MILTERGUARD_SHARE      shipped rules and defaults  (default /usr/share/milterguard)
#   MILTERGUARD_SBIN       where the command is linked (default /usr/sbin; empty: no link)
#   MILTERGUARD_RUN        pid file directory          (default /run/milterguard)
#   MILTERGUARD_LOG        log directory without systemd (default /var/log/milterguard)
#   MILTERGUARD_SOCKET     milter socket; default: milter.socket of the configuration
#                          (inet:11339@127.0.0.1); when set, it is given to `serve --socket`
#   MILTERGUARD_USER       user the filter runs as     (default milterguard; created when missing)
#   MILTERGUARD_PYTHON     interpreter for the venv    (default /usr/bin/python3)
#   MILTERGUARD_NO_SYSTEMD=1  leave systemd alone and run the filter in the background
#   MILTERGUARD_SKIP_APT=1    do not install Debian packages
#   MILTERGUARD_WAIT       seconds to wait for the socket (default 20)
set -euo pipefail

# The caller's Python environment must not leak into the filter.
unset PYTHONPATH PYTHONHOME PYTHONSTARTUP PYTHONUSERBASE

SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PREFIX="${MILTERGUARD_PREFIX:-/usr/lib/milterguard}"
ETC="${MILTERGUARD_ETC:-/etc/milterguard}"
SHARE="${MILTERGUARD_SHARE:-/usr/share/milterguard}"
SBIN="${MILTERGUARD_SBIN-/usr/sbin}"
RUN="${MILTERGUARD_RUN:-/run/milterguard}"
LOG="${MILTERGUARD_LOG:-/var/log/milterguard}"
SOCKET="${MILTERGUARD_SOCKET:-}"
RUN_USER="${MILTERGUARD_USER:-milterguard}"
WAIT="${MILTERGUARD_WAIT:-20}"
if [ -n "${MILTERGUARD_PYTHON:-}" ]; then
    PYTHON="$MILTERGUARD_PYTHON"
elif [ -x /usr/bin/python3 ]; then
    PYTHON=/usr/bin/python3
else
    PYTHON=python3
fi
UNIT_DIR=/etc/systemd/system
UNIT=milterguard.service

say() { printf 'milterguard install: %s\n' "$*"; }
die() { printf 'milterguard install: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run me as root"
for dir in "$PREFIX" "$ETC" "$SHARE" "$RUN" "$LOG"; do
    case "$dir" in
        /?*) ;;
        *) die "paths must be absolute and not /: got '$dir'" ;;
    esac
done

use_systemd=0
if [ "${MILTERGUARD_NO_SYSTEMD:-0}" != 1 ] && [ -d /run/systemd/system ]; then
    use_systemd=1
fi

# ------------------------------------------------------------------ packages
if [ "${MILTERGUARD_SKIP_APT:-0}" != 1 ]; then
    need=()
    for pkg in python3 python3-venv python3-dev gcc libmilter-dev; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
    done
    if [ "${#need[@]}" -gt 0 ]; then
        say "installing ${need[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q
        apt-get install -y -q --no-install-recommends "${need[@]}"
    fi
fi

# ------------------------------------------------------------------ user
if [ "$RUN_USER" = root ]; then
    RUN_GROUP=root
else
    RUN_GROUP="$RUN_USER"
    if ! getent group "$RUN_GROUP" >/dev/null; then
        groupadd --system "$RUN_GROUP"
    fi
    if ! getent passwd "$RUN_USER" >/dev/null; then
        useradd --system --gid "$RUN_GROUP" --home-dir /nonexistent --no-create-home \
            --shell /usr/sbin/nologin --comment "milterguard mail filter" "$RUN_USER"
    fi
    RUN_GROUP="$(id -gn "$RUN_USER")"
fi

# ------------------------------------------------------------------ the package
# Build from a clean copy: an in-tree build leaves build/ behind, and files in
# it that the checkout no longer has would end up in the installed package.
stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
tar -C "$SRC" --exclude=.git --exclude=build --exclude=dist --exclude='*.egg-info' \
    --exclude=__pycache__ --exclude=.pytest_cache --exclude=.benchmarks --exclude=tests \
    -cf - . | tar -C "$stage" -xf -

if [ ! -x "$PREFIX/bin/python" ]; then
    say "creating the virtual environment $PREFIX"
    "$PYTHON" -m venv "$PREFIX"
fi
# pip's data_files put rules/ and conf/ under $PREFIX/share/milterguard.  The
# package looks there first (sys.prefix/share/milterguard), so that directory is
# made a link to $SHARE below; the link goes while pip works, so that pip neither
# follows it nor removes the shipped files through it.
venv_share="$PREFIX/share/milterguard"
if [ -L "$venv_share" ]; then
    rm -f "$venv_share"
fi
say "installing the package into $PREFIX"
"$PREFIX/bin/pip" install --quiet --disable-pip-version-check "$stage"
rm -rf "$venv_share"

# ------------------------------------------------------------------ shipped rules and defaults
say "installing the shipped rules and defaults into $SHARE"
install -d -m 0755 "$SHARE"
rm -rf "$SHARE/rules" "$SHARE/conf"
install -d -m 0755 "$SHARE/rules" "$SHARE/rules/maps" "$SHARE/conf"
install -m 0644 "$SRC"/rules/*.yaml "$SHARE/rules/"
install -m 0644 "$SRC"/rules/maps/*.map "$SHARE/rules/maps/"
install -m 0644 "$SRC"/conf/*.yaml "$SHARE/conf/"
install -d -m 0755 "$PREFIX/share"
ln -sfn "$SHARE" "$venv_share"

BIN="$PREFIX/bin/milterguard"
[ -x "$BIN" ] || die "$BIN is missing after the install"
if [ -n "$SBIN" ]; then
    install -d -m 0755 "$SBIN"
    ln -sfn "$BIN" "$SBIN/milterguard"
fi

# ------------------------------------------------------------------ configuration
[ -d "$ETC" ] || install -d -m 0750 -o root -g "$RUN_GROUP" "$ETC"
for sub in local.d override.d rules.d maps; do
    [ -d "$ETC/$sub" ] || install -d -m 0750 -o root -g "$RUN_GROUP" "$ETC/$sub"
done
example="$ETC/local.d/local.yaml"
if [ ! -e "$example" ]; then
    cat >"$example" <<'EOF'
# Local settings, deep-merged over the shipped defaults
# (/usr/share/milterguard/conf/milterguard.yaml, replaced on upgrade).
# Every file in this directory ending in .yaml is read, in name order.
# `milterguard config dump --origin` shows each value and the file that set it;
# `milterguard config defaults` prints every setting with its documentation.
# Reload after a change: systemctl reload milterguard (SIGHUP).
#
# Where the milter listens (Postfix: smtpd_milters = inet:127.0.0.1:11339):
# milter:
#   socket: inet:11339@127.0.0.1
#
# Try the filter first without refusing or holding mail:
# actions:
#   mode: tag-only        # or shadow: log the verdict only
#
# Scores; review and tag keep their defaults when left out:
# thresholds: {reject: 15, review: 6, tag: 4}
#
# A symbol's weight, or turn it off:
# symbols:
#   SUBJ_ALL_CAPS: {weight: 0.5}
#   FROM_NUMERIC_LOCALPART: {enabled: false}
#
# Per recipient domain:
# domains:
#   example.org: {thresholds: {reject: 10}, mode: enforce}
EOF
    chmod 0640 "$example"
    chown root:"$RUN_GROUP" "$example"
    say "wrote the example $example"
fi

# Refuse to (re)start with a configuration or rules that do not load: the
# running filter, if any, keeps going.
if ! lint_out="$(MILTERGUARD_ETC_DIR="$ETC" "$BIN" lint 2>&1)"; then
    printf '%s\n' "$lint_out" >&2
    die "the configuration or rules in $ETC do not load; fix them and run me again"
fi
printf '%s\n' "$lint_out" | sed 's/^/milterguard install: lint: /'

if [ -z "$SOCKET" ]; then
    # -I: leave the current directory (maybe this checkout) out of sys.path.
    SOCKET="$(MILTERGUARD_ETC_DIR="$ETC" "$PREFIX/bin/python" -I -c \
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
    "$PREFIX/bin/python" -I - "$1" <<'EOF'
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
        # Workers finish their open sessions first (milter.drain_timeout, 30 s).
        deadline=$((SECONDS + 40))
        while pid_alive "$pid" && [ "$SECONDS" -lt "$deadline" ]; do
            # libmilter looks at its stop flag when a connection wakes it up.
            socket_accepts "$SOCKET" || true
            sleep 0.5
        done
        if pid_alive "$pid"; then
            say "pid $pid did not stop in time; killing it"
            pkill -KILL -s "$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$pidfile"
}

if [ "${MILTERGUARD_NO_SYSTEMD:-0}" != 1 ]; then
    # The unit is installed even where systemd does not run (a container), so
    # that a later boot with systemd finds it.
    install -d -m 0755 "$UNIT_DIR"
    install -m 0644 "$SRC/debian/milterguard.service" "$UNIT_DIR/$UNIT"
    dropin="$UNIT_DIR/$UNIT.d/install.conf"
    if [ "$BIN" != /usr/lib/milterguard/bin/milterguard ] || [ "$ETC" != /etc/milterguard ] \
        || [ "$RUN_USER" != milterguard ] || [ -n "${MILTERGUARD_SOCKET:-}" ]; then
        install -d -m 0755 "$UNIT_DIR/$UNIT.d"
        {
            echo "# Written by debian/install.sh from its environment; running it again rewrites this file."
            echo "[Service]"
            echo "User=$RUN_USER"
            echo "Group=$RUN_GROUP"
            echo "Environment=MILTERGUARD_ETC_DIR=$ETC"
            echo "ExecStart="
            echo "ExecStart=$BIN ${serve_args[*]}"
        } >"$dropin"
    elif [ -e "$dropin" ]; then
        rm -f "$dropin"
        rmdir "$UNIT_DIR/$UNIT.d" 2>/dev/null || true
    fi
fi

if [ "$use_systemd" = 1 ]; then
    stop_background  # a copy started by an earlier run without systemd
    systemctl daemon-reload
    systemctl enable milterguard.service
    say "restarting milterguard.service"
    systemctl restart milterguard.service
    where="journalctl -u milterguard"
else
    stop_background
    install -d -m 0755 -o "$RUN_USER" -g "$RUN_GROUP" "$RUN"
    install -d -m 0750 -o "$RUN_USER" -g "$RUN_GROUP" "$LOG"
    touch "$LOG/milterguard.log"
    chown "$RUN_USER:$RUN_GROUP" "$LOG/milterguard.log"
    chmod 0640 "$LOG/milterguard.log"
    if [ "$RUN_USER" = root ]; then
        as_user=()
    else
        as_user=(setpriv "--reuid=$RUN_USER" "--regid=$RUN_GROUP" --init-groups)
    fi
    say "starting milterguard in the background as $RUN_USER"
    # setsid: its own session, no terminal; the daemon writes its pid file itself.
    MILTERGUARD_ETC_DIR="$ETC" setsid "${as_user[@]}" "$BIN" "${serve_args[@]}" \
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
