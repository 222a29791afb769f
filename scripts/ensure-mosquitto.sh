#!/usr/bin/env bash
# Make sure a Mosquitto broker binary is available. Tests and the demo start their own
# private broker on a free loopback port; this script never leaves one running.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=scripts/lib-install.sh
. "$here/lib-install.sh"

if command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; then
    exit 0
fi

if can_install_debian; then
    apt_install mosquitto mosquitto-clients
    stop_service mosquitto
    if command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; then
        echo "mosquitto installed." >&2
        exit 0
    fi
    echo "error: installed mosquitto but cannot find its binary (PATH or /usr/sbin)." >&2
    exit 1
fi

cat >&2 <<'MSG'
error: the Mosquitto MQTT broker is not installed, and this script cannot install it
(it needs apt-get and root or passwordless sudo). Install it by hand, then re-run:

    Debian/Ubuntu:  sudo apt-get install mosquitto mosquitto-clients
    macOS:          brew install mosquitto

No system-wide broker needs to run: tests start their own on a free port.
MSG
exit 1
