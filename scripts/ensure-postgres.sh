#!/usr/bin/env bash
# Make sure the PostgreSQL server binaries (initdb, pg_ctl, postgres) are available, and print
# their directory on stdout. Starts nothing: tests create and start their own cluster.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=scripts/lib-install.sh
. "$here/lib-install.sh"

# find_bin_dir: the newest Debian PostgreSQL bin directory that holds initdb, if any.
find_bin_dir() {
    local dir
    dir="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)"
    if [ -n "$dir" ] && [ -x "$dir/initdb" ]; then
        echo "$dir"
        return 0
    fi
    return 1
}

if bin_dir="$(find_bin_dir)"; then
    echo "$bin_dir"
    exit 0
fi

if can_install_debian; then
    apt_install postgresql
    # Debian's package creates and starts a "main" cluster; ours run on their own.
    stop_service postgresql
    if bin_dir="$(find_bin_dir)"; then
        echo "$bin_dir"
        exit 0
    fi
    echo "error: installed postgresql but found no /usr/lib/postgresql/*/bin/initdb." >&2
    exit 1
fi

cat >&2 <<'MSG'
error: the PostgreSQL server is not installed, and this script cannot install it
(it needs apt-get and root or passwordless sudo). Install it by hand, then re-run:

    Debian/Ubuntu:  sudo apt-get install postgresql
    macOS:          brew install postgresql

No system-wide server needs to run: tests start their own cluster.
MSG
exit 1
