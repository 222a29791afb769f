"""The dashboard in a real browser, against a real fleet with real agents.

One fleet for the module (keys -> `edgefleet compile` v1 and v2 -> `edgefleet fleet serve`
with bearer tokens -> three `edgefleet agent run` processes on the session's Mosquitto, all
on v1). Each test signs in through the sign-in page with a token of some role and checks
what the operator sees and can do; each saves a screenshot under test-artifacts/dashboard/.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from edgefleet.keys_cli import init_keys
from fleet.client import FleetClient, FleetClientError
from protocol.bundle import BundleReader, sign_manifest, write_bundle
from protocol.signing import load_signing_key
from tests.broker import Broker
from tests.conftest import _close_group, _open_group
from tests.procs import ProcessGroup, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "models" / "digits"
EDGEFLEET = [sys.executable, "-m", "edgefleet.cli"]
#: Playwright's waits (ms): generous, the machine is small and shared
WAIT_MS = 60_000
FIXTURE = "dashboard_fleet"


@dataclass
class World:
    url: str
    admin: FleetClient
    tokens: dict[str, str]  # role -> token
    token_ids: dict[str, str]
    devices: list[str]
    v1: str
    v2: str
    procs: ProcessGroup

    def wait(self, predicate: Callable[[], Any], what: str, timeout_s: float = 90) -> Any:
        deadline = time.monotonic() + timeout_s
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = predicate()
            except FleetClientError as exc:
                last = exc
            if last and not isinstance(last, Exception):
                return last
            for p in self.procs.processes:
                assert p.alive, f"{p.name} died while waiting for {what}:\n{p.tail()}"
            time.sleep(0.3)
        pytest.fail(f"timed out after {timeout_s}s waiting for {what}; last: {last}\n"
                    f"{self.procs.describe()}")  # fmt: skip

    def device(self, device_id: str) -> dict[str, Any]:
        return self.admin._call("GET", f"/api/v1/devices/{device_id}")  # type: ignore[no-any-return]

    def serving(self, device_id: str, sha: str) -> bool:
        d = self.device(device_id)
        return d["reported_bundle_sha256"] == sha and any(
            e["state"] in ("committed", "rolled_back") and e["active_bundle_sha256"] == sha
            for e in d["events"]
        )


def _compile(tmp: Path, keys: Path, version: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            *EDGEFLEET, "compile", str(DIGITS / "model.onnx"),
            "--profile", "x86-cpu",
            "--calibration", str(DIGITS / "calibration.npz"),
            "--heldout", str(DIGITS / "heldout.npz"),
            "--key", str(keys / "release.key"),
            "--out", str(tmp / f"dist-v{version}"),
            "--model-name", "digits", "--model-version", str(version), "--quiet",
        ],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _finish(proc: subprocess.Popen[str]) -> tuple[Path, str]:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err + out
    path, sha = out.strip().splitlines()[-1].split()
    return Path(path), sha


def _next_version(bundle: Path, release_key: Path, out: Path) -> tuple[Path, str]:
    """The same compiled artifact released again as version 2 (signed with the release key):
    a second real bundle without a second compile, which costs most on a busy small machine."""
    reader = BundleReader(bundle)
    manifest = reader.unverified_manifest()
    with tarfile.open(bundle, mode="r:") as tar:
        files = {}
        for entry in manifest.files:
            member = tar.extractfile(entry.path)
            assert member is not None, entry.path
            files[entry.path] = member.read()
    v2 = manifest.model_copy(update={"model": manifest.model.model_copy(update={"version": 2})})
    out.parent.mkdir(parents=True, exist_ok=True)
    sha = write_bundle(out, v2, sign_manifest(v2, [load_signing_key(release_key)]), files)
    return out, sha


@pytest.fixture(scope="module")
def dashboard_fleet(tmp_path_factory: pytest.TempPathFactory, mosquitto: Broker) -> Iterator[World]:
    """The fleet and three agents on v1, shared by this module's tests."""
    tmp = tmp_path_factory.mktemp("dashboard")
    keys = tmp / "keys"
    init_keys(keys)
    b1, v1 = _finish(_compile(tmp, keys, 1))
    b2, v2 = _next_version(b1, keys / "release.key", tmp / "dist-v2" / "digits-v2.efb")

    db_url = f"sqlite:///{tmp / 'fleet.db'}"
    # a group that lives as long as the module: the per-test leak check must not count it
    procs = _open_group(tmp / "procs", fixture=FIXTURE, session=True)
    try:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        fleet = procs.start(
            "fleet",
            [
                *EDGEFLEET, "fleet", "serve",
                "--trust-root", str(keys / "trust-root.json"),
                "--db", db_url,
                "--mqtt-host", mosquitto.host, "--mqtt-port", str(mosquitto.port),
                "--bundle-dir", str(tmp / "bundles"),
                "--host", "127.0.0.1", "--port", str(port),
            ],
            extra_env={
                "EDGEFLEET_FLEET_ROLLOUT_TICK_S": "0.3",
                "EDGEFLEET_FLEET_OFFLINE_AFTER_S": "20",
                "EDGEFLEET_FLEET_RECONCILE_INTERVAL_S": "0",
                "EDGEFLEET_FLEET_MQTT_SESSION_EXPIRY_S": "0",
                # drift tiles every few seconds, so the drift page has data to draw
                "EDGEFLEET_DRIFT_INTERVAL_S": "2",
                "EDGEFLEET_DRIFT_TILE_S": "5",
                "EDGEFLEET_DRIFT_TILE_GRACE_S": "1",
            },
        )  # fmt: skip
        procs.wait_for_http(f"{url}/healthz", timeout_s=60, process=fleet)
        # the first admin token, straight into the database the fleet made at its start
        admin_token = subprocess.run(
            [*EDGEFLEET, "fleet", "token", "create", "--role", "admin", "--name", "dash-admin",
             "--db", db_url],
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout.strip().splitlines()[-1]  # fmt: skip
        admin = FleetClient(url, timeout_s=15, token=admin_token)
        world = World(
            url=url, admin=admin, tokens={"admin": admin_token}, token_ids={},
            devices=[], v1=v1, v2=v2, procs=procs,
        )  # fmt: skip
        world.wait(lambda: admin._call("GET", "/healthz")["mqtt"] == "connected", "MQTT", 30)
        for role in ("viewer", "operator"):
            made = admin.create_token(f"dash-{role}", role)
            world.tokens[role], world.token_ids[role] = made["token"], made["id"]

        run = f"{time.monotonic_ns() % 10**8}"
        world.devices = [f"dash-{run}-{x}" for x in ("a", "b", "c")]
        for i, dev in enumerate(world.devices):
            procs.start(
                dev,
                [
                    *EDGEFLEET, "agent", "run",
                    "--state-dir", str(tmp / dev),
                    "--device-id", dev,
                    "--profile", "x86-cpu",
                    "--trust-root", str(keys / "trust-root.json"),
                    "--mqtt-host", mosquitto.host, "--mqtt-port", str(mosquitto.port),
                    "--telemetry-window-s", "1", "--heartbeat-s", "1",
                    "--workload", str(DIGITS / "heldout.npz"), "--rate", "20",
                    "--tag", "lab", "--tag", "shelf-1" if i < 2 else "shelf-2",
                ],
            )  # fmt: skip
        assert admin.upload(b1)["sha256"] == v1
        assert admin.upload(b2)["sha256"] == v2

        def registered() -> bool:
            by_id = {d["id"]: d for d in admin.devices()}
            return all(by_id.get(d, {}).get("profile") == "x86-cpu" for d in world.devices)

        world.wait(registered, "the agents to register", 60)
        admin.deploy(v1, device_ids=world.devices)
        world.wait(
            lambda: all(world.serving(d, v1) for d in world.devices), "every agent on v1", 120
        )
        yield world
    finally:
        _close_group(procs)


@pytest.fixture
def page(browser: Any, dashboard_fleet: World) -> Iterator[Any]:
    """A fresh browser context (no cookies) and page, sized like a laptop screen."""
    context = browser.new_context(viewport={"width": 1366, "height": 900})
    context.set_default_timeout(WAIT_MS)
    p = context.new_page()
    p.on("dialog", lambda dialog: dialog.accept())  # the buttons' confirmations
    try:
        yield p
    finally:
        context.close()


def sign_in(page: Any, world: World, role: str, path: str = "/ui/") -> None:
    """Go to ``path``, land on sign-in, paste the role's token, come back to ``path``."""
    page.goto(world.url + path)
    page.wait_for_url("**/ui/login**")
    page.fill("#token", world.tokens[role])
    page.click("form[action$='/login'] button[type=submit]")
    page.wait_for_url(f"**{path}")


def test_overview_shows_the_fleet_and_roles_decide_what_one_sees(
    browser: Any, dashboard_fleet: World, page: Any, artifacts: Path
) -> None:
    world = dashboard_fleet
    page.goto(world.url + "/ui/")
    page.wait_for_url("**/ui/login**")
    page.fill("#token", "eft_not-a-real-token")
    page.click("form[action$='/login'] button[type=submit]")
    assert "unknown or revoked" in page.inner_text("[role=alert]")

    page.fill("#token", world.tokens["viewer"])
    page.click("form[action$='/login'] button[type=submit]")
    page.wait_for_url("**/ui/")
    [cookie] = [c for c in page.context.cookies() if c["name"] == "edgefleet_token"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"

    for dev in world.devices:
        row = page.locator(f"tr[data-device='{dev}']")
        row.locator(".badge", has_text="online").wait_for()
        assert row.locator("td[data-model-version]").get_attribute("data-model-version") == "1"
    assert int(page.inner_text("[data-count=online]")) >= len(world.devices)
    page.locator("tr[data-version='digits:1']").wait_for()
    page.locator("tr[data-tag='shelf-2']").wait_for()
    page.locator("tr[data-slo^='digits:']").first.wait_for()
    # the live regions refresh without a reload
    page.evaluate("window.__sameDocument = true")
    page.locator("body[data-updated]").wait_for(state="attached")
    assert page.evaluate("window.__sameDocument") is True
    page.screenshot(path=str(artifacts / "overview.png"), full_page=True)

    # a viewer sees no buttons
    page.goto(f"{world.url}/ui/devices/{world.devices[0]}")
    page.locator("[data-field=model]", has_text="v1").wait_for()
    assert page.locator("button[data-action]").count() == 0

    # the drift page of v1 draws reference vs current for its features (tiles every 5 s)
    page.goto(world.url + "/ui/drift/digits/1")
    page.locator(".feature svg.chart").first.wait_for()
    assert page.locator("[data-feature]").count() >= 10
    page.screenshot(path=str(artifacts / "drift.png"), full_page=True)

    page.goto(world.url + "/ui/bundles")
    page.locator(f"tr[data-bundle='{world.v2}']").wait_for()
    assert "passed" in page.inner_text(f"tr[data-bundle='{world.v1}']")

    # unknown ids: a page that says so, with a 404
    for path, words in (("/ui/devices/no-such-device", "no-such-device"),
                        ("/ui/rollouts/no-such-rollout", "no-such-rollout")):  # fmt: skip
        response = page.goto(world.url + path)
        assert response.status == 404
        assert page.inner_text("h1") == "Not found"
        assert words in page.inner_text(".error-message")

    # the token is revoked while the page is open: the next live update goes to sign-in
    page.goto(f"{world.url}/ui/devices/{world.devices[0]}")
    world.admin._call("DELETE", f"/api/v1/tokens/{world.token_ids['viewer']}")
    page.wait_for_url("**/ui/login**")
    assert "revoked" in page.inner_text("[data-why]")


def test_rollout_advances_on_screen_and_is_rolled_back_from_it(
    browser: Any, dashboard_fleet: World, page: Any, artifacts: Path
) -> None:
    world = dashboard_fleet
    a, b = world.devices[:2]
    body = {
        "bundle_sha256": world.v2,
        "target": {"device_ids": [a, b]},
        "stages": [{"percent": 50, "bake_s": 2}, {"percent": 100, "bake_s": 2}],
        # no latency gate: the gates skip cold starts now, but one canary against one control
        # on a shared CI host is host scheduling noise (warm p95s of one model differ by 3x
        # and more from device to device there; docs/scaling.md), not a model's latency
        "gates": {"min_inferences": 10, "max_latency_p95_ratio": None,
                  "max_drift_score": None, "max_battery_drain_ratio": None},
        "seed": 7,
        "command_timeout_s": 60,
    }  # fmt: skip
    rollout = world.admin._call("POST", "/api/v1/rollouts", body=body)
    rid = rollout["id"]
    sign_in(page, world, "operator", f"/ui/rollouts/{rid}")
    page.evaluate("window.__sameDocument = true")

    stage1 = page.locator("[data-stage='0']")
    stage1.locator(".stage-count[data-committed='1']").wait_for()
    page.locator("[data-decision='advance'][data-stage='0']").wait_for()
    page.locator(
        "[data-stage='1'][data-stage-state='current'], [data-stage='1'][data-stage-state='done']"
    ).wait_for()
    page.locator("[data-field=phase] [data-phase='completed']").wait_for()
    assert page.evaluate("window.__sameDocument") is True, "the page reloaded"
    assert page.locator("[data-stage='1'] .stage-count").get_attribute("data-committed") == "1"
    gates = page.locator("[data-decision='advance'][data-stage='0'] table.gates")
    assert "error_rate" in (gates.text_content() or "")
    for dev in (a, b):
        assert page.locator(f"tr[data-device='{dev}'][data-phase='committed']").count() == 1
    page.locator("[data-decision='advance'] details").first.click()  # open its gate figures
    page.screenshot(path=str(artifacts / "rollout-completed.png"), full_page=True)

    # a button the API refuses says why
    page.click("button[data-action$='/approve']")
    flash = page.locator("#flash.flash-error")
    flash.wait_for()
    assert "cannot approve" in flash.inner_text() and "completed" in flash.inner_text()

    page.fill("#reason", "e2e: back to v1")
    page.click("button[data-action$='/rollback']")
    page.locator("#flash.flash-ok").wait_for()
    page.locator("[data-field=phase] [data-phase='rolled_back']").wait_for()
    assert page.evaluate("window.__sameDocument") is True
    page.screenshot(path=str(artifacts / "rollout-rolled-back.png"), full_page=True)
    world.wait(lambda: all(world.serving(d, world.v1) for d in (a, b)), "a and b back on v1")


def test_rollback_button_rolls_a_device_back(
    browser: Any, dashboard_fleet: World, page: Any, artifacts: Path
) -> None:
    world = dashboard_fleet
    dev = world.devices[2]
    world.admin.deploy(world.v2, device_ids=[dev])
    world.wait(lambda: world.serving(dev, world.v2), f"{dev} on v2")

    sign_in(page, world, "operator", f"/ui/devices/{dev}")
    page.locator("[data-field=model]", has_text="v2").wait_for()
    page.evaluate("window.__sameDocument = true")
    page.fill("#reason", "e2e: v2 misbehaves")
    page.click("button[data-action$='/rollback']")
    page.locator("#flash.flash-ok").wait_for()
    page.locator("[data-field=model]", has_text="v1").wait_for()
    page.locator("tr[data-event='rolled_back']").first.wait_for()
    page.locator("tr[data-history='0'][data-model-version='1']").wait_for()
    assert page.evaluate("window.__sameDocument") is True, "the page reloaded"
    page.screenshot(path=str(artifacts / "device-rolled-back.png"), full_page=True)

    # the dashboard acted as the operator: the API's audit log says who and why
    audit = world.admin._call("GET", "/api/v1/audit?limit=10000")
    mine = [r for r in audit if r["action"] == "device.rollback" and r["target"] == dev]
    assert [r["actor"] for r in mine] == ["dash-operator"], mine

    # the same page on a tablet
    page.set_viewport_size({"width": 820, "height": 1180})
    page.reload()
    page.locator("[data-field=model]", has_text="v1").wait_for()
    page.screenshot(path=str(artifacts / "device-tablet.png"), full_page=True)
