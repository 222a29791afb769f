#!/usr/bin/env bash
# Run one command inside the arm64 userland ROOTFS (qemu-user through binfmt_misc):
#
#     scripts/arm64/chroot-run.sh ROOTFS CMD [ARG...]
#
# The mounts it needs (/proc with an aarch64 /proc/cpuinfo over it, /sys, /dev, /dev/shm)
# are made inside a private mount namespace of this one command (unshare --mount), so the
# host never sees them and they vanish with the process however it ends (exit, crash,
# SIGKILL): nothing is ever left mounted under ROOTFS, and ROOTFS can always be deleted.
#
# The command replaces this script (exec), so signals sent to this pid reach it directly.
# Environment: EDGEFLEET_ARM64_QEMU_CPU (default cortex-a76, a Raspberry Pi 5's core) picks
# the CPU qemu emulates, and so which kernels (NEON, dot product, ...) the runtimes choose;
# EDGEFLEET_ARM64_CPUINFO (default: this folder's Pi 5 file) is what /proc/cpuinfo shows.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

if [ "$#" -lt 2 ]; then
    echo "usage: $0 ROOTFS CMD [ARG...]" >&2
    exit 2
fi
rootfs="$(cd "$1" && pwd)"
shift

if [ "${_EDGEFLEET_ARM64_IN_NS:-}" != "$rootfs" ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "error: $0 needs root (chroot and mounts)" >&2
        exit 2
    fi
    # A new mount namespace whose mounts do not propagate back to the host's.
    _EDGEFLEET_ARM64_IN_NS="$rootfs" exec unshare --mount --propagation private -- \
        "$here/chroot-run.sh" "$rootfs" "$@"
fi

cpuinfo="${EDGEFLEET_ARM64_CPUINFO:-$here/cpuinfo-raspberry-pi-5}"
# Debian's qemu 7.2 shows the guest the host's x86 /proc/cpuinfo; onnxruntime's cpuinfo
# library parses it as ARM and crashes (SIGSEGV at import). A real Pi 5's file fixes that.
mount -t proc proc "$rootfs/proc"
mount --bind "$cpuinfo" "$rootfs/proc/cpuinfo"
mount -t sysfs sysfs "$rootfs/sys" 2>/dev/null || mount --bind /sys "$rootfs/sys"
# /dev without its submounts: device nodes only; a private tmpfs for POSIX shared memory.
mount --bind /dev "$rootfs/dev"
mkdir -p "$rootfs/dev/shm" 2>/dev/null || true
mount -t tmpfs -o mode=1777,size=256m tmpfs "$rootfs/dev/shm"

unset _EDGEFLEET_ARM64_IN_NS
export QEMU_CPU="${EDGEFLEET_ARM64_QEMU_CPU:-cortex-a76}"
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root TMPDIR=/tmp LANG=C.UTF-8 LC_ALL=C.UTF-8
# The host's virtualenv variables mean nothing in there.
unset VIRTUAL_ENV PYTHONPATH PYTHONHOME
exec chroot "$rootfs" "$@"
