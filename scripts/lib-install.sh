# Shared helpers for scripts/ensure-*.sh. Source it; do not run it.
# Installs Debian packages as root, or via passwordless sudo, or explains what to do by hand.

# as_root CMD...: run CMD as root (directly, or through passwordless sudo).
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    else
        sudo -n "$@"
    fi
}

# can_install_debian: true when apt-get exists and we are root or have passwordless sudo.
can_install_debian() {
    command -v apt-get >/dev/null 2>&1 || return 1
    [ "$(id -u)" -eq 0 ] && return 0
    command -v sudo >/dev/null 2>&1 && sudo -n true >/dev/null 2>&1
}

# apt_install PKG...: apt-get update, then a non-interactive install.
apt_install() {
    echo "Installing with apt-get: $*" >&2
    as_root apt-get update >&2
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y "$@" >&2
}

# stop_service NAME: stop and disable a system service a package install may have started.
# We always run private instances on free ports, so a system-wide one is only in the way.
# Fails quietly where there is no systemd (containers) or no such service.
stop_service() {
    local name="$1"
    if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
        as_root systemctl disable --now "$name" >/dev/null 2>&1 || true
    elif [ -x "/etc/init.d/$name" ]; then
        as_root "/etc/init.d/$name" stop >/dev/null 2>&1 || true
    fi
}
