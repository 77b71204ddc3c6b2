"""The live dashboard (rpg/dashboard): its JSON against the API's counts, the page in a real
headless Chromium (Debian's chromium and chromium-driver, driven by selenium) during a run and
after it, and a hub service's page refusing a wrong token. Screenshots go to ``artifacts/``
(or $RPG_TEST_ARTIFACTS)."""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request
from collections import Counter

import pytest

import rpg
from rpg import states

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
ARTIFACTS = os.environ.get("RPG_TEST_ARTIFACTS") or os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "artifacts")
needs_chromium = pytest.mark.skipif(
    not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)),
    reason="no Debian chromium + chromium-driver (apt-get install chromium chromium-driver; "
           ".ci/run does)")


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.load(r)


def api_url(dashboard_url: str, what: str = "state") -> str:
    base, _, query = dashboard_url.partition("?")
    return f"{base}api/{what}?{query}"


def by_state(units) -> dict[str, int]:
    return dict(Counter(u.state for u in units))


@pytest.fixture
def browser(tmp_path):
    pytest.importorskip("selenium", reason="selenium is in rpg's [test] extra")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                f"--user-data-dir={tmp_path / 'chromium'}", "--window-size=1300,1000"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


def wait_page(driver, cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = cond()
        except Exception:  # the page is being redrawn: elements come and go
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s; page text: "
                                 f"{driver.find_element('tag name', 'body').text[:2000]}")
        time.sleep(0.1)


def page_counts(driver) -> dict[str, int]:
    out = {}
    for st in ("NEW", "BOUND", "STAGING_IN", "SCHEDULING", "EXECUTING", "STAGING_OUT", "DONE",
               "FAILED", "CANCELED"):
        n = int(driver.find_element("id", f"count-{st}").text)
        if n:
            out[st] = n
    return out


@needs_chromium
@pytest.mark.timeout(120)
def test_the_page_in_chromium_during_and_after_a_run(tmp_path, browser):
    os.makedirs(ARTIFACTS, exist_ok=True)
    with rpg.Session(sandbox=str(tmp_path / "s"), dashboard="127.0.0.1:0") as session:
        url = session.dashboard_url
        assert url.startswith("http://127.0.0.1:") and "token=" in url
        pmgr = rpg.PilotManager(session)
        pilot = pmgr.submit_pilots(rpg.PilotDescription(resource="local", cores=2))
        umgr = rpg.UnitManager(session)
        umgr.add_pilots(pilot)
        units = umgr.submit_units(
            [rpg.UnitDescription(executable="/bin/sleep", arguments=["0.05"])
             for _ in range(300)]
            + [rpg.UnitDescription(executable="/bin/sh", arguments=["-c", "exit 3"])
               for _ in range(2)]
            + [rpg.UnitDescription(executable="/bin/sh", arguments=[
                "-c", "for i in 1 2 3; do echo tail-line-$i; done"])])
        browser.get(url)
        # during the run: the session, the pilot, units moving
        wait_page(browser, lambda: browser.find_element("class name", "session-uid").text
                  == session.uid, 20, "the session uid")
        wait_page(browser, lambda: browser.find_elements(
            "css selector", f"tr[data-pilot='{pilot.uid}']"), 20, "the pilot's row")
        running = wait_page(browser, lambda: int(browser.find_element(
            "id", "count-EXECUTING").text) > 0 and page_counts(browser), 30, "units executing")
        assert sum(running.values()) == 303, running
        browser.save_screenshot(os.path.join(ARTIFACTS, "dashboard-during.png"))
        assert umgr.wait_units(timeout=90) is not None
        api = by_state(units)
        assert api == {states.DONE: 301, states.FAILED: 2}, api
        # after it: what a person sees matches the API, and the failure says why
        wait_page(browser, lambda: page_counts(browser) == api, 15, f"counts {api}")
        reasons = [e.text for e in browser.find_elements("css selector", "tr.failure .reason")]
        assert reasons and all("exit code 3" in r for r in reasons), reasons
        row = browser.find_element("css selector", f"tr[data-pilot='{pilot.uid}']").text
        assert "ACTIVE" in row and "local" in row, row
        assert browser.find_element("id", "units-total").text == "303"
        # the tail of a selected unit's output
        browser.find_element("id", "tail-unit").send_keys(units[-1].uid)
        browser.find_element("css selector", "#tail-form button").click()
        wait_page(browser, lambda: "tail-line-3" in browser.find_element("id", "tail").text
                  and "(ended)" in browser.find_element("id", "tail-state").text, 15,
                  "the unit's output in the page")
        assert browser.find_element("id", "tail").text.split() == [
            "tail-line-1", "tail-line-2", "tail-line-3"]
        png = os.path.join(ARTIFACTS, "dashboard-after.png")
        browser.save_screenshot(png)
        assert os.path.getsize(png) > 10_000
        served = session.hub.dashboard.served
        assert served >= 2  # the first state, then the stream
    # the session closed: the page says it lost the stream, it does not hang
    wait_page(browser, lambda: "disconnected" in browser.find_element("id", "status").text,
              15, "the page noticing the end")


