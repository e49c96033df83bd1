"""An HTTP client of the service's API, for the command line (`trainingmgr jobs ...`) and the demo: it talks to a
running service over HTTP only, never to its database.

Reads are retried on connection errors and 502/503/504 (with backoff, honouring Retry-After); writes are sent once.
Errors come back as ClientError (the service answered 4xx or 5xx: its ProblemDetails `detail`) or Unreachable.
"""
from __future__ import annotations

import time
from pathlib import Path
from urllib.parse import quote
from typing import Any, Callable, Iterator

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

JOBS = "/ai-ml-model-training/v1/training-jobs"
FEATURE_GROUPS = "/ai-ml-model-training/v1/featureGroup"
ENDED = ("FINISHED", "FAILED", "CANCELLED")
AUTH_HINTS = {
    401: " (the service asks for a credential: pass --token or set TM_TOKEN)",
    403: " (the token's role may not do this)",
}


class ClientError(Exception):
    """The service answered with an error status."""

    def __init__(self, method: str, path: str, status: int, detail: str):
        super().__init__(f"{method} {path} answered {status}{AUTH_HINTS.get(status, '')}: {detail}")
        self.status = status
        self.detail = detail


class Unreachable(Exception):
    """The service could not be reached (refused, unknown host, timed out)."""


