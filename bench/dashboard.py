"""The dashboard's cost: N null units (/bin/true) on a local pilot with the dashboard page open
in headless Chromium (its event stream live), against the same run without a dashboard, both
in this run, alternated (without, with, stream only, ...) so that drift shows. "stream only"
reads the page's event stream with a plain HTTP client: the hub's own cost, without Chromium
competing for the machine's cores.

    python bench/dashboard.py [--units 10000] [--cores 8] [--rounds 2] [--json]

Prints, for each mode, units/s end to end and the hub loop's lag p99 (LoopWatch), and the
ratios with/without (goal: within 10 %). Needs Debian's chromium and chromium-driver, and
selenium (rpg's [test] extra).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import rpg
from bench._common import emit


def browser(profile: str):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                f"--user-data-dir={profile}"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)


class StreamReader:
    """The page's event stream read by a plain HTTP client (no browser): the hub's own cost."""

    def __init__(self) -> None:
        self.events = 0
        self._stop = False
        self._t: threading.Thread | None = None

    def get(self, url: str) -> None:
        base, _, query = url.partition("?")

        def read() -> None:
            with urllib.request.urlopen(f"{base}api/stream?{query}", timeout=30) as r:
                for line in r:
                    if line.startswith(b"data: "):
                        self.events += 1
                    if self._stop:
                        return

        self._t = threading.Thread(target=read, daemon=True)
        self._t.start()

    def find_element(self, *_a):  # what run() asks of a browser
        reader = self

        class Body:
            def get_attribute(self, _name):
                return str(reader.events)
        return Body()

    def close(self) -> None:
        self._stop = True
        if self._t is not None:
            self._t.join(5)


def run(units: int, cores: int, sandbox: str, driver=None) -> dict:
    with rpg.Session(sandbox=sandbox, dashboard="127.0.0.1:0" if driver else None) as session:
        pmgr = rpg.PilotManager(session)
        pilot = pmgr.submit_pilots(rpg.PilotDescription(cores=cores, runtime=30))
        umgr = rpg.UnitManager(session)
        umgr.add_pilots(pilot)
        assert pilot.wait(state="ACTIVE", timeout=30) == "ACTIVE", pilot.reason
        if driver is not None:
            driver.get(session.dashboard_url)
            deadline = time.monotonic() + 20
            while driver.find_element("tag name", "body").get_attribute("data-updates") in (
                    None, "0") and time.monotonic() < deadline:
                time.sleep(0.05)
        t1 = time.perf_counter()
        us = umgr.submit_units([rpg.UnitDescription(executable="/bin/true")
                                for _ in range(units)])
        umgr.wait_units(timeout=900)
        dt = time.perf_counter() - t1
        done = sum(u.state == "DONE" for u in us)
        loop = session.hub.stats()["loop"]
        updates = int(driver.find_element("tag name", "body").get_attribute("data-updates")
                      or 0) if driver is not None else 0
        streamed = session.hub.dashboard.served if driver is not None else 0
        if isinstance(driver, StreamReader):
            driver.close()
    return {"units_per_s": done / dt, "lag_p99_ms": loop["lag_p99_ms"],
            "blocked": loop["blocked_events"], "page_updates": updates, "served": streamed,
            "done": done}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--units", type=int, default=10000)
    ap.add_argument("--cores", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    without, with_, stream = [], [], []
    with tempfile.TemporaryDirectory() as d:
        driver = browser(os.path.join(d, "chromium"))
        try:
            for i in range(a.rounds):
                without.append(run(a.units, a.cores, os.path.join(d, f"off{i}")))
                with_.append(run(a.units, a.cores, os.path.join(d, f"on{i}"), driver))
                stream.append(run(a.units, a.cores, os.path.join(d, f"sse{i}"),
                                  StreamReader()))
        finally:
            driver.quit()

    def med(rows, key):
        return statistics.median(r[key] for r in rows)

    r = {"units": a.units, "rounds": a.rounds,
         "without_units_per_s": med(without, "units_per_s"),
         "with_units_per_s": med(with_, "units_per_s"),
         "without_lag_p99_ms": med(without, "lag_p99_ms"),
         "with_lag_p99_ms": med(with_, "lag_p99_ms"),
         "with_page_updates": med(with_, "page_updates"),
         "stream_only_units_per_s": med(stream, "units_per_s"),
         "stream_only_lag_p99_ms": med(stream, "lag_p99_ms"),
         "blocked_events": sum(x["blocked"] for x in without + with_)}
    r["ratio_throughput_with_vs_without"] = r["with_units_per_s"] / r["without_units_per_s"]
    r["ratio_lag_p99_with_vs_without"] = r["with_lag_p99_ms"] / max(1e-6,
                                                                    r["without_lag_p99_ms"])
    r["ratio_throughput_stream_only_vs_without"] = (r["stream_only_units_per_s"]
                                                    / r["without_units_per_s"])
    r["ratio_lag_p99_stream_only_vs_without"] = (r["stream_only_lag_p99_ms"]
                                                 / max(1e-6, r["without_lag_p99_ms"]))
    emit("dashboard", r, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
