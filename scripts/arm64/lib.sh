# Shared helpers for scripts/arm64/*.sh: preflight checks, binfmt set-up and restore, and the
# cached arm64 Debian userland (rootfs + agent virtualenv). Source it; do not run it.
#
# Cache layout (outside the repository; EDGEFLEET_ARM64_CACHE, default
# ${XDG_CACHE_HOME:-/var/cache}/edgefleet-arm64):
#   rootfs-<key>/          Debian arm64 minbase + python3, key = hash of what debootstrap gets
#     opt/edgefleet-venv/  the agent's virtualenv; .deps-key says which dependency set it holds
#     opt/edgefleet-wheels/ the aarch64 wheels it was installed from (offline re-installs)
#   wheels-<depskey>/      the same wheels as downloaded on the host
#   lock                   flock: one build or test run at a time
# A rootfs is built as rootfs-<key>.partial and renamed when complete, so an interrupted
# build is never used; rootfs-* of other keys are deleted after a successful build.

# shellcheck shell=bash

ARM64_HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ARM64_REPO="$(cd "$ARM64_HERE/../.." && pwd)"
ARM64_SUITE="${EDGEFLEET_ARM64_SUITE:-bookworm}"
ARM64_PACKAGES="python3,python3-venv,python3-pip,ca-certificates"
ARM64_VENV=/opt/edgefleet-venv
ARM64_WHEELS=/opt/edgefleet-wheels
ARM64_EXTRAS="agent,agent-tflite"
# Python 3.11 (bookworm) on aarch64, glibc 2.36. ai-edge-litert ships manylinux_2_27 only.
ARM64_PIP_PLATFORMS=(
    --platform manylinux_2_36_aarch64 --platform manylinux_2_34_aarch64
    --platform manylinux_2_28_aarch64 --platform manylinux_2_27_aarch64
    --platform manylinux2014_aarch64
)
ARM64_PIP_TARGET=(--python-version 3.11 --implementation cp --abi cp311)
ARM64_CACHE="${EDGEFLEET_ARM64_CACHE:-${XDG_CACHE_HOME:-/var/cache}/edgefleet-arm64}"
ARM64_HOST_PY="${ARM64_HOST_PY:-$ARM64_REPO/.venv/bin/python}"

arm64_t0=$(date +%s)
arm64_log() { echo "arm64 [$(($(date +%s) - arm64_t0))s] $*" >&2; }

# arm64_skip REASON: say SKIPPED with the reason on stdout; exit 0, or 3 when the caller
# demands the arm64 tests (EDGEFLEET_REQUIRE_ARM64=1, e.g. a release check).
arm64_skip() {
    echo "SKIPPED: arm64 tests: $*"
    if [ "${EDGEFLEET_REQUIRE_ARM64:-0}" = "1" ]; then
        echo "error: EDGEFLEET_REQUIRE_ARM64=1, so a skipped arm64 run is a failure" >&2
        exit 3
    fi
    exit 0
}

arm64_die() {
    echo "error: $*" >&2
    exit 1
}

# --- preflight ------------------------------------------------------------------------

arm64_require_root() {
    [ "$(uname -s)" = Linux ] || arm64_skip "needs Linux (binfmt_misc, chroot); this is $(uname -s)"
    [ "$(id -u)" -eq 0 ] ||
        arm64_skip "needs root (debootstrap, chroot, mounts, binfmt registration); run 'sudo make test-arm64'"
    case "$(uname -m)" in
    x86_64 | aarch64) ;;
    *) arm64_skip "host architecture $(uname -m) is not supported (x86_64 or aarch64)" ;;
    esac
}

# Tools from Debian: qemu-user-static (the emulator, registered with the F flag so a chroot
# needs no copy of it), binfmt-support (update-binfmts), debootstrap.
arm64_ensure_tools() {
    local missing=()
    command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
    command -v update-binfmts >/dev/null 2>&1 || missing+=(binfmt-support)
    [ -e /usr/share/binfmts/qemu-aarch64 ] || [ "$(uname -m)" = aarch64 ] ||
        missing+=(qemu-user-static)
    command -v unshare >/dev/null 2>&1 || missing+=(util-linux)
    command -v flock >/dev/null 2>&1 || missing+=(util-linux)
    [ "${#missing[@]}" -eq 0 ] && return 0
    command -v apt-get >/dev/null 2>&1 ||
        arm64_skip "missing ${missing[*]} and no apt-get to install them"
    arm64_log "installing ${missing[*]} with apt-get"
    if ! { apt-get update -qq >&2 &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2; }; then
        arm64_skip "could not install ${missing[*]} with apt-get (see the output above)"
    fi
}

