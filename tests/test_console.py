"""The web console in a real browser (headless Chromium through Selenium) against a real `trainingmgr serve`: pages
render, a job started through the API appears and reaches FINISHED on screen without a reload, the job page shows
its steps, events, metrics (table and chart) and log, Model.zip downloads, Cancel stops a running job, feature
groups show their token as ****, the pipelines page uploads a version; under TM_AUTH=token, the login, a reader
without writing controls and a writer with them.

Screenshots of each page go to test-output/console/ in the repository (git-ignored), overwritten by each run.
"""
from __future__ import annotations

import base64
import contextlib
import zipfile
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.browser import chromium, requires_chromium, script_errors, wait_until
from tests.processes import ready_server
from tests.test_training_lifecycle import FEATURES, RETRAINING_YAML, TRAINING_YAML, job_request, slow_pipeline
from trainingmgr import PROJECT_ROOT
from trainingmgr.adapters.api_tokens import add_token
from trainingmgr.adapters.base import RoleMap
from trainingmgr.client import JOBS, TrainingManagerClient

pytestmark = requires_chromium

SCREENSHOTS = PROJECT_ROOT / "test-output" / "console"
JOB_SECONDS = 120  # a training of the example on a loaded machine
INFLUX_TOKEN = "influx-secret-token-that-must-never-show"
HOSTILE_TEXT = '<img src=x onerror="document.title=\'pwned\'">'
ENDED = {"FINISHED", "FAILED", "CANCELLED"}


def serve_env(folder: Path, **extra: str) -> dict[str, str]:
    return {"TM_DATA_DIR": str(folder / "data"), "TM_WORKERS": "1", "TM_DATABASE_URL": "",
            "TM_WORKER_POLL_SECONDS": "0.1", **extra}


def prepare(api: TrainingManagerClient, folder: Path) -> None:
    """The example's feature group and pipelines, an InfluxDB feature group with a token, a slow pipeline."""
    api.create_feature_group({"featuregroup_name": "cell_kpis", "feature_list": FEATURES,
                              "datalake_source": "CsvSource", "measurement": "cell_kpis.csv", "enable_dme": False})
    api.create_feature_group({"featuregroup_name": "influx_kpis", "feature_list": FEATURES,
                              "datalake_source": "InfluxSource", "host": "10.20.30.40", "port": "8086",
                              "bucket": "pm", "db_org": "oran", "measurement": "cells", "token": INFLUX_TOKEN,
                              "enable_dme": False})
    api.upload_pipeline("qoe_training", TRAINING_YAML, "example training")
    api.upload_pipeline("qoe_retraining", RETRAINING_YAML, "example retraining")
    api.upload_pipeline("naps", slow_pipeline(folder, seconds=300), "sleeps five minutes")


@contextlib.contextmanager
def prepared_service(folder: Path, env: dict[str, str], token: str | None = None):
    """A served instance with prepare()'s data; its jobs still running are cancelled before it stops (runs are
    processes of their own, which outlive the server)."""
    with ready_server(folder, env) as url:
        api = TrainingManagerClient(url, token, timeout=30)
        try:
            prepare(api, folder)
            yield url, api
        finally:
            with contextlib.suppress(Exception):  # the server may be why the test failed
                for job in api.jobs():
                    if job["status"] not in ENDED:
                        with contextlib.suppress(Exception):  # it may end meanwhile (409)
                            api.cancel_job(job["id"])


def screenshot(driver: Any, name: str) -> Path:
    """The whole page (beyond the window) as test-output/console/<name>.png."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
    path = SCREENSHOTS / f"{name}.png"
    path.write_bytes(base64.b64decode(shot["data"]))
    print(f"screenshot: {path}")
    return path


def find(driver: Any, css: str) -> list[Any]:
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, css)


def text_of(driver: Any, css: str) -> str:
    """The first match's text, read in one script: the page swaps its live sections while the test reads (a
    WebElement found before a swap is stale after it)."""
    return driver.execute_script(
        "const e = document.querySelector(arguments[0]); return e ? e.innerText.trim() : '';", css)


def texts_of(driver: Any, css: str) -> list[str]:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0])).map(e => e.innerText.trim());", css)


def click(driver: Any, css: str, what: str | None = None) -> None:
    """Click the first match, found again if a live refresh replaced it meanwhile."""
    wait_until(lambda: find(driver, css)[0].click() or True, what or f"a click on {css}")


def status_on_screen(driver: Any, job_id: int) -> str:
    return text_of(driver, f"tr[data-job-id='{job_id}'] td.status")


def wait_for_status(api: TrainingManagerClient, job_id: int, statuses: set[str], seconds: float) -> dict[str, Any]:
    return wait_until(lambda: (job := api.job(job_id))["status"] in statuses and job,
                      f"job {job_id} to become one of {sorted(statuses)}", seconds)


def cancel_on_screen(driver: Any) -> None:
    """Click the job page's Cancel button and confirm."""
    click(driver, "#cancel-job", "the Cancel button")
    wait_until(lambda: driver.switch_to.alert, "the confirmation").accept()
    wait_until(lambda: text_of(driver, "#job-status") == "CANCELLED", "the job shown CANCELLED", 60)
    assert not find(driver, "#cancel-job"), "an ended job offers no Cancel"


