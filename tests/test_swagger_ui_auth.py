"""Swagger UI's Authorize button against a token-protected service, in a real browser (headless Chromium driven by
Selenium through Debian's chromedriver): "Try it out" on a protected operation answers 401 before authorizing and
200 after, and open operations need nothing."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.browser import BROWSER_SECONDS, chromium, requires_chromium
from tests.processes import ready_server

pytestmark = requires_chromium


@pytest.fixture
def browser(tmp_path: Path):
    with chromium(tmp_path) as driver:
        yield driver


def try_it_out(driver, operation_id: str) -> str:
    """Expand the operation, Try it out, Execute; the status code of the live response."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, BROWSER_SECONDS)
    block = wait.until(ready.presence_of_element_located((By.CSS_SELECTOR, f"[id$='-{operation_id}']")))
    if "is-open" not in block.get_attribute("class"):
        block.find_element(By.CSS_SELECTOR, ".opblock-summary").click()
    try_button = wait.until(lambda d: block.find_elements(By.CSS_SELECTOR, ".try-out__btn"))[0]
    if "cancel" not in try_button.get_attribute("class"):
        try_button.click()
    for clear in block.find_elements(By.CSS_SELECTOR, ".btn-clear"):  # the answer of an earlier Execute
        clear.click()
    wait.until(lambda d: not block.find_elements(By.CSS_SELECTOR, ".live-responses-table"))
    wait.until(lambda d: block.find_elements(By.CSS_SELECTOR, ".execute"))[0].click()
    status = wait.until(lambda d: block.find_elements(By.CSS_SELECTOR, ".live-responses-table tr.response .response-col_status"))
    return status[0].text.strip().split()[0]


def test_authorize_in_swagger_ui_sends_the_token(tmp_path: Path, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    env = {"TM_DATA_DIR": str(tmp_path / "data"), "TM_WORKERS": "1", "TM_DATABASE_URL": "", "TM_AUTH": "token"}
    made = subprocess.run([sys.executable, "-m", "trainingmgr", "auth", "add-token", "swagger", "reader"],
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    with ready_server(tmp_path, env) as url:
        browser.get(f"{url}/apidocs")
        wait = WebDriverWait(browser, BROWSER_SECONDS)
        assert try_it_out(browser, "listPipelines") == "401"
        assert try_it_out(browser, "healthz") == "200", "an open operation needs no credential"

        wait.until(ready.element_to_be_clickable((By.CSS_SELECTOR, ".auth-wrapper .authorize"))).click()
        dialog = wait.until(ready.visibility_of_element_located((By.CSS_SELECTOR, ".modal-ux")))
        assert "bearer" in dialog.text
        dialog.find_element(By.CSS_SELECTOR, "input[type=text], input[type=password]").send_keys(f"Bearer {token}")
        dialog.find_element(By.CSS_SELECTOR, ".auth-btn-wrapper .authorize").click()
        wait.until(lambda d: dialog.find_elements(By.CSS_SELECTOR, ".auth-btn-wrapper .btn-done"))[0].click()

        assert try_it_out(browser, "listPipelines") == "200"
    log = (tmp_path / "server.log").read_text()
    assert '"path": "/pipelines", "status": 401' in log and '"path": "/pipelines", "status": 200' in log