# What we changed in binfmt_misc, to undo on exit.
ARM64_BINFMT_MOUNTED=0
ARM64_BINFMT_ENABLED=0
ARM64_BINFMT_STATUS_SET=0

arm64_binfmt_entry() { echo /proc/sys/fs/binfmt_misc/qemu-aarch64; }

# Make the kernel run aarch64 ELF files through qemu; record what had to change.
arm64_binfmt_setup() {
    [ "$(uname -m)" = aarch64 ] && return 0 # native: nothing to emulate
    local dir=/proc/sys/fs/binfmt_misc
    if [ ! -e "$dir/status" ]; then
        if [ ! -d "$dir" ] && ! modprobe binfmt_misc 2>/dev/null; then
            arm64_skip "the kernel has no binfmt_misc support ($dir is missing)"
        fi
        mount -t binfmt_misc binfmt_misc "$dir" 2>/dev/null ||
            arm64_skip "cannot mount binfmt_misc on $dir (a container without the privilege?)"
        ARM64_BINFMT_MOUNTED=1
        arm64_log "mounted binfmt_misc (will unmount on exit)"
    fi
    if [ "$(cat "$dir/status")" != enabled ]; then
        echo 1 >"$dir/status" || arm64_skip "binfmt_misc is disabled and cannot be enabled"
        ARM64_BINFMT_STATUS_SET=1
    fi
    local entry
    entry="$(arm64_binfmt_entry)"
    if [ ! -e "$entry" ] || ! head -1 "$entry" | grep -qx enabled; then
        update-binfmts --enable qemu-aarch64 >&2 ||
            arm64_skip "update-binfmts --enable qemu-aarch64 failed: no aarch64 binfmt support"
        ARM64_BINFMT_ENABLED=1
        arm64_log "enabled binfmt qemu-aarch64 (will disable on exit)"
    fi
    grep -q '^flags:.*F' "$entry" ||
        arm64_skip "binfmt qemu-aarch64 is registered without the F (fix binary) flag, so a chroot cannot find qemu; re-register it with Debian's qemu-user-static"
}

# Undo arm64_binfmt_setup, newest change first. Safe to call twice.
arm64_binfmt_restore() {
    if [ "$ARM64_BINFMT_ENABLED" = 1 ]; then
        update-binfmts --disable qemu-aarch64 >&2 || echo "warning: could not disable qemu-aarch64" >&2
        ARM64_BINFMT_ENABLED=0
    fi
    if [ "$ARM64_BINFMT_STATUS_SET" = 1 ]; then
        echo 0 >/proc/sys/fs/binfmt_misc/status 2>/dev/null || true
        ARM64_BINFMT_STATUS_SET=0
    fi
    if [ "$ARM64_BINFMT_MOUNTED" = 1 ]; then
        umount /proc/sys/fs/binfmt_misc 2>/dev/null || umount -l /proc/sys/fs/binfmt_misc ||
            echo "warning: could not unmount binfmt_misc" >&2
        ARM64_BINFMT_MOUNTED=0
    fi
}

# The Debian mirror: EDGEFLEET_ARM64_MIRROR, else the first non-security Debian URI in the
# machine's apt sources, else deb.debian.org.
arm64_mirror() {
    if [ -n "${EDGEFLEET_ARM64_MIRROR:-}" ]; then
        echo "${EDGEFLEET_ARM64_MIRROR%/}"
        return
    fi
    local uri
    uri="$(
        {
            grep -hE '^\s*URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | sed -E 's/^\s*URIs:\s*//' | tr ' ' '\n'
            grep -hE '^\s*deb\s' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
                sed -E 's/^\s*deb\s+(\[[^]]*\]\s+)?//' | awk '{print $1}'
        } | grep -E '^https?://' | grep -E '/debian/?$' | grep -v security | head -1
    )"
    echo "${uri:-http://deb.debian.org/debian}" | sed -E 's#/$##'
}

# Fail fast (a skip, with the reason) when the mirror cannot be reached.
arm64_check_mirror() {
    local mirror="$1" url="$1/dists/$ARM64_SUITE/Release"
    if ! "$ARM64_HOST_PY" - "$url" <<'PY' >&2; then
import sys, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=20) as r:
        r.read(256)
