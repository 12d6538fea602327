"""The live dashboard (microfed_host.dashboard, docs/dashboard.md): headless Chromium opens it
during a real mesh run (MicroPython nodes, a broker, a sign-flipper that gets banned, an
attacker sending forged frames) and sees rounds, nodes, the ban and the forged frames arrive
without a reload; the same run's alerts reach an MQTT subscriber that logs in as the mesh's
read-only `monitor`. Also: what the snapshot holds equals the run's own summary, and the
server's access rules (localhost, token, read-only).

Screenshots for docs/dashboard/: MICROFED_DASHBOARD_SHOTS=docs/dashboard pytest
tests/test_dashboard.py -k browser
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from microfed_host import dashboard, dashboard_data

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]

SCENARIO = """
name = "dashboard"
honest = 5
rule = "krum"
f = 1
rounds = 8
mode = "gossip"
seed = 2
crosscheck = "always"
deadline_s = 60.0
round_min_s = 1.5   # slow enough to watch
max_samples = 60

[[attackers]]
attack = "sign-flip"
count = 1

[[attackers]]
attack = "forged"
count = 1
"""


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str, dict[str, str]]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), dict(e.headers)


def _inproc_run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "microfed_tools.cli", "mesh", "run", "--transport",
                    "inproc", "--rounds", "4", "--out", str(run)], check=True,
                   capture_output=True, text=True, timeout=300)
    return run


def test_snapshot_equals_the_runs_summary(tmp_path: Path) -> None:
    run = _inproc_run(tmp_path)
    snap = dashboard_data.snapshot(run / "coordinator.sqlite")
    summary = json.loads((run / "summary.json").read_text())
    scenario = json.loads((run / "scenario.json").read_text())
    assert snap["store_up"] and snap["run"]["done"]
    assert [r["round"] for r in snap["rounds"]] == [1, 2, 3, 4] == \
        list(range(1, summary["rounds"] + 1))
    assert snap["rounds"][-1]["accuracy"] == summary["final_accuracy"]
    ids = scenario["honest_ids"] + scenario["byzantine_ids"]
    assert [n["node"] for n in snap["nodes"]] == sorted(ids)
    by = {n["node"]: n for n in snap["nodes"]}
    assert sorted(n for n, v in by.items() if v["banned"]) == summary["banned"]
    assert sorted(n for n, v in by.items() if v["simulated_attacker"]) == \
        sorted(scenario["byzantine_ids"])
    for n in scenario["honest_ids"]:
        assert by[n]["board"] == "unix"
        assert [v["round"] for v in by[n]["verdicts"]] == [1, 2, 3, 4]
    assert snap["rejected"]["by_reason"] == summary["rejected"]
    assert snap["privacy"] is None
    # No store yet: an empty snapshot, not an error.
    empty = dashboard_data.snapshot(tmp_path / "none.sqlite")
    assert empty["store_up"] is False and empty["nodes"] == [] and empty["rounds"] == []


def test_access_rules(tmp_path: Path) -> None:
    run = _inproc_run(tmp_path)
    store = run / "coordinator.sqlite"
    d = dashboard.serve("127.0.0.1:0", store)
    try:
        code, body, headers = _get(d.url)
        assert code == 200 and "<title>microfed dashboard</title>" in body
        code, body, _ = _get(d.url + "api/snapshot")
        assert code == 200 and json.loads(body)["run"]["rule"] == "krum"
        code, body, headers = _get(d.url + "metrics")
        assert code == 200 and "microfed_rounds_closed_total 4" in body
        req = urllib.request.Request(d.url + "api/snapshot", data=b"{}", method="POST")
        with pytest.raises(urllib.error.HTTPError) as ei:
            urllib.request.urlopen(req, timeout=10)
        assert ei.value.code == 405  # read-only
    finally:
        d.stop()
    # Beyond localhost: refused without a token, and a short token is refused too.
    with pytest.raises(dashboard.DashboardError, match="token"):
        dashboard.serve("0.0.0.0:0", store)
    with pytest.raises(dashboard.DashboardError, match="16 characters"):
        dashboard.serve("127.0.0.1:0", store, token="short")
    token = "t0ken-for-the-test-0123"
    d = dashboard.serve("127.0.0.1:0", store, token=token)
    try:
        assert _get(d.url + "api/snapshot")[0] == 401
        assert _get(d.url + "api/snapshot", {"Authorization": "Bearer wrong-token-xxxxxxx"})[0] == 401
        assert _get(d.url + "api/snapshot", {"Authorization": f"Bearer {token}"})[0] == 200
        code, _body, headers = _get(d.url + f"?token={token}")
        assert code == 200 and f"microfed_dashboard={token}" in headers["set-cookie"]
        assert "httponly" in headers["set-cookie"].lower()
        assert _get(d.url + "metrics", {"Cookie": f"microfed_dashboard={token}"})[0] == 200
    finally:
        d.stop()
    for bad in ("", "host:", "x:99999"):
        with pytest.raises(dashboard.DashboardError, match="--dashboard wants"):
            dashboard.parse_listen(bad)


def _stream_events(url: str, got: list[dict], first: threading.Event) -> None:
    """Reads /api/stream until the server closes it; each snapshot's data into `got`."""
    with urllib.request.urlopen(url + "api/stream", timeout=30) as r:
        for raw in r:
            line = raw.decode().rstrip("\n")
            if line.startswith("data: "):
                got.append(json.loads(line[6:]))
                first.set()


