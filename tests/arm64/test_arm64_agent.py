"""The agent on a Raspberry Pi / Jetson userland: arm64 Debian under qemu-user emulation.

The fleet, Mosquitto and the compiler run on the host; the agent and its runtimes (ONNX
Runtime, LiteRT) are the aarch64 builds, installed from the edgefleet wheel into an arm64
Debian bookworm rootfs and run in a chroot through binfmt_misc. Prepared (and these tests
selected) by `make test-arm64`; without it, every test here is skipped.

- smoke: a bundle arrives over MQTT, passes its golden self-test on ARM kernels, serves the
  synthetic workload, and telemetry comes back (the reduced check CI runs).
- update and rollback: v2 is installed and committed, then an operator's rollback brings v1
  back.
- cross-architecture agreement: the held-out set through the arm64 and the x86 runtime;
  the golden tolerance passes honest ARM rounding and fails a wrong model.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.selftest import compare_golden
from edgefleet.keys_cli import init_keys
from fleet.client import FleetClient, FleetClientError
from protocol.bundle import BundleReader
from protocol.manifest import BundleManifest
from protocol.trust import TrustRoot
from tests.arm64.userland import Userland, userland_from_env
from tests.broker import Broker
from tests.procs import ManagedProcess, ProcessGroup, free_port

USERLAND = userland_from_env()

pytestmark = [
    pytest.mark.arm64,
    pytest.mark.integration,
    pytest.mark.skipif(
        USERLAND is None,
        reason="needs the arm64 userland: run `make test-arm64` as root "
        "(it sets EDGEFLEET_ARM64_ROOTFS)",
    ),
]

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "models" / "digits"
RUN_MODEL = ROOT / "scripts" / "arm64" / "run_model.py"
EDGEFLEET = [sys.executable, "-m", "edgefleet.cli"]
#: Raspberry Pi 5 runs the TFLite int8 bundle on LiteRT; the Jetson's QDQ ONNX runs on ONNX
#: Runtime's CPU provider here (no GPU in the emulator), as on a Jetson without TensorRT.
PROFILES = ["raspberry-pi-5", "jetson-orin-nano"]
#: what the agent's self-test event names as the backend that ran the model
BACKEND = {"raspberry-pi-5": "litert", "jetson-orin-nano": "onnxruntime[CPUExecutionProvider]"}
#: Emulation makes everything on the device side 15-350x slower: wait long, assert no speed.
SLOW_S = 600.0
#: The agent's health window reverts an install whose p95 latency exceeds the profile's
#: budget. Under qemu that judges the emulator, not the model, so the agents here run with
#: a copy of the profile (same name, runtime, precision) whose budget is this much larger.
EMULATION_LATENCY_FACTOR = 100
_BAD_STATES = {"reverted", "failed", "rejected"}


# --- host side: keys, bundles --------------------------------------------------------------


@pytest.fixture(scope="session")
def userland() -> Userland:
    """The prepared userland; checked once to really be aarch64."""
    assert USERLAND is not None
    out = USERLAND.run("/bin/uname", "-m", timeout_s=120)
    assert out.stdout.strip() == "aarch64", out.stdout + out.stderr
    return USERLAND


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root key, a release key and a trust root."""
    out = tmp_path_factory.mktemp("keys")
    init_keys(out)
    return out


@pytest.fixture(scope="session")
def wrong_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits model with every weight tensor perturbed: a plausible but wrong model."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(DIGITS / "model.onnx"))
    rng = np.random.default_rng(7)
    for init in model.graph.initializer:
        w = numpy_helper.to_array(init)
        if w.dtype == np.float32 and w.size > 1:
            noisy = w + rng.normal(0.0, 0.5 * float(w.std()), w.shape).astype(np.float32)
            init.CopyFrom(numpy_helper.from_array(noisy, init.name))
    path = tmp_path_factory.mktemp("wrong") / "model.onnx"
    onnx.save(model, str(path))
    return path


