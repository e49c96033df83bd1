"""The README's "first training job with curl" walk-through, run as written against a served instance (only the
service's address, the `TM=` line, is changed to the test server's)."""
from __future__ import annotations

import re
import subprocess
import zipfile

from tests.processes import assert_ready, free_port, served
from trainingmgr import PROJECT_ROOT

START, END = "<!-- walkthrough:start -->", "<!-- walkthrough:end -->"


def walkthrough() -> str:
    readme = (PROJECT_ROOT / "README.md").read_text()
    block = readme[readme.index(START) + len(START):readme.index(END)]
    script = re.fullmatch(r"\s*```sh\n(.*)```\s*", block, re.S)
    assert script, "the walk-through is one ```sh block between the markers"
    return script.group(1)


def test_the_readme_curl_walkthrough_trains_and_downloads_a_model(tmp_path):
    script = walkthrough()
    assert script.startswith("TM=http://localhost:32002\n")
    port = free_port()
    (tmp_path / "examples").symlink_to(PROJECT_ROOT / "examples")  # the commands run from the repository's folder
    with served(tmp_path, port, {"TM_DATA_DIR": str(tmp_path / "data"), "TM_DATABASE_URL": "",
                                 "TM_WORKERS": "1"}) as server:
        assert_ready(f"http://127.0.0.1:{port}", server, 120, tmp_path / "server.log")
        done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c",
                               script.replace("TM=http://localhost:32002", f"TM=http://127.0.0.1:{port}", 1)],
                              cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert '"status":"FINISHED"' in done.stdout, done.stdout
    assert '"featuregroup_name":"first_kpis"' in done.stdout
    assert '"DATA_EXTRACTION":' in done.stdout  # the status answer
    names = zipfile.ZipFile(tmp_path / "first_qoe-Model.zip").namelist()
    assert "model.joblib" in names, names
    assert "model.joblib" in done.stdout  # the listing printed by the last command