# ---------------------------------------------------------------------------------------------- TM_AUTH=none
@pytest.fixture(scope="module")
def open_service(tmp_path_factory):
    folder = tmp_path_factory.mktemp("console")
    with prepared_service(folder, serve_env(folder)) as service:
        yield service


@pytest.fixture
def browser(tmp_path: Path):
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    with chromium(tmp_path, downloads=downloads) as driver:
        driver.downloads = downloads
        yield driver


def test_a_job_appears_and_finishes_on_screen_and_its_page_shows_everything(open_service, browser):
    url, api = open_service
    browser.get(f"{url}/")
    assert browser.current_url == f"{url}/console", "/ leads to the console"
    wait_until(lambda: text_of(browser, "#live-state") == "live", "the event stream to be open")
    browser.execute_script("window.notReloaded = true")  # gone if the page were loaded again

    request = job_request()
    request["training_config"]["description"] = HOSTILE_TEXT
    job_id = api.create_job(request)["id"]
    wait_until(lambda: status_on_screen(browser, job_id), f"job {job_id} to appear on the jobs page", 60)
    shown = wait_until(lambda: (status := status_on_screen(browser, job_id)) in ENDED and status,
                       f"job {job_id} to end on screen", JOB_SECONDS)
    assert shown == "FINISHED", api.job(job_id)["failure_reason"]
    assert browser.execute_script("return window.notReloaded") is True, "the page was not reloaded"
    row = f"tr[data-job-id='{job_id}']"
    assert text_of(browser, f"{row} .model") == "qoe" and text_of(browser, f"{row} .artifact") == "1.0.0"
    assert text_of(browser, f"{row} .duration") and text_of(browser, f"{row} .started")
    screenshot(browser, "jobs")

    click(browser, f"tr[data-job-id='{job_id}'] td.id a")
    wait_until(lambda: browser.current_url.endswith(f"/console/jobs/{job_id}"), "the job page")
    states = wait_until(lambda: texts_of(browser, "#steps-table tbody tr .state"), "the steps")
    assert states == ["FINISHED"] * 5
    assert len(texts_of(browser, "#events-table tbody tr")) >= 6, "creation and each step's moves"
    assert "DATA_EXTRACTION" in text_of(browser, "#events-table")
    metrics = text_of(browser, "#metrics-table")
    assert "r2" in metrics and "rmse" in metrics, metrics
    assert wait_until(lambda: browser.execute_script(CANVAS_DRAWN), "the metrics chart drawn")
    wait_until(lambda: text_of(browser, "#log-tail") not in ("", "loading…"), "the log tail (or 'no log')")
    assert find(browser, "#download-model") and not find(browser, "#cancel-job")
    assert HOSTILE_TEXT in text_of(browser, "#job-summary"), "a client's text is shown as text"
    assert browser.title != "pwned" and not find(browser, "main img")
    assert script_errors(browser) == []
    screenshot(browser, "job")

    click(browser, "#download-model")
    target = browser.downloads / "Model.zip"
    wait_until(lambda: target.exists() and not list(browser.downloads.glob("*.crdownload")), "Model.zip downloaded")
    with zipfile.ZipFile(target) as archive:
        assert archive.namelist(), "a zip with the model's files"
    assert target.stat().st_size == int(requests.head(f"{url}{model_path(api.job(job_id))}", timeout=30)
                                        .headers["Content-Length"])


