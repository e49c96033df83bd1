"""Headless Chromium driven by Selenium through Debian's chromedriver, for the browser tests. Without chromium and
chromedriver those tests are skipped, except under CI=true, where they fail (.ci/run installs both)."""
from __future__ import annotations

import contextlib
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
BROWSER_SECONDS = 60  # each wait for a page; generous for a loaded machine

requires_chromium = pytest.mark.skipif(
    (CHROMIUM is None or CHROMEDRIVER is None) and os.environ.get("CI", "").lower() != "true",
    reason="Chromium and chromedriver are not installed (Debian packages chromium, chromium-driver; .ci/run installs "
           "them)",
)


@contextlib.contextmanager
def chromium(folder: Path, *, downloads: Path | None = None, size: str = "1400,1000") -> Iterator[Any]:
    """A Selenium driver of headless Chromium (profile and driver log in `folder`; files it downloads go to
    `downloads`), stopped on leaving, also when the test failed."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    assert CHROMIUM and CHROMEDRIVER, "Chromium and chromedriver are required under CI"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     f"--user-data-dir={folder / 'profile'}", f"--window-size={size}"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the console's messages: script_errors()
    if downloads is not None:
        options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                                  "download.prompt_for_download": False})
    service = Service(executable_path=CHROMEDRIVER, log_output=str(folder / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        driver.set_page_load_timeout(BROWSER_SECONDS)
        if downloads is not None:
            driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
        yield driver
    finally:
        driver.quit()  # stops Chromium and chromedriver


def wait_until(condition: Callable[[], Any], what: str, seconds: float = BROWSER_SECONDS) -> Any:
    """The first truthy value of `condition()`, asked until `seconds` pass; any error it raises counts as "not yet"
    (an element not there yet, replaced meanwhile, a page still loading ...). Fails naming `what` and the last
    error."""
    deadline = time.monotonic() + seconds
    last_error: BaseException | None = None
    while True:
        try:
            value = condition()
            if value:
                return value
        except Exception as e:  # noqa: BLE001 - every kind of error means "not yet"
            last_error = e
        if time.monotonic() >= deadline:
            raise AssertionError(f"not within {seconds:.0f} s: {what} (last error: {last_error!r})")
        time.sleep(0.25)


def script_errors(driver: Any) -> list[str]:
    """What the page's console said since the last call of scripts that failed or that the page's
    Content-Security-Policy blocked."""
    return [entry["message"] for entry in driver.get_log("browser")
            if "Content Security Policy" in entry["message"] or "Uncaught" in entry["message"]]