class TrainingManagerClient:
    def __init__(self, url: str, token: str | None = None, timeout: float = 10.0):
        self.base = url.rstrip("/")
        self.timeout = timeout
        self.http = requests.Session()
        retry = Retry(total=4, connect=4, read=2, backoff_factor=0.5, status_forcelist=(502, 503, 504),
                      allowed_methods=frozenset({"GET", "HEAD"}), respect_retry_after_header=True,
                      raise_on_status=False)
        self.http.mount("http://", HTTPAdapter(max_retries=retry))
        self.http.mount("https://", HTTPAdapter(max_retries=retry))
        if token:
            self.http.headers["Authorization"] = f"Bearer {token}"

    # ------------------------------------------------------------------ transport
    def call(self, method: str, path: str, expect: tuple[int, ...] = (200,), **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", self.timeout)
        try:
            response = self.http.request(method, self.base + path, **kwargs)
        except requests.ConnectionError as e:
            raise Unreachable(f"{self.base} cannot be reached: {e.__class__.__name__}") from None
        except requests.Timeout:
            raise Unreachable(f"{self.base} did not answer within {self.timeout:.0f} s") from None
        if response.status_code not in expect:
            raise ClientError(method, path, response.status_code, _detail(response))
        return response

    def get(self, path: str) -> Any:
        return self.call("GET", path).json()

    def pages(self, path: str, limit: int | None = None, key: str | None = None) -> Iterator[dict[str, Any]]:
        """The items of a paged list (the answer, or its member `key`), following its Link headers; at most
        `limit` of them."""
        seen = 0
        while path:
            response = self.call("GET", path)
            body = response.json()
            for item in body[key] if key else body:
                if limit is not None and seen >= limit:
                    return
                seen += 1
                yield item
            following = response.links.get("next", {}).get("url", "")
            path = following.removeprefix(self.base) if following else ""

    # ------------------------------------------------------------------ training jobs
    def jobs(self, limit: int | None = None) -> list[dict[str, Any]]:
        return list(self.pages(f"{JOBS}?limit={min(limit or 1000, 1000)}", limit))

    def job(self, job_id: int) -> dict[str, Any]:
        return self.get(f"{JOBS}/{job_id}")

    def create_job(self, body: dict[str, Any]) -> dict[str, Any]:
        return self.call("POST", JOBS, (201,), json=body).json()

    def cancel_job(self, job_id: int) -> dict[str, Any]:
        return self.call("POST", f"{JOBS}/{job_id}/cancel").json()

    def delete_job(self, job_id: int) -> None:
        self.call("DELETE", f"{JOBS}/{job_id}", (204,))

    def events(self, job_id: int) -> list[dict[str, Any]]:
        return list(self.pages(f"{JOBS}/{job_id}/events?limit=1000"))

    def log(self, job_id: int, offset: int | None = None) -> tuple[bytes, int, bool]:
        """The job's run output from `offset` (None: its last part): (bytes, where the next read starts, whether
        the job has ended and this was the end of it)."""
        response = self.call("GET", f"{JOBS}/{job_id}/logs" + ("" if offset is None else f"?offset={offset}"))
        return (response.content, int(response.headers.get("X-Log-Offset", "0")),
                response.headers.get("X-Log-Complete") == "true")

    def follow_log(self, job_id: int, interval: float = 1.0) -> Iterator[bytes]:
        """The job's run output as it grows, until the job has ended and all of it is read. It asks again every
        `interval` seconds from where it was (a broken connection loses nothing: reads are retried)."""
        offset = None
        while True:
            data, offset, complete = self.log(job_id, offset)
            if data:
                yield data
            if complete:
                return
            if not data:
                time.sleep(interval)

    def metrics(self, job_id: int) -> dict[str, Any]:
        return self.get(f"{JOBS}/get-model-metrics/{job_id}")

    def wait(self, job_id: int, timeout: float, on_change: Callable[[dict[str, Any]], None] = lambda job: None,
             interval: float = 0.5) -> dict[str, Any] | None:
        """Poll the job until it ends; the job then, or None when `timeout` seconds passed first. `on_change` sees
        the job each time its steps or waiting state changed."""
        deadline = time.monotonic() + timeout
        last = None
        while True:
            job = self.job(job_id)
            shown = (job["steps_state"], job.get("waiting"))
            if shown != last:
                on_change(job)
                last = shown
            if job["status"] in ENDED:
                return job
            if time.monotonic() >= deadline:
                return None
            time.sleep(min(interval, max(0.0, deadline - time.monotonic())))

    def download_model(self, job: dict[str, Any], target: Path,
                       progress: Callable[[int, int | None], None] = lambda done, total: None) -> int:
        """Stream the job's Model.zip into `target` (written whole or not at all); its size."""
        model = job["modelId"]
        path = (f"/model/{_segment(model['modelname'])}/{_segment(model['modelversion'])}/"
                f"{_segment(model['artifactversion'])}/Model.zip")
        response = self.call("GET", path, stream=True)
        total = int(response.headers["Content-Length"]) if response.headers.get("Content-Length") else None
        partial = target.with_name(target.name + ".part")
        done = 0
        try:
            with partial.open("wb") as f:
                for chunk in response.iter_content(64 * 1024):
                    f.write(chunk)
                    done += len(chunk)
                    progress(done, total)
            partial.replace(target)
        finally:
            response.close()
            partial.unlink(missing_ok=True)
        return done

    # ------------------------------------------------------------------ feature groups and pipelines
    def feature_groups(self, limit: int | None = None) -> list[dict[str, Any]]:
        return list(self.pages(f"{FEATURE_GROUPS}?limit={min(limit or 1000, 1000)}", limit, key="featuregroups"))

    def feature_group(self, name: str) -> dict[str, Any]:
        return self.get(f"{FEATURE_GROUPS}/{_segment(name)}")["featuregroup"]

    def create_feature_group(self, body: dict[str, Any]) -> dict[str, Any]:
        return self.call("POST", FEATURE_GROUPS, (201,), json=body).json()

    def delete_feature_groups(self, names: list[str]) -> dict[str, Any]:
        return self.call("DELETE", FEATURE_GROUPS, json={"featuregroups_list": [
            {"featureGroup_name": name} for name in names]}).json()

    def pipelines(self) -> list[dict[str, Any]]:
        return self.get("/pipelines").get("pipelines", [])

    def pipeline_versions(self, name: str) -> list[str]:
        return self.get(f"/pipelines/{_segment(name)}/versions")

    def upload_pipeline(self, name: str, file: Path, description: str = "") -> dict[str, Any]:
        with file.open("rb") as f:
            return self.call("POST", f"/pipelines/{_segment(name)}/upload", files={"file": (file.name, f)},
                             data={"description": description}).json()


def _segment(name: str) -> str:
    """A name as one URL path segment: `/`, `?`, `#`, `%` and spaces would change which route it reaches."""
    return quote(str(name), safe="")


def _detail(response: requests.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:500]
    if isinstance(body, dict) and body.get("detail"):
        return str(body["detail"])[:1000]
    return response.text[:500]