CANVAS_DRAWN = """
const canvas = document.getElementById('metrics-chart');
if (!canvas || canvas.closest('[hidden]')) return false;
const pixels = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
for (let i = 3; i < pixels.length; i += 4) { if (pixels[i] !== 0) return true; }
return false;
"""


def model_path(job: dict[str, Any]) -> str:
    model = job["modelId"]
    return f"/model/{model['modelname']}/{model['modelversion']}/{model['artifactversion']}/Model.zip"


def test_the_new_job_form_creates_a_job(open_service, browser):
    from selenium.webdriver.support.ui import Select

    url, api = open_service
    browser.get(f"{url}/console")
    click(browser, "#new-job summary")
    find(browser, "#job-model-name")[0].send_keys("formed")
    Select(find(browser, "#job-feature-group")[0]).select_by_value("cell_kpis")
    Select(find(browser, "#job-pipeline")[0]).select_by_value("qoe_training")
    Select(find(browser, "#job-retraining-pipeline")[0]).select_by_value("qoe_retraining")
    find(browser, "#job-epochs")[0].send_keys("2")
    find(browser, "#job-description")[0].send_keys("made in the console")
    screenshot(browser, "new_job_form")
    click(browser, "#new-job-form button[type=submit]")
    wait_until(lambda: "/console/jobs/" in browser.current_url, "the new job's page")
    job_id = int(browser.current_url.rsplit("/", 1)[1])
    job = api.job(job_id)
    assert job["modelId"]["modelname"] == "formed" and job["training_config"]["description"] == "made in the console"
    assert job["training_config"]["dataPipeline"]["arguments"] == {"epochs": "2"}
    wait_for_status(api, job_id, ENDED, JOB_SECONDS)

    browser.get(f"{url}/console")
    click(browser, "#new-job summary")
    find(browser, "#job-model-name")[0].send_keys("formed")
    find(browser, "#job-model-version")[0].clear()
    find(browser, "#job-model-version")[0].send_keys("1/2")
    click(browser, "#new-job-form button[type=submit]")
    assert wait_until(lambda: text_of(browser, "#new-job-result.problem"), "the service's refusal shown")
    assert browser.current_url == f"{url}/console"


def test_cancel_stops_a_running_job(open_service, browser):
    url, api = open_service
    job_id = api.create_job(job_request("napping", pipeline="naps"))["id"]
    browser.get(f"{url}/console/jobs/{job_id}")
    wait_until(lambda: text_of(browser, "#live-state") == "live", "the event stream to be open")
    wait_until(lambda: text_of(browser, "#steps-table tr[data-step='TRAINING'] .state") == "IN_PROGRESS",
               "the run shown in progress", JOB_SECONDS)
    cancel_on_screen(browser)
    assert api.job(job_id)["status"] == "CANCELLED"
    assert "CANCELLED" in text_of(browser, "#events-table")
    browser.get(f"{url}/console")
    assert status_on_screen(browser, job_id) == "CANCELLED"
    screenshot(browser, "jobs")  # by now with the jobs of the tests before: finished and cancelled ones


def test_feature_groups_show_the_token_masked(open_service, browser):
    url, _ = open_service
    browser.get(f"{url}/console/featuregroups")
    assert text_of(browser, "tr[data-name='influx_kpis'] td.token") == "****"
    assert "cell_kpis" in text_of(browser, "#feature-groups-table")
    assert INFLUX_TOKEN not in browser.page_source
    screenshot(browser, "feature_groups")
    click(browser, "tr[data-name='influx_kpis'] a")
    wait_until(lambda: text_of(browser, "#feature-group dd.token") == "****", "the group's page")
    assert "10.20.30.40" in text_of(browser, "#feature-group") and INFLUX_TOKEN not in browser.page_source
    screenshot(browser, "feature_group")


