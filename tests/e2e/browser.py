"""The browser check: headless Debian Chromium, driven by Playwright, clicks through the UI.

Playwright never downloads a browser here: it drives /usr/bin/chromium (Debian's package) with
the flags this machine's closed network needs.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def require_chromium() -> None:
    """Skip only outside CI, and say why; in CI a missing browser is a failure."""
    if CHROMIUM.exists():
        return
    message = f"{CHROMIUM} is missing (apt-get install chromium; .ci/run installs it)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def launch_from_ui(url: str, location: str, jobs: list[str], job: str, shots: Path,
                   run_status: Callable[[str], str]) -> str:
    """Open the UI, see every job, launch ``job`` from its launchpad, see the run succeed.
    Returns the run id; screenshots go to ``shots``."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import expect, sync_playwright

    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                    args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.set_default_timeout(60_000)
            page.goto(f"{url}/jobs")
            # A fresh instance greets a first visitor with a community dialog: dismiss it.
            skip = page.get_by_role("button", name="Skip")
            with contextlib.suppress(PlaywrightTimeout):
                skip.click(timeout=10_000)
            for name in jobs:
                link = page.locator(f'a[href$="/locations/{location}/jobs/{name}"]').first
                expect(link).to_be_visible(timeout=30_000)
                expect(link).to_contain_text(name)
            page.screenshot(path=str(shots / "1-jobs.png"), full_page=True)

            page.goto(f"{url}/locations/{location}/jobs/{job}/playground")
            launch = page.get_by_role("button", name=re.compile(r"Launch Run$", re.I))
            expect(launch).to_be_enabled(timeout=30_000)
            page.screenshot(path=str(shots / "2-launchpad.png"))
            launch.click()
            page.wait_for_url(re.compile(r".*/runs/[0-9a-f-]{36}.*"))
            run_id = re.search(r"/runs/([0-9a-f-]{36})", page.url).group(1)  # type: ignore[union-attr]

            # The run page updates live; wait for the run to finish, then for the page to say so.
            expect(page.get_by_text("Success", exact=True).first).to_be_visible(timeout=120_000)
            assert run_status(run_id) == "SUCCESS"
            page.screenshot(path=str(shots / "3-run-succeeded.png"), full_page=True)
            return run_id
        finally:
            browser.close()