def test_a_stream_gets_the_stores_last_state_when_the_dashboard_stops(tmp_path: Path) -> None:
    # A run marks its store done and stops its dashboard moments later. A page watching must
    # still see "done", however the stream's re-reads fall (here 60 s apart: without the last
    # read at stop() the stream would hold the first state only).
    from microfed_host.rounds_store import RoundsStore

    store = RoundsStore(tmp_path / "coordinator.sqlite")
    store.put_config({"rule": "krum", "f": 1, "mode": "gossip", "rounds": 8})
    store.init_state(8, b"", b"", b"", 0)
    d = dashboard.serve("127.0.0.1:0", tmp_path / "coordinator.sqlite", interval=60.0)
    got: list[dict] = []
    first = threading.Event()
    reader = threading.Thread(target=_stream_events, args=(d.url, got, first), daemon=True)
    try:
        reader.start()
        assert first.wait(10), "no first snapshot"
        assert got[0]["run"]["done"] is False
        store.mark_done()
        t0 = time.monotonic()
        d.stop()
        stopped_in = time.monotonic() - t0
    finally:
        d.stop()
        store.close()
    reader.join(10)
    assert not reader.is_alive(), "the stream stayed open after stop()"
    assert [s["run"]["done"] for s in got] == [False, True]
    assert stopped_in < dashboard.STOP_FLUSH_S  # the stream ended; stop() did not time out


