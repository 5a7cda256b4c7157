"""report.html rendered in headless Chromium, driven through chromedriver's W3C WebDriver HTTP API (urllib).

Run it with ``make browser-test`` (it installs the Debian packages chromium and chromium-driver when
they are missing, then runs ``pytest -m browser``). Marked ``browser``: ``make test`` and
``make test-slow`` leave it out. Where Chromium is missing the test fails and says so; it never skips.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelfuse.bench.report import write_report
from tests.bench.test_report import _expected_plots, make_records

pytestmark = pytest.mark.browser

CHROMIUM = Path(os.environ.get("MODELFUSE_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("MODELFUSE_CHROMEDRIVER", "/usr/bin/chromedriver"))
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--window-size=1280,1000",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WebDriver:
    """The few W3C WebDriver commands this test needs, over HTTP to a chromedriver process."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.session: str | None = None

    def call(self, method: str, path: str, body: dict | None = None, timeout: float = 60) -> object:
        if self.session is not None:
            path = path.replace("{session}", self.session)
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return json.loads(resp.read())["value"]
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")
            raise AssertionError(
                f"chromedriver {method} {path} -> HTTP {err.code}: {detail[:2000]}"
            ) from None

    def script(self, source: str) -> object:
        return self.call("POST", "/session/{session}/execute/sync", {"script": source, "args": []})

    def browser_log(self) -> list[dict]:
        return self.call("POST", "/session/{session}/se/log", {"type": "browser"})


@pytest.fixture
def driver(tmp_path: Path) -> Iterator[WebDriver]:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.fail(
            f"the browser test needs Chromium and chromedriver; not found: {', '.join(missing)}. "
            "Run `make browser-test` (it installs the Debian packages chromium and chromium-driver "
            "with apt-get, then runs this test), or install them yourself: "
            "apt-get install -y chromium chromium-driver",
            pytrace=False,
        )
    port = _free_port()
    log = (tmp_path / "chromedriver.log").open("w")
    proc = subprocess.Popen([str(CHROMEDRIVER), f"--port={port}"], stdout=log, stderr=subprocess.STDOUT)
    wd = WebDriver(port)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if wd.call("GET", "/status", timeout=2).get("ready"):
                    break
            except (OSError, AssertionError):
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                pytest.fail(f"chromedriver did not start; see {tmp_path / 'chromedriver.log'}", pytrace=False)
            time.sleep(0.2)
        caps = {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": str(CHROMIUM),
                "args": [*ARGS, f"--user-data-dir={tmp_path / 'profile'}"],
            },
            "goog:loggingPrefs": {"browser": "ALL"},
        }
        value = wd.call("POST", "/session", {"capabilities": {"alwaysMatch": caps}}, timeout=120)
        wd.session = value["sessionId"]
        yield wd
    finally:
        if wd.session is not None:
            with contextlib.suppress(OSError, AssertionError):
                wd.call("DELETE", "/session/{session}", timeout=30)
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_report_renders_in_chromium(driver: WebDriver, tmp_path: Path) -> None:
    records = make_records()
    page = write_report(records, tmp_path / "report")
    driver.call("POST", "/session/{session}/url", {"url": page.resolve().as_uri()})
    deadline = time.monotonic() + 30
    while not driver.script(
        "return document.readyState === 'complete' && Array.from(document.images).every(i => i.complete)"
    ):
        assert time.monotonic() < deadline, "report.html did not finish loading in 30 s"
        time.sleep(0.2)

    # no console errors (read before the probe below adds one)
    errors = [e for e in driver.browser_log() if e.get("level") == "SEVERE"]
    assert errors == [], errors

    # every plot image decoded and laid out with a non-zero size
    images = driver.script(
        "return Array.from(document.querySelectorAll('figure.plot')).map(f => {"
        " const i = f.querySelector('img'); const r = i.getBoundingClientRect();"
        " return {suite: f.closest('section').dataset.suite, plot: f.dataset.plot,"
        " natural: [i.naturalWidth, i.naturalHeight], rendered: [r.width, r.height]}; })"
    )
    expected = _expected_plots(records)
    assert sorted((i["suite"], i["plot"]) for i in images) == sorted(
        (s, p) for s, plots in expected.items() for p in plots
    )
    for img in images:
        assert min(img["natural"]) > 0 and min(img["rendered"]) > 0, img

    # the summary table of each suite lists every method that ran
    listed = driver.script(
        "const out = {}; document.querySelectorAll('section.suite').forEach(s => {"
        " out[s.dataset.suite] = Array.from(s.querySelectorAll('table.summary tbody tr'))"
        ".map(r => r.dataset.method); }); return out;"
    )
    ran: dict[str, set[str]] = {}
    for r in records:
        if r["status"] == "ok":
            ran.setdefault(r["suite"], set()).add(r["name"])
    for suite, names in ran.items():
        assert names <= set(listed[suite]), (suite, names - set(listed[suite]))
    visible = driver.script(
        "return Array.from(document.querySelectorAll('table.summary tbody th.method'))"
        ".map(th => th.getBoundingClientRect().height > 0 ? th.textContent : null)"
    )
    assert None not in visible and "mean_probbest" in visible

    # nothing was fetched: the page is self-contained
    assert driver.script("return performance.getEntriesByType('resource').map(e => e.name)") == []

    # the console check can fail: an error logged now is seen
    driver.script("console.error('modelfuse probe')")
    assert any("modelfuse probe" in e.get("message", "") for e in driver.browser_log())
