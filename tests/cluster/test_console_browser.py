"""The operator console in a real browser (Debian's headless chromium, driven through
chromium-driver) against the real local cluster: the page shows six zones up; a killed
switch node shows as down and its shards move to the others; after a restart the zone
is up again. Payments flow meanwhile, so the charts have something to draw.

Screenshots go to the test's tmp dir, and the one with a zone down to
.state/console.png (git-ignored; docs/console.png is one of them, kept by hand).
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from clearinghouse.console.server import Console, ConsoleServer
from clearinghouse.localcluster import procs
from clearinghouse.localcluster.paths import repo_root
from tests.support import SwitchEnv

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(420)]

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
KILLED = "shanghai-b"
SCREENSHOT = repo_root() / ".state" / "console.png"
WINDOW = (1400, 1200)


@pytest.fixture()
def browser() -> Iterator[Any]:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} not installed: run `bash cluster/setup.sh` "
            "(it installs Debian's chromium and chromium-driver)"
        )
    try:
        from selenium import webdriver  # noqa: PLC0415 (a dev extra; fail here, not at import)
        from selenium.webdriver.chrome.options import Options  # noqa: PLC0415
        from selenium.webdriver.chrome.service import Service  # noqa: PLC0415
    except ImportError:
        pytest.fail("selenium is missing: run `bash cluster/setup.sh` (installs .[dev])")
    opts = Options()
    opts.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
    ):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture()
def console_url(switch_env: SwitchEnv) -> Iterator[str]:
    """The console served in-process on a free 127.0.0.1 port, sampling every second."""
    console = Console(switch_env.lc, interval_s=1.0, ring_every_s=20.0)
    server = ConsoleServer(console, "127.0.0.1", 0)
    console.start()
    try:
        yield server.url
    finally:
        server.close()
        console.close()


class Traffic:
    """Payments through every zone but the ones in ``avoid``, a few per second, bounded."""

    def __init__(self, env: SwitchEnv, limit: int = 5000) -> None:
        self.env, self.limit = env, limit
        self.avoid: set[str] = set()
        self.sent = self.failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="console-traffic", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        zones = self.env.lc.topo.zone_names()
        i = 0
        while not self._stop.is_set() and self.sent + self.failed < self.limit:
            live = [z for z in zones if z not in self.avoid]
            zone = live[i % len(live)]
            i += 1
            try:
                self.env.submit(zone, self.env.order())
                self.sent += 1
            except grpc.RpcError:
                self.failed += 1  # UNAVAILABLE while shards move; the page counts these
            self._stop.wait(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=40)


def wait_for(driver: Any, what: str, check: Callable[[Any], Any], timeout_s: float) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait  # noqa: PLC0415

    return WebDriverWait(driver, timeout_s, poll_frequency=0.5).until(
        check, f"the console never showed {what} within {timeout_s:.0f}s"
    )


def js(driver: Any, script: str) -> Any:
    return driver.execute_script(script)


def zones_up(driver: Any) -> Any:
    return js(driver, "return document.getElementById('zones-up').dataset.up || null")


def zone_state(driver: Any, zone: str) -> Any:
    return js(
        driver,
        f"const z = document.querySelector('.zone[data-zone=\"{zone}\"]');"
        "return z ? z.dataset.state : null;",
    )


def shards_served(driver: Any) -> int:
    v = js(driver, "return document.getElementById('shards-served').dataset.served || '0'")
    return int(v)


def verdict(driver: Any) -> Any:
    return js(driver, "return document.getElementById('health').dataset.verdict || null")


def cells_owned_by(driver: Any, zone: str) -> int:
    return int(js(driver, f"return document.querySelectorAll('g[data-owner=\"{zone}\"]').length"))


def total_rate(driver: Any) -> float:
    text = js(driver, "return document.querySelector('#rate-total b').textContent")
    try:
        return float(text)
    except (TypeError, ValueError):
        return 0.0


def test_console_shows_a_zone_go_down_and_come_back(
    switch_env: SwitchEnv, console_url: str, browser: Any, tmp_path: Path
) -> None:
    env = switch_env
    switch = env.lc.switch_managed(env.lc.topo.zone(KILLED))
    traffic = Traffic(env)
    try:
        browser.get(console_url)
        wait_for(browser, "six zones up", lambda d: zones_up(d) == "6", 60)
        wait_for(browser, "every shard served", lambda d: shards_served(d) == 128, 60)
        wait_for(browser, "health HEALTHY", lambda d: verdict(d) == "healthy", 30)
        assert zone_state(browser, KILLED) == "up"
        assert cells_owned_by(browser, KILLED) > 0
        wait_for(browser, "payments flowing", lambda d: total_rate(d) > 0, 60)
        browser.save_screenshot(str(tmp_path / "console-all-up.png"))

        traffic.avoid.add(KILLED)
        assert env.lc.kill(f"switch@{KILLED}") == [f"switch@{KILLED}"]
        wait_for(browser, f"{KILLED} down", lambda d: zone_state(d, KILLED) == "down", 30)
        assert zones_up(browser) == "5"
        # Its shards are owned again by the five others (lease TTL 5 s, then takeover).
        wait_for(
            browser,
            f"{KILLED}'s shards served by the others",
            lambda d: shards_served(d) == 128 and cells_owned_by(d, KILLED) == 0,
            90,
        )
        wait_for(browser, "payments flowing again", lambda d: total_rate(d) > 0, 60)
        assert verdict(browser) == "degraded"  # served by five zones, one down
        shot = tmp_path / "console-zone-down.png"
        assert browser.save_screenshot(str(shot))
        assert shot.stat().st_size < 1_000_000
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, SCREENSHOT)

        assert env.lc.start(f"switch@{KILLED}") == [f"switch@{KILLED}"]
        traffic.avoid.discard(KILLED)
        wait_for(browser, f"{KILLED} up again", lambda d: zone_state(d, KILLED) == "up", 60)
        wait_for(browser, "six zones up again", lambda d: zones_up(d) == "6", 60)
        wait_for(browser, "every shard served", lambda d: shards_served(d) == 128, 60)
        browser.save_screenshot(str(tmp_path / "console-recovered.png"))

        severe = [e for e in browser.get_log("browser") if e.get("level") == "SEVERE"]
        assert severe == [], f"the page logged errors: {severe}"
    finally:
        traffic.stop()
        if not procs.state(switch).alive:
            env.lc.start(f"switch@{KILLED}")
    assert traffic.sent > 0
