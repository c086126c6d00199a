"""The release dashboard in a real headless Chromium, against a real platform whose fleet of devices
talks to it over real gRPC while the page is open: login, figures equal to the platform's own state,
a rollout growing without a reload, the task diff, and the JSON API's security."""
import collections
import json
import os
import pathlib
import random
import ssl
import threading
import time
import urllib.error
import urllib.request
import zlib
from contextlib import contextmanager

import pytest

from walle.platform import pki
from walle.platform.auth import OperatorCredentials
from walle.platform.dashboard import start_dashboard
from walle.platform.errors import InvalidArgument
from walle.protos import admin_pb2, device_pb2, tunnel_pb2

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
RULE = 'app_version >= "2.0"'
N_DEVICES = 24
FLAKY = ('ValueError: flaky <i>network</i>\nTraceback (most recent call last):\n'
         '  File "main.py", line 12, in main\n    raise ValueError("flaky <i>network</i>")')
WAIT_S = 15


def _playwright():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright for Python is missing: .venv/bin/pip install playwright (never `playwright install`)")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium (the dashboard test drives a real browser)")
    return sync_playwright


def _batch(records) -> tunnel_pb2.UpBatch:
    recs = tunnel_pb2.UpRecords(records=records)
    return tunnel_pb2.UpBatch(zlib_records=zlib.compress(recs.SerializeToString()), count=len(records))


def app_version(i: int) -> str:
    return ("1.9.0", "2.3.1", "2.3.1", "2.4.0")[i % 4]  # every 4th device is outside the release rule


class Fleet(threading.Thread):
    """Enrolled devices that keep pulling their tasks over gRPC and uploading delivery and run reports.
    The test holds `lock` to freeze the fleet while it compares the page with the platform."""

    def __init__(self, live, n: int):
        super().__init__(name="fleet", daemon=True)
        self.live = live
        self.devices = [(f"phone-{i:02d}", live.enroll(f"phone-{i:02d}"), app_version(i)) for i in range(n)]
        self.lock = threading.Lock()
        self.halt = threading.Event()
        self.seq = collections.Counter()
        self.installed: dict[tuple[str, str], str] = {}
        self.rounds = 0
        self.errors: list[BaseException] = []
        self.rng = random.Random(7)

    def step(self, device_id: str, md, app: str) -> None:
        info = device_pb2.DeviceInfo(user_id="u-" + device_id, os="android", app_version=app, host_version="0.1.0")
        reply = self.live.devices.GetActiveTasks(info, metadata=md, timeout=10)
        records = []

        def add(topic: str, msg) -> None:
            self.seq[device_id] += 1
            payload = msg if isinstance(msg, bytes) else msg.SerializeToString()
            records.append(tunnel_pb2.UpRecord(seq=self.seq[device_id], topic=topic, ts_ms=int(time.time() * 1000),
                                               payload=payload))
        for t in reply.tasks:
            if self.installed.get((device_id, t.name)) != t.version:
                add("delivery", tunnel_pb2.DeliveryReport(task=t.name, version=t.version, release_id=t.release_id,
                                                          status="installed"))
                self.installed[(device_id, t.name)] = t.version
            status = "error" if self.rng.random() < 0.15 else "ok"
            add("run_report", tunnel_pb2.RunReport(task=t.name, version=t.version, release_id=t.release_id,
                                                   status=status, duration_s=round(self.rng.uniform(0.01, 0.4), 3),
                                                   trigger="event:hello", error=FLAKY if status != "ok" else ""))
            add("log", json.dumps({"task": t.name, "version": t.version,
                                   "lines": [f"info: hello from {device_id}"]}).encode())
        if records:
            self.live.tunnel.Upload(iter([_batch(records)]), metadata=md, timeout=10)

    def run(self) -> None:
        try:
            while not self.halt.is_set():
                for device_id, md, app in self.devices:
                    with self.lock:
                        self.step(device_id, md, app)
                self.rounds += 1
                self.halt.wait(0.3)
        except BaseException as e:  # surfaced by the test
            self.errors.append(e)

    @contextmanager
    def frozen(self):
        with self.lock:
            yield