class Bundles:
    """Compiles each (profile, version) once per session; v2 is the wrong model."""

    def __init__(self, out: Path, keys: Path, wrong_model: Path) -> None:
        self._out, self._keys, self._wrong = out, keys, wrong_model
        self._made: dict[tuple[str, int], tuple[Path, str] | str] = {}

    def get(self, profile: str, version: int) -> tuple[Path, str]:
        """(bundle path, sha256); skips the test when the profile's compiler is missing."""
        key = (profile, version)
        if key not in self._made:
            self._made[key] = self._compile(profile, version)
        made = self._made[key]
        if isinstance(made, str):
            pytest.skip(made)
        return made

    def _compile(self, profile: str, version: int) -> tuple[Path, str] | str:
        model = DIGITS / "model.onnx" if version == 1 else self._wrong
        out = subprocess.run(
            [
                *EDGEFLEET, "compile", str(model),
                "--profile", profile,
                "--calibration", str(DIGITS / "calibration.npz"),
                "--heldout", str(DIGITS / "heldout.npz"),
                "--key", str(self._keys / "release.key"),
                "--out", str(self._out / f"v{version}"),
                "--model-name", "digits", "--model-version", str(version),
                "--quiet",
            ],
            capture_output=True, text=True, timeout=SLOW_S, check=False,
        )  # fmt: skip
        if out.returncode != 0 and "not available yet" in out.stderr:
            # Only the "this converter does not exist yet" refusal skips; any other failure
            # to compile fails the test.
            return f"{profile}: the compiler cannot make this bundle yet: {out.stderr.strip()}"
        assert out.returncode == 0, out.stderr + out.stdout
        path, sha = out.stdout.strip().splitlines()[-1].split()
        return Path(path), sha


@pytest.fixture(scope="session")
def bundles(tmp_path_factory: pytest.TempPathFactory, keys: Path, wrong_model: Path) -> Bundles:
    """Bundles made on demand by the real `edgefleet compile`."""
    return Bundles(tmp_path_factory.mktemp("bundles"), keys, wrong_model)


# --- fleet on the host, agent in the userland ----------------------------------------------


def _wait(predicate: Any, what: str, timeout_s: float, procs: ProcessGroup) -> Any:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        for p in procs.processes:
            assert p.alive, f"{p.name} died while waiting for {what}:\n{p.tail()}"
        time.sleep(0.5)
    pytest.fail(
        f"timed out after {timeout_s}s waiting for {what}; last: {last}\n{procs.describe()}"
    )


