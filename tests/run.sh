#!/usr/bin/env bash
# Install what the tests need and run them: Debian packages (Postfix, libmilter,
# miltertest, Redis, clamd, nsd, PostgreSQL, Dovecot, Chromium and its driver, zbar, Poppler) and the package with its test extras in a
# virtual environment of the checkout (.venv/), made with Debian's own Python.
# The system's Python is left alone (Debian 12 refuses pip outside a virtual
# environment: PEP 668).  Run as root on Debian 12.  Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

# The caller's Python environment must not leak into the tests.
unset PYTHONPATH PYTHONHOME PYTHONSTARTUP PYTHONUSERBASE

need=()
for pkg in python3 python3-venv python3-dev gcc postfix libmilter-dev miltertest \
        redis-server redis-sentinel clamav-daemon nsd 7zip postgresql dovecot-imapd dovecot-sieve libzbar0 poppler-utils \
        debhelper dh-virtualenv fakeroot build-essential lintian chromium chromium-driver; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
if [ "${#need[@]}" -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    # Postfix from the package must not configure or start a system instance:
    # the tests run private instances on loopback ports.
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    # Nor may the packages start their system services (redis, clamd, freshclam, nsd, postgresql, dovecot):
    # the tests start their own instances on loopback ports.
    policy=/usr/sbin/policy-rc.d own_policy=
    [ -e "$policy" ] || { printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod 755 "$policy"; own_policy=1; }
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${need[@]}"
    [ -z "$own_policy" ] || rm -f "$policy"
fi

venv="${MILTERGUARD_TEST_VENV:-$PWD/.venv}"
if [ ! -x "$venv/bin/python" ]; then
    /usr/bin/python3 -m venv "$venv"
    # Debian 12's pip (23.0) builds the sdists without wheel, the legacy way.
    "$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip wheel
fi
"$venv/bin/python" -m pip install -q --disable-pip-version-check -e ".[test]"
# The console scripts the tests run are the virtual environment's.
export PATH="$venv/bin:$PATH"
exec "$venv/bin/python" -m pytest "$@"