def platform_figures(p) -> dict:
    """What the page must show, read from the platform itself (not through the dashboard module)."""
    releases = {r.id: {"rule": r.rule or "(every device)", "stage": r.stage, "rollout": r.rollout, "state": r.state,
                       "delivered": r.stats.delivered, "ran": r.stats.ran, "runs": r.stats.runs,
                       "failed": r.stats.failed}
                for r in p.ListReleases(admin_pb2.ReleaseFilter()).releases}
    day_ago = time.time() - 86400
    seen = {d.device_id: d.app_version for d in p.ListDevices(admin_pb2.Empty()).devices
            if not d.revoked and d.last_seen >= day_ago}
    latest = {}
    for device_id, task, version in p.state.db.execute(
            "SELECT device_id, task, version FROM deliveries WHERE status='installed' ORDER BY device_id, seq"):
        if device_id in seen:
            latest[(device_id, task)] = version
    return {"releases": releases, "by_app": dict(collections.Counter(seen.values())),
            "by_task": dict(collections.Counter(f"{t}@{v}" for (_d, t), v in latest.items())), "seen": len(seen)}


# Reads what the page shows (text, as a person sees it) into the same shape as platform_figures.
READ_PAGE = """() => {
  const text = (tr, f) => tr.querySelector(`[data-field="${f}"]`).textContent.trim();
  const releases = {};
  for (const tr of document.querySelectorAll("#releases tbody tr")) {
    releases[tr.dataset.release] = {rule: text(tr, "rule"), stage: text(tr, "stage"),
      rollout: parseFloat(text(tr, "rollout")), state: text(tr, "state"),
      delivered: +text(tr, "delivered"), ran: +text(tr, "ran"), runs: +text(tr, "runs"), failed: +text(tr, "failed")};
  }
  const counts = (id) => Object.fromEntries([...document.querySelectorAll(`#${id} tbody tr`)]
      .map((tr) => [tr.dataset.key, +text(tr, "devices")]));
  return {releases, by_app: counts("fleet-app"), by_task: counts("fleet-task"),
          seen: +document.getElementById("fleet-seen").textContent};
}"""


def wait_for(predicate, what: str, timeout: float = WAIT_S):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.2)


def page_matches_platform(page, p, fleet) -> dict:
    """Freeze the fleet, read the platform, and wait for the self-updating page to show the same."""
    with fleet.frozen():
        want = platform_figures(p)
        last = {}

        def same():
            last["page"] = page.evaluate(READ_PAGE)
            return last["page"] == want
        try:
            wait_for(same, "the page to show the platform's figures", timeout=10)
        except AssertionError:
            raise AssertionError(f"page shows {json.dumps(last.get('page'), sort_keys=True)}\n"
                                 f"platform has {json.dumps(want, sort_keys=True)}") from None
    return want