def _start_fleet(procs: ProcessGroup, tmp_path: Path, keys: Path, broker: Broker) -> FleetClient:
    """A fleet on the host, and a client with an admin token (made once the db exists)."""
    db_url = f"sqlite:///{tmp_path / 'fleet.db'}"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    fleet = procs.start(
        "fleet",
        [
            *EDGEFLEET, "fleet", "serve",
            "--trust-root", str(keys / "trust-root.json"),
            "--db", db_url,
            "--mqtt-host", broker.host, "--mqtt-port", str(broker.port),
            "--bundle-dir", str(tmp_path / "fleet-bundles"),
            "--host", "127.0.0.1", "--port", str(port),
        ],
    )  # fmt: skip
    procs.wait_for_http(f"{url}/healthz", timeout_s=60, process=fleet)
    admin = subprocess.run(
        [*EDGEFLEET, "fleet", "token", "create", "--role", "admin", "--name", "arm64-admin",
         "--db", db_url],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout.strip().splitlines()[-1]  # fmt: skip
    client = FleetClient(url, timeout_s=30, token=admin)

    def mqtt_connected() -> bool:
        try:
            return client._call("GET", "/healthz").get("mqtt") == "connected"
        except FleetClientError:
            return False

    _wait(mqtt_connected, "the fleet's MQTT connection", 60, procs)
    return client


def _emulated_profile(profile: str, dest: Path) -> Path:
    """The profile's TOML with the latency budget scaled for emulation (see the factor)."""
    from hardware_profiles import load_profile

    budget = load_profile(profile).limits.latency_budget_ms
    text, count = re.subn(
        r"(?m)^latency_budget_ms\s*=\s*[0-9_.]+",
        f"latency_budget_ms = {budget * EMULATION_LATENCY_FACTOR}",
        (ROOT / "hardware_profiles" / f"{profile}.toml").read_text(),
    )
    assert count == 1, f"no latency_budget_ms line in {profile}.toml"
    dest.write_text(text)
    assert load_profile(str(dest)).name == profile
    return dest


def _start_agent(
    procs: ProcessGroup,
    userland: Userland,
    work: Path,
    *,
    device: str,
    profile: str,
    keys: Path,
    broker: Broker,
) -> ManagedProcess:
    shutil.copy(keys / "trust-root.json", work / "trust-root.json")
    shutil.copy(DIGITS / "heldout.npz", work / "heldout.npz")
    profile_toml = _emulated_profile(profile, work / f"{profile}.toml")
    return procs.start(
        device,
        userland.edgefleet(
            "agent", "run",
            "--state-dir", userland.inside(work / "state"),
            "--device-id", device,
            "--profile", userland.inside(profile_toml),
            "--trust-root", userland.inside(work / "trust-root.json"),
            "--mqtt-host", broker.host, "--mqtt-port", str(broker.port),
            "--telemetry-window-s", "2", "--heartbeat-s", "2",
            "--health-timeout-s", "120",
            "--workload", userland.inside(work / "heldout.npz"), "--rate", "5",
        ),
    )  # fmt: skip


def _is_emulated(process: ManagedProcess) -> bool:
    """True when the process runs aarch64 code: through qemu here, natively on an ARM host."""
    if os.uname().machine == "aarch64":
        return True
    try:
        exe = os.readlink(f"/proc/{process.pid}/exe")
    except OSError:
        return False
    return "qemu" in exe or "aarch64" in exe


def _events(client: FleetClient, device: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = client._call("GET", f"/api/v1/devices/{device}")["events"]
    return events


def _row(client: FleetClient, device: str) -> dict[str, Any]:
    return next((d for d in client.devices() if d["id"] == device), {})


def _serving(client: FleetClient, device: str, sha: str, version: int, *, after_id: int = 0) -> Any:
    """The device row once it reports ``sha`` and telemetry with inferences, else None.

    Fails at once when the install reported reverted, failed or rejected after ``after_id``.
    """
    bad = [
        e
        for e in _events(client, device)
        if e["id"] > after_id and e["state"] in _BAD_STATES and e.get("bundle_sha256") == sha
    ]
    if bad:
        pytest.fail(f"the install of {sha[:12]} on {device} went wrong: {bad}")
    row = _row(client, device)
    ok = (
        row.get("reported_bundle_sha256") == sha
        and row.get("model_version") == version
        and (row.get("inference_count") or 0) > 0
        and row.get("latency_p95_ms") is not None
        and row.get("online")
    )
    return row if ok else None


def _states(client: FleetClient, device: str, *, after_id: int = 0) -> list[str]:
    """States the device reported after event ``after_id``, oldest first."""
    events = sorted(_events(client, device), key=lambda e: e["id"])
    return [e["state"] for e in events if e["id"] > after_id]


def _last_event_id(client: FleetClient, device: str) -> int:
    return max((e["id"] for e in _events(client, device)), default=0)


def _lifecycle(
    *,
    profile: str,
    full: bool,
    userland: Userland,
    bundles: Bundles,
    keys: Path,
    mosquitto: Broker,
    procs: ProcessGroup,
    tmp_path: Path,
) -> None:
    v1, sha1 = bundles.get(profile, 1)
    v2, sha2 = bundles.get(profile, 2) if full else (None, "")
    client = _start_fleet(procs, tmp_path, keys, mosquitto)
    device = f"arm64-{profile}-{time.monotonic_ns() % 10**8}"
    with userland.work_dir(device) as work:
        agent = _start_agent(
            procs, userland, work, device=device, profile=profile, keys=keys, broker=mosquitto
        )
        try:
            # The pid goes launcher -> unshare -> chroot -> the agent, all by exec.
            _wait(lambda: _is_emulated(agent), "the agent to run as aarch64 code", 60, procs)
            assert client.upload(v1)["sha256"] == sha1
            if v2 is not None:
                assert client.upload(v2)["sha256"] == sha2
            _wait(
                lambda: _row(client, device).get("profile") == profile,
                "the arm64 agent to register by heartbeat",
                SLOW_S,
                procs,
            )

            # v1 arrives over MQTT, passes its golden self-test on ARM kernels, serves the
            # synthetic workload, and telemetry comes back.
            client.deploy(sha1, device_ids=[device])
            row = _wait(
                lambda: _serving(client, device, sha1, 1), "v1 serving + telemetry", SLOW_S, procs
            )
            assert row["latency_p95_ms"] > 0
            states = _wait(
                lambda: (s := _states(client, device)) and "committed" in s and s,
                "v1 to commit after its health window",
                SLOW_S,
                procs,
            )
            assert {"verifying", "self_test", "switched", "health_check"} <= set(states), states
            assert not {"failed", "reverted", "rejected"} & set(states), _events(client, device)
            self_test = [e["detail"] for e in _events(client, device) if e["state"] == "self_test"]
            print(f"{profile} on arm64: self-test ran on {self_test}")
            assert all(BACKEND[profile] in d for d in self_test), self_test
            print(f"{profile} on arm64: v1 telemetry p95 {row['latency_p95_ms']:.1f} ms (emulated)")
            if not full:
                return

            # v2 (a different model) installs and commits ...
            seen = _last_event_id(client, device)
            client.deploy(sha2, device_ids=[device])
            _wait(
                lambda: (
                    _serving(client, device, sha2, 2, after_id=seen)
                    and "committed" in _states(client, device, after_id=seen)
                ),
                "v2 to install, commit and serve",
                SLOW_S,
                procs,
            )
            # ... and the operator's rollback brings v1 back.
            seen = _last_event_id(client, device)
            client.rollback(device, reason="arm64 test")
            _wait(
                lambda: (
                    "rolled_back" in _states(client, device, after_id=seen)
                    and _row(client, device).get("reported_bundle_sha256") == sha1
                ),
                "the rollback to v1",
                SLOW_S,
                procs,
            )
            assert "failed" not in _states(client, device, after_id=seen)
            _wait(lambda: _serving(client, device, sha1, 1), "v1 serving again", SLOW_S, procs)
            assert agent.alive, agent.tail()
        finally:
            # Stop the agent before its state directory goes away with the work dir.
            agent.terminate()


@pytest.mark.parametrize("profile", PROFILES)
def test_smoke_install_selftest_telemetry(
    profile: str,
    userland: Userland,
    bundles: Bundles,
    keys: Path,
    mosquitto: Broker,
    procs: ProcessGroup,
    tmp_path: Path,
) -> None:
    """A bundle reaches the arm64 agent, passes its self-test, serves, reports telemetry."""
    _lifecycle(
        profile=profile,
        full=False,
        userland=userland,
        bundles=bundles,
        keys=keys,
        mosquitto=mosquitto,
        procs=procs,
        tmp_path=tmp_path,
    )


@pytest.mark.parametrize("profile", PROFILES)
def test_update_and_rollback(
    profile: str,
    userland: Userland,
    bundles: Bundles,
    keys: Path,
    mosquitto: Broker,
    procs: ProcessGroup,
    tmp_path: Path,
) -> None:
    """v1, then v2, then an operator's rollback to v1, all on the arm64 agent."""
    _lifecycle(
        profile=profile,
        full=True,
        userland=userland,
        bundles=bundles,
        keys=keys,
        mosquitto=mosquitto,
        procs=procs,
        tmp_path=tmp_path,
    )


# --- cross-architecture agreement ----------------------------------------------------------


def _load_outputs(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files if k != "meta"}
        meta = json.loads(str(npz["meta"]))
    return arrays, meta


def _golden(bundle: Path, keys: Path, profile: str, dest: Path) -> tuple[BundleManifest, Path]:
    verified = BundleReader(bundle).verify(
        TrustRoot.load(keys / "trust-root.json"), profile=profile, extract_to=dest
    )
    assert verified.manifest.golden is not None
    return verified.manifest, dest / verified.manifest.golden.path


def _run_model_argv(bundle: str, trust: str, profile: str, out: str, *inputs: str) -> list[str]:
    args = [bundle, "--trust-root", trust, "--profile", profile, "--out", out]
    for spec in inputs:
        args += ["--inputs", spec]
    return args


@pytest.fixture
def report_dir() -> Iterator[Path]:
    """Where the cross-arch figures go (EDGEFLEET_ARM64_REPORT, set by make test-arm64)."""
    path = Path(os.environ.get("EDGEFLEET_ARM64_REPORT", ROOT / "test-artifacts" / "arm64"))
    path.mkdir(parents=True, exist_ok=True)
    yield path


@pytest.mark.parametrize("profile", PROFILES)
def test_cross_arch_agreement(
    profile: str,
    userland: Userland,
    bundles: Bundles,
    keys: Path,
    tmp_path: Path,
    report_dir: Path,
) -> None:
    """Held-out inputs agree across arm64 and x86; the golden check fails a wrong model."""
    v1, _ = bundles.get(profile, 1)
    v2, _ = bundles.get(profile, 2)
    manifest, golden_path = _golden(v1, keys, profile, tmp_path / "v1")
    assert manifest.golden is not None
    tol = {
        "atol": manifest.golden.atol,
        "rtol": manifest.golden.rtol,
        "min_top1_match": manifest.golden.min_top1_match,
    }
    with np.load(golden_path, allow_pickle=False) as npz:
        golden = {k: npz[k] for k in npz.files}
    (out_name,) = [o.name for o in manifest.outputs]
    expected = {out_name: golden[f"out:{out_name}"]}

    with userland.work_dir(f"xarch-{profile}") as work:
        for src in (v1, v2, keys / "trust-root.json", DIGITS / "heldout.npz", RUN_MODEL):
            shutil.copy(src, work / src.name)
        shutil.copy(golden_path, work / "golden.npz")
        host_runs: dict[str, Path] = {}
        for arch, tag, bundle, specs in (
            ("arm64", "v1", v1, ("heldout.npz:input", "golden.npz:in:input")),
            ("arm64", "v2", v2, ("golden.npz:in:input",)),
            ("x86", "v1", v1, ("heldout.npz:input", "golden.npz:in:input")),
            ("x86", "v2", v2, ("golden.npz:in:input",)),
        ):
            out = work / f"{arch}-{tag}.npz"
            if arch == "arm64":
                cmd = userland.python(
                    userland.inside(work / RUN_MODEL.name),
                    *_run_model_argv(
                        userland.inside(work / bundle.name),
                        userland.inside(work / "trust-root.json"),
                        profile,
                        userland.inside(out),
                        *(f"{userland.inside(work)}/{s}" for s in specs),
                    ),
                )
            else:
                cmd = [
                    sys.executable,
                    str(RUN_MODEL),
                    *_run_model_argv(
                        str(bundle),
                        str(keys / "trust-root.json"),
                        profile,
                        str(out),
                        *(f"{work}/{s}" for s in specs),
                    ),
                ]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=SLOW_S, check=False)
            assert done.returncode == 0, f"{arch} {tag}: {done.stderr}{done.stdout}"
            host_runs[f"{arch}-{tag}"] = tmp_path / out.name
            shutil.copy(out, host_runs[f"{arch}-{tag}"])

    arm, arm_meta = _load_outputs(host_runs["arm64-v1"])
    x86, x86_meta = _load_outputs(host_runs["x86-v1"])
    arm_wrong, _ = _load_outputs(host_runs["arm64-v2"])
    x86_wrong, _ = _load_outputs(host_runs["x86-v2"])
    assert arm_meta["machine"] == "aarch64", arm_meta
    assert x86_meta["machine"] != "aarch64" or os.uname().machine == "aarch64", x86_meta

    key = f"0:{out_name}"
    a, x = arm[key].astype(np.float64), x86[key].astype(np.float64)
    with np.load(DIGITS / "heldout.npz") as npz:
        labels = npz["label"]
    diff = np.abs(a - x)
    agreement = float(np.mean(a.argmax(1) == x.argmax(1)))
    golden_arm = compare_golden(expected, {out_name: arm[f"1:{out_name}"]}, **tol)
    golden_wrong_arm = compare_golden(expected, {out_name: arm_wrong[f"0:{out_name}"]}, **tol)
    golden_wrong_x86 = compare_golden(expected, {out_name: x86_wrong[f"0:{out_name}"]}, **tol)
    figures = {
        "profile": profile,
        "heldout_samples": len(a),
        "top1_agreement": agreement,
        "disagreeing_samples": int(np.sum(a.argmax(1) != x.argmax(1))),
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "output_span": float(x.max() - x.min()),
        "golden_atol": tol["atol"],
        "golden_rtol": tol["rtol"],
        "max_abs_diff_over_atol": float(diff.max() / tol["atol"]),
        "arm64_accuracy": float(np.mean(a.argmax(1) == labels)),
        "x86_accuracy": float(np.mean(x.argmax(1) == labels)),
        "golden_on_arm64": golden_arm.detail,
        "golden_on_arm64_passed": golden_arm.passed,
        "wrong_model_golden_arm64": golden_wrong_arm.detail,
        "wrong_model_golden_arm64_passed": golden_wrong_arm.passed,
        "wrong_model_golden_x86_passed": golden_wrong_x86.passed,
        "arm64": arm_meta,
        "x86": x86_meta,
    }
    (report_dir / f"cross-arch-{profile}.json").write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))

    # Honest ARM rounding: same predictions, outputs within the bundle's golden tolerance.
    assert golden_arm.passed, golden_arm.detail
    assert agreement >= 0.99, figures
    assert diff.max() <= tol["atol"], figures
    # A wrong model's outputs fail the same check, on either architecture.
    assert not golden_wrong_arm.passed, figures
    assert not golden_wrong_x86.passed, figures