@pytest.mark.timeout(120)
def test_the_json_matches_the_api_at_10000_units(tmp_path):
    with rpg.Session(sandbox=str(tmp_path / "s"), dashboard="127.0.0.1:0") as session:
        umgr = rpg.UnitManager(session)  # no pilot yet: they wait, unbound
        units = umgr.submit_units([rpg.UnitDescription(executable="/bin/true")
                                   for _ in range(10_000)])
        umgr.cancel_units([u.uid for u in units[:3000]])
        umgr.wait_units([u.uid for u in units[:3000]], timeout=60)
        pmgr = rpg.PilotManager(session)
        pilot = pmgr.submit_pilots(rpg.PilotDescription(resource="local", cores=2))
        umgr.add_pilots(pilot)
        umgr.wait_units([u.uid for u in units[3000:3500]], timeout=60)
        mid = get_json(api_url(session.dashboard_url))["sessions"][0]["units"]
        assert sum(mid["by_state"].values()) == mid["total"] == 10_000, mid
        umgr.cancel_units([u.uid for u in units[3500:]])
        umgr.wait_units(timeout=60)
        api = by_state(units)
        snap = get_json(api_url(session.dashboard_url))["sessions"][0]
        assert snap["units"]["by_state"] == api, (snap["units"], api)
        assert snap["units"]["total"] == 10_000
        assert api[states.CANCELED] >= 3000 and api[states.DONE] >= 500, api
        assert snap["session"] == session.uid
        assert [p["uid"] for p in snap["pilots"]] == [pilot.uid]
        assert set(snap["loop"]) >= {"lag_p99_ms", "blocked_events"}


def test_wrong_tokens_and_bad_addresses_are_refused(tmp_path):
    with pytest.raises(rpg.SessionError, match="dashboard: must be 'HOST:PORT'"):
        rpg.Session(sandbox=str(tmp_path / "a"), dashboard="nowhere")
    with rpg.Session(sandbox=str(tmp_path / "s"), dashboard="127.0.0.1:0") as session:
        base = session.dashboard_url.split("?")[0]
        for query in ("", "?token=", "?token=wrong", "?token=" + "x" * 5000):
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(base + "api/state" + query, timeout=10)
            assert err.value.code == 403
            assert "token" in json.loads(err.value.read())["error"]
            err.value.close()
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(base + "etc/passwd", timeout=10)
        assert err.value.code == 404
        err.value.close()
        with urllib.request.urlopen(base, timeout=10) as r:
            page = r.read().decode()
        assert "rpg dashboard" in page and session.uid not in page  # no data without a token
        assert session.hub.dashboard.refused == 4
        taken = session.dashboard_url.split("/")[2]
        with pytest.raises(rpg.SessionError, match="cannot listen there"):
            rpg.Session(sandbox=str(tmp_path / "b"), dashboard=taken)


@pytest.mark.timeout(90)
def test_a_hub_service_page_shows_a_user_their_own_sessions(tmp_path):
    from tests.hub_fixture import HubProcess

    hub = HubProcess(str(tmp_path / "hub"), "--dashboard", "127.0.0.1:0")
    try:
        m = re.search(rb"dashboard at (http://127\.0\.0\.1:\d+/)", hub.log())
        assert m, hub.log()
        base = m.group(1).decode()
        alice, bob = hub.token_for("alice"), hub.token_for("bob")
        with rpg.Session(hub=alice) as a, rpg.Session(hub=bob) as b:
            assert a.dashboard_url.startswith(base) and f"session={a.uid}" in a.dashboard_url
            mine = get_json(api_url(a.dashboard_url))["sessions"]
            assert [s["session"] for s in mine] == [a.uid]
            # alice's token alone: her sessions, never bob's
            token_a = json.load(open(alice))["token"]
            seen = [s["session"] for s in get_json(f"{base}api/state?token={token_a}")
                    ["sessions"]]
            assert seen == [a.uid] and b.uid not in seen
            owner = hub.access["token"]
            everyone = {s["session"] for s in get_json(f"{base}api/state?token={owner}")
                        ["sessions"]}
            assert everyone == {a.uid, b.uid}
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(f"{base}api/state?token=not-a-token", timeout=10)
            assert err.value.code == 403
            err.value.close()
        with pytest.raises(rpg.SessionError, match="one dashboard for all its sessions"):
            rpg.Session(hub=alice, dashboard="127.0.0.1:0")
    finally:
        assert hub.stop() == 0, hub.log().decode()[-2000:]
