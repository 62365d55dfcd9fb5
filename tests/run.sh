#!/usr/bin/env bash
# Install what the tests need and run them: Debian packages (Postfix, libmilter,
# miltertest) and the Python package with its test extras.  Run as root on Debian 12.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for pkg in postfix libmilter-dev miltertest gcc redis-server redis-sentinel clamav-daemon nsd 7zip; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
if [ "${#need[@]}" -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    # Postfix from the package must not configure or start a system instance:
    # the tests run private instances on loopback ports.
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    # Nor may the packages start their system services (redis, clamd, freshclam, nsd):
    # the tests start their own instances on loopback ports.
    policy=/usr/sbin/policy-rc.d own_policy=
    [ -e "$policy" ] || { printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod 755 "$policy"; own_policy=1; }
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${need[@]}"
    [ -z "$own_policy" ] || rm -f "$policy"
fi

python3 -m pip install -q --disable-pip-version-check -e ".[test]"
exec python3 -m pytest "$@"