def test_pipelines_list_their_versions_and_the_form_uploads_one(open_service, browser, tmp_path):
    url, api = open_service
    browser.get(f"{url}/console/pipelines")
    assert text_of(browser, "article[data-pipeline='qoe_training'] .version-name") == "qoe_training"
    before = api.pipeline_versions("qoe_retraining")
    find(browser, "#pipeline-name")[0].send_keys("qoe_retraining")
    find(browser, "#pipeline-file")[0].send_keys(str(RETRAINING_YAML))
    find(browser, "#pipeline-description")[0].send_keys(HOSTILE_TEXT)
    click(browser, "#upload-form button[type=submit]")
    wait_until(lambda: "uploaded" in text_of(browser, "#upload-result"), "the upload's answer")
    after = api.pipeline_versions("qoe_retraining")
    assert len(after) == len(before) + 1
    rows = wait_until(lambda: len(rows := find(browser, "article[data-pipeline='qoe_retraining'] tbody tr"))
                      == len(after) and rows, "the new version listed without a reload")
    assert HOSTILE_TEXT in rows[-1].text and browser.title != "pwned" and not find(browser, "main img")
    assert script_errors(browser) == []
    screenshot(browser, "pipelines")

    find(browser, "#pipeline-name")[0].send_keys("bad name!")
    find(browser, "#pipeline-file")[0].send_keys(str(RETRAINING_YAML))
    click(browser, "#upload-form button[type=submit]")
    wait_until(lambda: "Invalid pipeline name 'bad name!'" in text_of(browser, "#upload-result.problem"),
               "the service's refusal shown")


# ---------------------------------------------------------------------------------------------- TM_AUTH=token
@pytest.fixture(scope="module")
def token_service(tmp_path_factory):
    folder = tmp_path_factory.mktemp("console-token")
    tokens_file = folder / "api-tokens"
    tokens = {role: add_token(tokens_file, f"{role}-user", role, RoleMap()) for role in ("reader", "writer")}
    env = serve_env(folder, TM_AUTH="token", TM_AUTH_TOKENS_FILE=str(tokens_file))
    with prepared_service(folder, env, tokens["writer"]) as (url, api):
        yield url, api, tokens


def log_in(driver: Any, url: str, token: str) -> None:
    driver.get(f"{url}/console/login")
    find(driver, "#token")[0].send_keys(token)
    click(driver, "form button[type=submit]")


def test_login_reader_and_writer(token_service, browser):
    url, api, tokens = token_service
    job_id = api.create_job(job_request("guarded", pipeline="naps"))["id"]

    browser.get(f"{url}/console/jobs/{job_id}")
    wait_until(lambda: "/console/login" in browser.current_url, "a redirect to the login page")
    screenshot(browser, "login")
    log_in(browser, url, "tm_" + "x" * 43)
    assert "not valid" in wait_until(lambda: text_of(browser, "#login-error"), "the refusal")
    assert not browser.get_cookies(), "no cookie for a wrong token"

    log_in(browser, url, tokens["reader"])
    wait_until(lambda: browser.current_url.endswith("/console"), "the jobs page after logging in")
    [cookie] = browser.get_cookies()
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/"
    assert not browser.execute_script("return document.cookie"), "scripts cannot read the login"
    assert "reader-user" in text_of(browser, "header .principal")
    browser.get(f"{url}/console/jobs/{job_id}")
    wait_until(lambda: text_of(browser, "#live-state") == "live", "the event stream (authenticated by the cookie)")
    wait_until(lambda: text_of(browser, "#steps-table tr[data-step='TRAINING'] .state") == "IN_PROGRESS",
               "the run shown in progress", JOB_SECONDS)
    assert not find(browser, "#cancel-job"), "a reader is offered no Cancel"
    browser.get(f"{url}/console/pipelines")
    assert find(browser, "#pipelines article") and not find(browser, "#upload-form"), "nor an upload"

    # The cookie does not let another site's page write: same cookie, forged origin.
    session = requests.Session()
    session.cookies.set(cookie["name"], cookie["value"])
    cancel = f"{url}{JOBS}/{job_id}/cancel"
    assert session.post(cancel, headers={"Origin": "http://evil.example"}, timeout=30).status_code == 403
    assert session.post(cancel, timeout=30).status_code == 403, "no Origin, no Referer"
    assert session.post(cancel, headers={"Origin": url}, timeout=30).status_code == 403, "a reader's cookie"
    assert api.job(job_id)["status"] == "IN_PROGRESS"

    click(browser, "header form button")  # log out
    wait_until(lambda: "/console/login" in browser.current_url and not browser.get_cookies(), "logged out")
    log_in(browser, url, tokens["writer"])
    wait_until(lambda: browser.current_url.endswith("/console"), "the jobs page after logging in")
    browser.get(f"{url}/console/jobs/{job_id}")
    cancel_on_screen(browser)
    assert api.job(job_id)["status"] == "CANCELLED"
    assert not any(token in browser.page_source for token in tokens.values())
