"""Headless Debian Chromium driven by selenium, for the page tests (skipped, saying why,
where chromium, chromedriver or selenium is missing)."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

# As this machine's Chromium needs them: no sandbox as root, no GPU, and none of the
# background connections a closed network refuses (they slow start-up).
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage"]


@contextlib.contextmanager
def headless_chromium(profile: Path, window: tuple[int, int]) -> Iterator[object]:
    """A selenium Chrome driver of Debian's chromium with a fresh `profile` folder and a
    `window` of (width, height) CSS pixels; quit on exit."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("Debian's chromium and chromium-driver are not installed "
                    "(apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROME_FLAGS + [f"--window-size={window[0]},{window[1]}", f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    b = webdriver.Chrome(service=Service(executable_path=driver), options=options)
    b.set_page_load_timeout(60)
    try:
        yield b
    finally:
        b.quit()
