#!/usr/bin/env bash
# `make test-arm64`: the agent on a real arm64 Debian userland (a Raspberry Pi OS / JetPack
# stand-in) under qemu-user emulation. See docs/arm64.md.
#
#     scripts/arm64/test.sh [--smoke] [PYTEST_ARG...]
#
# 1. preflight: root, tools (installed with apt-get when missing), binfmt for aarch64
# 2. the arm64 rootfs + agent venv, from the cache or built from scratch (~10 min)
# 3. the edgefleet wheel built from this tree, installed with [agent,agent-tflite] in there
# 4. pytest tests/arm64 (host: Mosquitto, fleet, compiler; arm64: agents, runtimes)
#
# --smoke runs the reduced check (install, self-test, one telemetry window) instead of all.
# A missing prerequisite prints "SKIPPED: arm64 tests: <reason>" and exits 0, or 3 when
# EDGEFLEET_REQUIRE_ARM64=1. binfmt_misc is left as it was found.
set -euo pipefail

# shellcheck source=scripts/arm64/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

smoke=0
pytest_args=()
for arg in "$@"; do
    case "$arg" in
    --smoke) smoke=1 ;;
    *) pytest_args+=("$arg") ;;
    esac
done

arm64_require_root
[ -x "$ARM64_HOST_PY" ] || arm64_die "$ARM64_HOST_PY is missing; run 'make venv' first"
arm64_ensure_tools
mkdir -p "$ARM64_CACHE"

tmp="$(mktemp -d /tmp/edgefleet-arm64.XXXXXX)"
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    arm64_binfmt_restore
    rm -rf "$tmp"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# One run at a time per cache: a second waits rather than rebuilding under the first.
exec 9>"$ARM64_CACHE/lock"
if ! flock -n 9; then
    arm64_log "another arm64 run holds $ARM64_CACHE/lock; waiting"
    flock -w 3600 9 || arm64_die "waited an hour for $ARM64_CACHE/lock"
fi

arm64_binfmt_setup

t=$(date +%s)
arm64_log "building the edgefleet wheel from $ARM64_REPO"
if ! "$ARM64_HOST_PY" -m pip wheel --quiet --no-deps --no-build-isolation \
    --disable-pip-version-check "$ARM64_REPO" -w "$tmp/dist" >"$tmp/wheel.log" 2>&1; then
    cat "$tmp/wheel.log" >&2
    arm64_die "building the edgefleet wheel failed"
fi
wheel="$(ls "$tmp"/dist/edgefleet-*.whl)"
wheel_s=$(($(date +%s) - t))

t=$(date +%s)
arm64_ensure_userland "$wheel"
rootfs="$ARM64_ROOTFS"
userland_s=$(($(date +%s) - t))

t=$(date +%s)
arm64_log "installing $(basename "$wheel")[$ARM64_EXTRAS] into $ARM64_VENV (arm64)"
arm64_install_wheel "$rootfs" "$wheel"
arm64_chroot "$rootfs" "$ARM64_VENV/bin/python" -c '
import platform, numpy, onnxruntime, ai_edge_litert, agent, protocol
print("arm64 userland:", platform.machine(), "python", platform.python_version(),
      "numpy", numpy.__version__, "onnxruntime", onnxruntime.__version__,
      "ai-edge-litert", getattr(ai_edge_litert, "__version__", "?"))
' >&2 || arm64_die "the arm64 venv cannot import the agent's runtimes"
install_s=$(($(date +%s) - t))

t=$(date +%s)
# The full run's update-and-rollback test covers everything the smoke test does.
selection=(-k "not smoke")
if [ "$smoke" = 1 ]; then
    selection=(-k smoke)
fi
status=0
EDGEFLEET_ARM64_ROOTFS="$rootfs" EDGEFLEET_ARM64_VENV="$ARM64_VENV" \
    EDGEFLEET_ARM64_REPORT="${EDGEFLEET_ARM64_REPORT:-$ARM64_REPO/test-artifacts/arm64}" \
    "$ARM64_HOST_PY" -m pytest "$ARM64_REPO/tests/arm64" -m arm64 -p no:cacheprovider \
    "${selection[@]}" "${pytest_args[@]}" || status=$?
test_s=$(($(date +%s) - t))

arm64_log "timings: wheel ${wheel_s}s, userland ${userland_s}s (build or reuse), install ${install_s}s, tests ${test_s}s"
if [ "$status" -eq 5 ]; then
    echo "error: pytest selected no arm64 tests" >&2
fi
exit "$status"