except Exception as exc:
    print(f"{sys.argv[1]}: {exc}")
    sys.exit(1)
PY
        arm64_skip "the Debian mirror $mirror is not reachable (set EDGEFLEET_ARM64_MIRROR to one that is)"
    fi
}

# --- cache keys -------------------------------------------------------------------------

arm64_sha() { sha256sum | cut -c1-16; }

# What debootstrap is asked for, and how: changing any of it makes a new rootfs.
arm64_rootfs_key() {
    {
        echo "suite=$ARM64_SUITE packages=$ARM64_PACKAGES variant=minbase arch=arm64 v1"
        declare -f arm64_build_rootfs
    } | arm64_sha
}

# The agent's third-party dependency set (pyproject's base + extras) and how it is fetched.
arm64_deps_spec() {
    "$ARM64_HOST_PY" - "$ARM64_REPO/pyproject.toml" "$ARM64_EXTRAS" <<'PY'
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    project = tomllib.load(f)["project"]
deps = list(project["dependencies"])
for extra in sys.argv[2].split(","):
    deps += [d for d in project["optional-dependencies"][extra] if not d.startswith("edgefleet")]
print("\n".join(sorted(deps)))
PY
}

arm64_deps_key() {
    {
        arm64_rootfs_key
        arm64_deps_spec
        echo "${ARM64_PIP_PLATFORMS[*]} ${ARM64_PIP_TARGET[*]}"
        declare -f arm64_build_venv
    } | arm64_sha
}

# --- building ---------------------------------------------------------------------------