def http_get(url: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


@pytest.fixture
def dashboard(live):
    token = OperatorCredentials(live.platform.state).create("alice")
    port, stop = start_dashboard(live.platform, port=0)
    yield f"http://127.0.0.1:{port}", token
    stop()


def test_json_api_needs_the_operator_token_and_sends_security_headers(live, dashboard):
    base, token = dashboard
    live.submit(ROOT / "tasks" / "hello", "first")
    for headers, url in [({}, "/api/overview"), ({"Authorization": "Bearer wot1.wrong"}, "/api/overview"),
                         ({}, f"/api/overview?token={token}"), ({}, "/api/tasks/hello/history"),
                         ({}, "/api/devices"), ({}, "/api/devices/phone-1"), ({}, "/api/releases/r1")]:
        status, _h, body = http_get(base + url, headers)
        assert status == 401, url
        assert "operator credential" in json.loads(body)["error"]
    auth = {"Authorization": f"Bearer {token}"}
    status, hdrs, body = http_get(base + "/api/overview", auth)
    data = json.loads(body)
    assert status == 200 and data["operator"] == "alice" and [t["name"] for t in data["tasks"]] == ["hello"]
    status, _h, body = http_get(base + "/api/tasks/hello/diff?v1=" + data["tasks"][0]["version"], auth)
    assert status == 400 and "v2" in json.loads(body)["error"]
    status, _h, body = http_get(base + "/api/tasks/nosuchtask/history", auth)
    assert status == 404 and "nosuchtask" in json.loads(body)["error"]
    for url, what in (("/api/releases/r99", "r99"), ("/api/devices/nosuchphone", "nosuchphone")):
        status, _h, body = http_get(base + url, auth)
        assert status == 404 and what in json.loads(body)["error"], url
    live.enroll("phone-1")
    status, _h, body = http_get(base + "/api/devices?q=phone", auth)
    devices = json.loads(body)
    assert status == 200 and devices["total"] == 1 and devices["devices"][0]["device_id"] == "phone-1"
    assert devices["devices"][0]["failed_runs"] == 0
    status, _h, body = http_get(base + "/api/devices?q=nobody", auth)
    assert json.loads(body)["total"] == 0
    status, hdrs, body = http_get(base + "/")
    csp = {k.lower(): v for k, v in hdrs.items()}["content-security-policy"]
    assert status == 200 and "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert b"<script src=\"/static/dashboard.js\"" in body and b"<script>" not in body


@pytest.mark.slow
def test_dashboard_in_a_real_browser_follows_a_rollout(live, dashboard, tmp_path):
    sync_playwright = _playwright()
    base, token = dashboard
    p = live.platform
    v1 = live.submit(ROOT / "tasks" / "hello", "first hello")
    v2 = live.submit(live.hello_variant("hello2", "dashboard says hi"), "<b>v2</b> & friends")
    assert v1.version != v2.version
    p.CreateRelease(admin_pb2.CreateReleaseRequest(task="hello", version=v1.version, actor="alice"))
    # Buckets are salted per release, so which devices are inside is random: with 18 devices in the rule,
    # 50% then 90% leaves the gray (or its growth) empty with probability < 1e-3.
    gray = p.CreateRelease(admin_pb2.CreateReleaseRequest(task="hello", version=v2.version, rule=RULE, stage="gray",
                                                          rollout=50, has_rollout=True, actor="alice"))
    fleet = Fleet(live, N_DEVICES)
    fleet.start()
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.on("pageerror", lambda e: fleet.errors.append(AssertionError(f"page error: {e}")))
            page.goto(base + "/")

            # A wrong token: an error, and no data anywhere on the page.
            page.fill("#token", "wot1.not-a-real-token")
            page.click("#login-form button[type=submit]")
            page.wait_for_selector("#login-error:not([hidden])")
            assert "refused" in page.text_content("#login-error")
            assert page.is_hidden("#app")
            assert page.locator("#releases tbody tr").count() == 0
            assert page.evaluate("sessionStorage.length") == 0
            page.screenshot(path=str(tmp_path / "login-refused.png"))

            page.fill("#token", token)
            page.click("#login-form button[type=submit]")
            page.wait_for_selector(f"#releases tbody tr[data-release={gray.id}]")
            assert page.text_content("#operator") == "alice"
            assert token not in page.url

            # Wait until the gray release has reached devices and some runs failed, then compare.
            wait_for(lambda: p.GetRelease(admin_pb2.ReleaseRef(id=gray.id)).stats.failed > 0 and fleet.rounds >= 2,
                     "the fleet to install the gray release and report runs")
            shown = page_matches_platform(page, p, fleet)
            assert shown["releases"][gray.id]["rollout"] == 50 and shown["releases"][gray.id]["rule"] == RULE
            assert shown["by_app"] == {"1.9.0": 6, "2.3.1": 12, "2.4.0": 6}
            assert set(shown["by_task"]) == {f"hello@{v1.version}", f"hello@{v2.version}"}
            v2_before = shown["by_task"][f"hello@{v2.version}"]

            # The rollout grows; the open page follows without a reload.
            page.evaluate("window.__sameDocument = true")
            updated = page.text_content("#updated")
            p.SetRollout(admin_pb2.SetRolloutRequest(id=gray.id, rollout=90, actor="alice"))
            # (polled from Python: the page's CSP forbids the string eval wait_for_function would use)
            wait_for(lambda: page.text_content(f"tr[data-release={gray.id}] [data-field=rollout]") == "90%",
                     "the page to show the grown rollout")
            assert page.evaluate("window.__sameDocument === true")
            wait_for(lambda: platform_figures(p)["by_task"].get(f"hello@{v2.version}", 0) > v2_before,
                     "more devices to install the grown release")
            shown = page_matches_platform(page, p, fleet)
            assert shown["by_task"][f"hello@{v2.version}"] > v2_before
            assert page.text_content("#updated") != updated

            # Drill down: the gray release's convergence, its top error and failed runs with the task's
            # traceback and log lines; then one failing device, its installed versions and its errors.
            page.click(f"button[data-open-release={gray.id}]")
            page.wait_for_selector("#rd-errors tbody tr")
            with fleet.frozen():
                health = p.GetReleaseHealth(admin_pb2.ReleaseRef(id=gray.id))
                wait_for(lambda: page.text_content("#rd-figures [data-figure=delivered] b")
                         == str(health.release.stats.delivered), "the drill-down to show the delivered devices")
                assert page.text_content("#rd-figures [data-figure=targeted] b") == str(health.targeted)
                # targeted = the devices the release engine puts in this release's audience now (these
                # devices were enrolled without a user: the platform ignores the user_id they report)
                in_gray = sum(
                    [t.release_id for t in p.Preview(device_pb2.DeviceInfo(
                        device_id=d, os="android", app_version=app, host_version="0.1.0")).tasks]
                    == [gray.id] for d, _md, app in fleet.devices)
                assert health.targeted == in_gray and 0 < in_gray <= 18
            top = page.locator("#rd-errors tbody tr").first.locator("td")
            assert top.nth(2).text_content() == "ValueError: flaky <i>network</i>"  # text, not markup
            assert page.locator("#rd-errors i").count() == 0
            failed_run = page.locator("#rd-failed .run.failed").first
            assert 'File "main.py", line 12' in failed_run.locator("pre.error").text_content()
            assert failed_run.locator("pre.log").text_content().startswith("info: hello from phone-")
            device_id = failed_run.get_attribute("data-device")
            failed_run.locator(f"button[data-open-device='{device_id}']").click()
            page.wait_for_selector(f"#dd-id:text('{device_id}')")
            with fleet.frozen():
                latest = dict(p.state.db.execute(
                    "SELECT task, version FROM deliveries WHERE device_id = ? AND status = 'installed' "
                    "ORDER BY seq", [device_id]).fetchall())
                wait_for(lambda: page.get_attribute("#dd-installed tr[data-task=hello] [data-field=version]",
                                                    "title") == latest["hello"], "the device's installed version")
            assert "app_version=" in page.text_content("#dd-attrs")
            assert page.locator("#dd-errors .run.failed pre.error").first.text_content().startswith("ValueError")
            page.screenshot(path=str(tmp_path / "drilldown.png"), full_page=True)
            # Filters: the device list narrows to one device; the release list by state and task.
            page.fill("#filter-device", device_id)
            page.click("#device-filter button[type=submit]")
            wait_for(lambda: page.locator("#devices tbody tr").count() == 1, "the device filter")
            page.select_option("#filter-state", "active")
            rows = page.locator("#releases tbody tr")
            assert rows.count() == 1 and rows.first.get_attribute("data-release") == gray.id
            page.select_option("#filter-state", "fallback")  # the first release: where devices outside the gray fall back
            assert rows.count() == 1 and rows.first.get_attribute("data-release") != gray.id
            page.select_option("#filter-state", "")
            page.fill("#filter-task", "nosuchtask")
            assert rows.count() == 0 and "0 shown" in page.text_content("#releases-count")
            page.fill("#filter-task", "")

            # Task history (messages are text, not markup) and the diff between the two versions.
            page.click("button[data-task=hello]")
            page.wait_for_selector(f"#versions tr[data-version='{v2.version}']")
            msg = page.locator(f"#versions tr[data-version='{v2.version}'] td").nth(1)
            assert msg.text_content() == "<b>v2</b> & friends" and msg.locator("b").count() == 0
            page.select_option("#diff-v1", v1.version)
            page.select_option("#diff-v2", v2.version)
            page.click("#diff-form button[type=submit]")
            page.wait_for_selector("#diff span.add")
            added = page.locator("#diff span.add").all_text_contents()
            assert "+# dashboard says hi" in added
            page.wait_for_timeout(1600)  # one more poll so the screenshot shows settled figures
            page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
            if os.environ.get("WALLE_UPDATE_DOCS_SCREENSHOT"):  # refresh docs/dashboard.png on purpose only
                page.screenshot(path=str(ROOT / "docs" / "dashboard.png"), full_page=True)

            # Revoking the operator locks the open page out at its next poll and clears the figures.
            OperatorCredentials(p.state).revoke("alice", actor="test")
            page.wait_for_selector("#login-error:not([hidden])", timeout=WAIT_S * 1000)
            assert page.is_hidden("#app") and page.locator("#releases tbody tr").count() == 0
            assert page.evaluate("sessionStorage.length") == 0
            browser.close()
    finally:
        fleet.halt.set()
        fleet.join(timeout=15)
    assert not fleet.errors, fleet.errors
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000


def test_dashboard_serves_https_with_the_platform_certificate(live):
    keys_dir = live.tmp / "data" / "pki"
    pki.init(live.tmp / "data")
    token = OperatorCredentials(live.platform.state).create("bob")
    with pytest.raises(InvalidArgument, match="certfile and keyfile"):
        start_dashboard(live.platform, certfile=keys_dir / "server.pem")
    port, stop = start_dashboard(live.platform, certfile=keys_dir / "server.pem", keyfile=keys_dir / "server-key.pem")
    try:
        with pytest.raises(OSError, match="dashboard cannot listen"):
            start_dashboard(live.platform, port=port)
        ctx = ssl.create_default_context(cafile=str(keys_dir / "ca.pem"))
        req = urllib.request.Request(f"https://127.0.0.1:{port}/api/overview",
                                     headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=10, context=ctx) as r:
            assert r.status == 200 and json.loads(r.read())["operator"] == "bob"
        with pytest.raises(OSError):  # plain HTTP on the TLS port gets no answer (connection closed)
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/overview", timeout=10)
    finally:
        stop()