class _AlertSubscriber:
    """Logs in as the mesh's read-only `monitor` and collects microfed/<mesh>/alerts."""

    def __init__(self, host: str, port: int, mesh_dir: Path) -> None:
        cred = json.loads((mesh_dir / "monitor.mqtt").read_text())
        mesh = json.loads((mesh_dir / "mesh.json").read_text())["mesh"]
        self.got: list[dict] = []
        self.subscribed = threading.Event()
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id="test-monitor")
        c.username_pw_set(cred["username"], cred["password"])
        c.on_connect = lambda cl, *_a: cl.subscribe(f"microfed/{mesh}/alerts", 1)
        c.on_subscribe = lambda *_a: self.subscribed.set()
        c.on_message = lambda _c, _u, m: self.got.append(json.loads(m.payload))
        c.connect(host, port)
        c.loop_start()
        self.c = c

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def test_browser_sees_a_real_run_live(tmp_path: Path, micropython: str) -> None:
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} missing (Debian package chromium; ./dev installs it as root)")
    from playwright.sync_api import sync_playwright

    (tmp_path / "s.toml").write_text(SCENARIO)
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "microfed_tools.cli", "mesh", "run",
                             "--scenario", str(tmp_path / "s.toml"), "--dashboard", "0",
                             "--alerts", "mqtt", "--out", str(run)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    lines: list[str] = []
    url = None
    sub = None
    try:
        for line in proc.stdout:
            lines.append(line)
            m = re.search(r"broker: \S+ on (\S+):(\d+)", line)
            if m and sub is None:
                sub = _AlertSubscriber(m.group(1), int(m.group(2)), run / "mesh")
                assert sub.subscribed.wait(10), "".join(lines)
            m = re.search(r"dashboard: (http://\S+/)", line)
            if m:
                url = m.group(1)
            if url and sub:
                break
        assert url is not None and sub is not None, "".join(lines)
        reader = threading.Thread(target=lambda: lines.extend(proc.stdout or []), daemon=True)
        reader.start()
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url)
            # A marker a reload would wipe: everything below must arrive without one.
            page.evaluate("window.__noReload = 42")
            page.wait_for_function("document.querySelector('#live').textContent === 'live'",
                                   timeout=30_000)
            page.wait_for_selector("#rounds tbody tr[data-round]", timeout=120_000)
            first_rounds = page.locator("#rounds tbody tr[data-round]").count()
            assert first_rounds < 8, "the run was over before the page saw it"
            # The forged frames, rejected with their reason, as they come.
            page.wait_for_selector("#rejected-frames li[data-reason]", timeout=120_000)
            # Every node; the sign-flipper banned, with the reason.
            page.wait_for_selector("#nodes tbody tr.banned", timeout=180_000)
            page.wait_for_selector("#rounds tbody tr[data-round='8']", timeout=180_000)
            page.wait_for_function("document.querySelector('#run').textContent.includes('done')",
                                   timeout=60_000)
            assert page.evaluate("window.__noReload") == 42
            nodes = page.locator("#nodes tbody tr[data-node]").all_inner_texts()
            banned = page.locator("#nodes tbody tr.banned").evaluate_all(
                "rows => rows.map(r => r.dataset.node)")
            reasons = page.locator("#rejected-frames li[data-reason]").evaluate_all(
                "items => items.map(i => i.dataset.reason)")
            status = page.locator("#nodes tbody tr.banned td.status").first.inner_text()
            shots = os.environ.get("MICROFED_DASHBOARD_SHOTS")
            if shots:
                _screenshots(page, Path(shots))
            browser.close()
        proc.wait(timeout=300)
        reader.join(10)
    finally:
        if proc.poll() is None:
            proc.kill()
        if sub is not None:
            sub.close()
    assert proc.returncode == 0, "".join(lines)
    summary = json.loads((run / "summary.json").read_text())
    scenario = json.loads((run / "scenario.json").read_text())
    assert len(nodes) == len(scenario["honest_ids"]) + len(scenario["byzantine_ids"])
    assert banned == summary["banned"] and banned  # the sign-flipper
    assert "banned in round" in status
    assert set(reasons) <= set(summary["rejected"]) and reasons
    # The alerts came over MQTT too, the ban among them, with its evidence.
    time.sleep(1)
    bans = [a for a in sub.got if a["kind"] == "ban"] if sub else []
    assert [a["node"] for a in bans] == summary["banned"], sub.got if sub else None
    assert bans[0]["evidence"]["frames_sha256"]
    assert re.search(r"alerts: (\d+) delivered, 0 failed", "".join(lines))


def _screenshots(page: object, out: Path) -> None:
    """The main views, for docs/dashboard.md."""
    out.mkdir(parents=True, exist_ok=True)
    page.evaluate("window.scrollTo(0, 0)")  # type: ignore[attr-defined]
    page.screenshot(path=str(out / "overview.png"))  # type: ignore[attr-defined]
    for view in ("nodes", "rounds", "security"):
        page.locator(f"#{view}").screenshot(path=str(out / f"{view}.png"))  # type: ignore[attr-defined]


def test_the_page_needs_no_network(tmp_path: Path) -> None:
    # A Raspberry Pi in a greenhouse has no internet: the page loads nothing from elsewhere.
    static = dashboard.STATIC
    for f in static.iterdir():
        text = f.read_text()
        assert not re.search(r"(src|href)=\"(https?:)?//", text), f
        assert "http://" not in text and "https://" not in text, f
