"""The framework's dashboard, played by a page of a second origin in a real browser (headless Chromium): it lists
feature groups, creates a training job with a JSON body (a preflighted request) and reads the job's status through
fetch(). With CORS off, the browser blocks those calls.

The page is served by a small local HTTP server (a stand-in for the dashboard's own web server); the Training
Manager is the real one (`trainingmgr serve`)."""
from __future__ import annotations

import json
import os
import queue
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from tests.processes import assert_ready, free_port, served, started
from trainingmgr import PROJECT_ROOT

PAGE = Path(__file__).with_name("dashboard_page.html")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
BROWSER_SECONDS = 90

pytestmark = pytest.mark.skipif(
    CHROMIUM is None and os.environ.get("CI", "").lower() != "true",
    reason="Chromium is not installed (Debian package chromium; .ci/run installs it)",
)


class PageServer:
    """Serves the page on its own origin and receives what the page saw (POST /result)."""

    def __init__(self) -> None:
        self.results: queue.Queue[dict] = queue.Queue()
        results = self.results

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                body = PAGE.read_bytes()
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                results.put(json.loads(self.rfile.read(length) or b"{}"))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "PageServer":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def browse(url: str, profile: Path, log: Path):
    """Headless Chromium on `url`, stopped on leaving."""
    assert CHROMIUM, "Chromium is required under CI (apt-get install chromium)"
    return started(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", f"--user-data-dir={profile}", url],
        log_path=log, stop_timeout=10)


@pytest.mark.parametrize("cors_origins, allowed", [("*", True), ("page", True), ("", False),
                                                   ("http://elsewhere.example", False)])
def test_a_page_of_another_origin_reads_and_writes_through_fetch(tmp_path, cors_origins, allowed):
    port = free_port()
    api = f"http://127.0.0.1:{port}"
    with PageServer() as page:
        origin = f"http://127.0.0.1:{page.port}"  # another port: another origin
        env = {"TM_DATA_DIR": str(tmp_path / "data"), "TM_DATABASE_URL": "", "TM_WORKERS": "1",
               "TM_CORS_ORIGINS": origin if cors_origins == "page" else cors_origins}
        with served(tmp_path, port, env) as server:
            assert_ready(api, server, 120, tmp_path / "server.log")
            body = {"featuregroup_name": "browser_kpis", "feature_list": "prbUsageDl,prbUsageUl,throughputDl",
                    "datalake_source": "CsvSource", "measurement": "cell_kpis.csv", "enable_dme": False}
            assert requests.post(f"{api}/ai-ml-model-training/v1/featureGroup", json=body, timeout=30).ok
            for name, file in (("qoe_training", "qoe_training.yaml"), ("qoe_retraining", "qoe_retraining.yaml")):
                with (PROJECT_ROOT / "examples" / "pipelines" / file).open("rb") as f:
                    assert requests.post(f"{api}/pipelines/{name}/upload", files={"file": f}, timeout=30).ok
            with browse(f"{origin}/?api={api}", tmp_path / "profile", tmp_path / "chromium.log"):
                try:
                    result = page.results.get(timeout=BROWSER_SECONDS)
                except queue.Empty:
                    raise AssertionError("the page reported nothing: " +
                                         (tmp_path / "chromium.log").read_text(errors="replace")[-2000:]) from None
            jobs = requests.get(f"{api}/ai-ml-model-training/v1/training-jobs", timeout=30).json()
    if allowed:
        assert result["ok"], result
        seen = result["seen"]
        assert seen["groups"] == ["browser_kpis"]
        assert seen["requestId"]  # an exposed header
        assert seen["createStatus"] == 201 and seen["location"].startswith("/ai-ml-model-training/v1/training-jobs/")
        assert seen["createRequestId"] == "browser-test-1"  # the preflight allowed the header, the answer exposes it
        assert seen["steps"] == ["DATA_EXTRACTION", "DATA_EXTRACTION_AND_TRAINING", "TRAINING",
                                 "TRAINING_AND_TRAINED_MODEL", "TRAINED_MODEL"]
        assert [job["modelId"]["modelname"] for job in jobs] == ["browser_qoe"]
    else:
        assert not result["ok"] and "Failed to fetch" in result["error"], result
        assert jobs == []  # the preflight failed: the browser never sent the POST