# Delete a directory tree under the cache, refusing if anything is mounted inside it (a bind
# mount of /dev in there would make rm -rf delete the host's device nodes).
arm64_safe_rm() {
    local path="$1"
    [ -e "$path" ] || return 0
    case "$path" in "$ARM64_CACHE"/*) ;; *) arm64_die "refusing to delete $path (outside $ARM64_CACHE)" ;; esac
    if awk '{print $5}' /proc/self/mountinfo | grep -q "^$path/"; then
        arm64_die "something is mounted under $path; unmount it (umount -R) before deleting"
    fi
    rm -rf --one-file-system "$path"
}

arm64_chroot() { "$ARM64_HERE/chroot-run.sh" "$@"; }

# debootstrap in two stages: download and unpack on the host, configure under emulation.
arm64_build_rootfs() {
    local dest="$1" mirror="$2" partial="$1.partial"
    arm64_safe_rm "$partial"
    arm64_log "debootstrap stage 1: $ARM64_SUITE arm64 minbase from $mirror"
    debootstrap --arch=arm64 --foreign --variant=minbase --include="$ARM64_PACKAGES" \
        "$ARM64_SUITE" "$partial" "$mirror" >&2 ||
        arm64_die "debootstrap (first stage) failed; see $partial/debootstrap/debootstrap.log"
    local machine
    machine="$(arm64_chroot "$partial" /bin/uname -m 2>&1)" || true
    [ "$machine" = aarch64 ] ||
        arm64_skip "an aarch64 binary does not run here through binfmt/qemu (uname -m said: $machine)"
    arm64_log "debootstrap stage 2 (under emulation; minutes)"
    arm64_chroot "$partial" /debootstrap/debootstrap --second-stage >&2 ||
        arm64_die "debootstrap --second-stage failed; see $partial/debootstrap/debootstrap.log"
    # The apt cache is not needed: nothing is installed with apt in there afterwards.
    rm -rf "$partial"/var/cache/apt/archives/*.deb
    echo "$ARM64_SUITE arm64 built $(date -u +%FT%TZ)" >"$partial/etc/edgefleet-arm64-rootfs"
    mv "$partial" "$dest"
}

# Download the aarch64 wheels on the host (the emulator would be slow at it) for the
# edgefleet wheel's extras, then install them offline into a fresh venv in the rootfs.
arm64_build_venv() {
    local rootfs="$1" wheel="$2" key="$3"
    local wheels="$ARM64_CACHE/wheels-$key"
    if [ ! -e "$wheels/.complete" ]; then
        arm64_safe_rm "$wheels"
        mkdir -p "$wheels"
        arm64_log "downloading aarch64 wheels for edgefleet[$ARM64_EXTRAS]"
        "$ARM64_HOST_PY" -m pip download --quiet --only-binary=:all: \
            "${ARM64_PIP_TARGET[@]}" "${ARM64_PIP_PLATFORMS[@]}" \
            -d "$wheels" "$wheel[$ARM64_EXTRAS]" >&2 ||
            arm64_die "pip download of the aarch64 wheels failed (is PyPI reachable? see above)"
        rm -f "$wheels"/edgefleet-*.whl
        touch "$wheels/.complete"
    fi
    arm64_safe_rm "$rootfs$ARM64_VENV"
    rm -rf "${rootfs:?}$ARM64_WHEELS"
    mkdir -p "$rootfs$ARM64_WHEELS"
    cp "$wheels"/*.whl "$rootfs$ARM64_WHEELS/"
    arm64_log "creating $ARM64_VENV and installing $(ls "$wheels" | wc -l) wheels (under emulation)"
    arm64_chroot "$rootfs" /usr/bin/python3 -m venv "$ARM64_VENV" >&2
    local names
    names="$(cd "$wheels" && ls ./*.whl | sed 's#^\./#'"$ARM64_WHEELS"'/#')"
    # shellcheck disable=SC2086 # one path per word
    arm64_chroot "$rootfs" "$ARM64_VENV/bin/pip" install --quiet --no-index \
        --disable-pip-version-check --no-compile $names >&2 ||
        arm64_die "installing the aarch64 wheels into $ARM64_VENV failed"
    echo "$key" >"$rootfs$ARM64_VENV/.deps-key"
}

# Install the edgefleet wheel just built (pure Python) with its extras, offline, resolving
# its dependencies against what the venv holds.
arm64_install_wheel() {
    local rootfs="$1" wheel="$2" name
    name="$(basename "$wheel")"
    rm -rf "${rootfs:?}$ARM64_WHEELS/current"
    mkdir -p "$rootfs$ARM64_WHEELS/current"
    cp "$wheel" "$rootfs$ARM64_WHEELS/current/"
    arm64_chroot "$rootfs" "$ARM64_VENV/bin/pip" uninstall --quiet --yes edgefleet >&2 2>/dev/null || true
    arm64_chroot "$rootfs" "$ARM64_VENV/bin/pip" install --quiet --no-index \
        --disable-pip-version-check --find-links "$ARM64_WHEELS" \
        "$ARM64_WHEELS/current/$name[$ARM64_EXTRAS]" >&2 ||
        arm64_die "installing $name[$ARM64_EXTRAS] into the arm64 venv failed"
}

# Make sure rootfs-<key> with a venv for the current dependency set exists; set ARM64_ROOTFS.
# (Not printed: arm64_skip must be able to exit the script, which a $(...) would swallow.)
ARM64_ROOTFS=""
arm64_ensure_userland() {
    local wheel="$1" key deps_key rootfs
    key="$(arm64_rootfs_key)"
    deps_key="$(arm64_deps_key)"
    rootfs="$ARM64_CACHE/rootfs-$key"
    if [ -e "$rootfs/etc/edgefleet-arm64-rootfs" ]; then
        arm64_log "reusing cached rootfs $rootfs"
    else
        local mirror t
        mirror="$(arm64_mirror)"
        arm64_check_mirror "$mirror"
        t=$(date +%s)
        arm64_build_rootfs "$rootfs" "$mirror"
        echo "rootfs_build_s=$(($(date +%s) - t))" >>"$ARM64_CACHE/timings"
        local old
        for old in "$ARM64_CACHE"/rootfs-*; do
            [ "$old" = "$rootfs" ] || arm64_safe_rm "$old"
        done
    fi
    if [ "$(cat "$rootfs$ARM64_VENV/.deps-key" 2>/dev/null)" = "$deps_key" ]; then
        arm64_log "reusing cached venv $ARM64_VENV (dependency set $deps_key)"
    else
        local t
        t=$(date +%s)
        arm64_build_venv "$rootfs" "$wheel" "$deps_key"
        echo "venv_build_s=$(($(date +%s) - t))" >>"$ARM64_CACHE/timings"
        local old
        for old in "$ARM64_CACHE"/wheels-*; do
            [ "$old" = "$ARM64_CACHE/wheels-$deps_key" ] || arm64_safe_rm "$old"
        done
    fi
    ARM64_ROOTFS="$rootfs"
}
