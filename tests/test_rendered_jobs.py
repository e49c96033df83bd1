"""The job lists assemble their answers from each job as last rendered (api/rendered_jobs.py): a job that changed
is rendered again, one that did not comes from what was rendered, and the answer is the same either way."""
from __future__ import annotations

from datetime import timedelta

from tests.test_training_lifecycle import JOBS, job_request, setup  # noqa: F401
from trainingmgr.api.rendered_jobs import RenderedJobs
from trainingmgr.extensions import db
from trainingmgr.models import TrainingJob
from trainingmgr.models import lifecycle as lc
from trainingmgr.models.lifecycle import JobStateMachine


def rendered_of(app) -> RenderedJobs:
    return app.extensions["trainingmgr_rendered_jobs"]


def listed(client, url: str = JOBS) -> list[dict]:
    answer = client.get(url)
    assert answer.status_code == 200 and answer.mimetype == "application/json", answer.get_data()
    return answer.get_json()


def one_by_one(client, jobs: list[dict]) -> list[dict]:
    return [client.get(f"{JOBS}/{job['id']}").get_json() for job in jobs]


def test_a_listed_job_is_rendered_again_after_each_change_and_only_then(setup, app):
    client = setup
    ids = [client.post(JOBS, json=job_request()).get_json()["id"] for _ in range(3)]
    first = listed(client)
    assert [job["id"] for job in first] == ids[::-1]
    assert first == one_by_one(client, first), "as GET of each job answers"
    cache = rendered_of(app)
    before = {job_id: cache.get(job_id, cache._entries[job_id][0]) for job_id in ids}

    with app.app_context():
        job = db.session.get(TrainingJob, ids[1])
        JobStateMachine(db.session).move(job, (lc.DATA_EXTRACTION, lc.IN_PROGRESS))
        db.session.commit()
    second = listed(client)
    changed = next(job for job in second if job["id"] == ids[1])
    assert changed["steps_state"][lc.DATA_EXTRACTION] == lc.IN_PROGRESS and changed["started_at"]
    assert changed["status"] == lc.IN_PROGRESS
    assert second == one_by_one(client, second)
    # The jobs that did not change were not rendered again: the very same bytes serve.
    for job_id in (ids[0], ids[2]):
        assert cache.get(job_id, cache._entries[job_id][0]) is before[job_id]
    assert cache.get(ids[1], cache._entries[ids[1]][0]) is not before[ids[1]]

    # A job cancelled (a write through the API) and one deleted: the list says so at once.
    assert client.post(f"{JOBS}/{ids[2]}/cancel").status_code == 200
    assert client.delete(f"{JOBS}/{ids[0]}").status_code == 204
    third = listed(client)
    assert [job["id"] for job in third] == [ids[2], ids[1]]
    assert third[0]["status"] == lc.CANCELLED
    assert third == one_by_one(client, third)


def test_pages_and_the_jobs_of_a_model_come_out_as_without_rendered_jobs(setup, app):
    client = setup
    ids = [client.post(JOBS, json=job_request()).get_json()["id"] for _ in range(5)]
    model = client.get(f"{JOBS}/{ids[0]}").get_json()["modelId"]
    of_model = f"{JOBS}/{model['modelname']}/{model['modelversion']}"
    for url in (f"{JOBS}?limit=2", of_model + "?limit=2"):
        rendered_of(app)._entries.clear()
        pages, next_url = [], url
        while next_url:
            answer = client.get(next_url)
            assert answer.status_code == 200
            pages.append(answer.get_json())
            link = answer.headers.get("Link")
            next_url = link[1:link.index(">")] if link else None
        assert [len(page) for page in pages] == [2, 2, 1]
        assert [job["id"] for page in pages for job in page] == ids[::-1]
        # The same pages again, now from what was rendered: the same answers.
        assert client.get(url).get_json() == pages[0]


def test_a_job_rendered_under_another_path_prefix_is_rendered_again(setup, app):
    client = setup
    job_id = client.post(JOBS, json=job_request()).get_json()["id"]
    plain = listed(client)[0]
    assert plain["metrics_url"] == f"{JOBS}/get-model-metrics/{job_id}"
    behind_a_proxy = client.get(JOBS, base_url="http://localhost/tm").get_json()[0]
    assert behind_a_proxy["metrics_url"] == f"/tm{JOBS}/get-model-metrics/{job_id}"
    assert listed(client)[0] == plain


def test_rendered_jobs_are_bounded_in_bytes_least_recently_used_first_out():
    cache = RenderedJobs(max_bytes=3, max_job_bytes=2)
    for job_id in (1, 2, 3):
        cache.put(job_id, ("v", ""), b"%d" % job_id)
    assert cache.get(1, ("v", "")) == b"1"  # 1 is now the most recently used
    cache.put(4, ("v", ""), b"4")
    assert (len(cache), cache.bytes) == (3, 3)
    assert cache.get(2, ("v", "")) is None, "the least recently used went"
    assert [cache.get(job_id, ("v", "")) for job_id in (1, 3, 4)] == [b"1", b"3", b"4"]
    assert cache.get(1, ("w", "")) is None, "another version is not served"
    cache.put(5, ("v", ""), b"55")  # two bytes: two of the others go
    assert (len(cache), cache.bytes) == (2, 3) and cache.get(5, ("v", "")) == b"55"
    cache.put(5, ("w", ""), b"555")  # larger than a job may be: not kept, and the older rendering goes too
    assert cache.get(5, ("w", "")) is None and cache.get(5, ("v", "")) is None and cache.bytes == 1


def test_a_rendering_serves_its_max_age_at_most():
    now = [1000.0]
    cache = RenderedJobs(max_age=60, clock=lambda: now[0])
    cache.put(1, "v", b"{}")
    now[0] += 59
    assert cache.get(1, "v") == b"{}"
    now[0] += 2
    assert cache.get(1, "v") is None


def test_a_change_written_outside_the_service_is_listed_after_the_max_age(setup, app):
    """An operator's SQL that leaves updated_at as it was: GET shows it at once, the list within MAX_AGE."""
    from sqlalchemy import text

    client = setup
    job_id = client.post(JOBS, json=job_request()).get_json()["id"]
    assert listed(client)[0]["failure_reason"] == ""
    with app.app_context():
        db.session.execute(text("UPDATE training_jobs SET failure_reason = 'fixed by hand' WHERE id = :id"),
                           {"id": job_id})
        db.session.commit()
    assert client.get(f"{JOBS}/{job_id}").get_json()["failure_reason"] == "fixed by hand"
    cache = rendered_of(app)
    real_clock = cache.clock
    cache.clock = lambda: real_clock() + cache.max_age + 1
    assert listed(client)[0]["failure_reason"] == "fixed by hand"


def test_a_job_that_changes_while_its_page_is_read_is_kept_under_its_own_version(setup, app):
    """The page's versions are read first and the views after: a job changed in between is rendered as it is
    now, and kept under its new updated_at, not the older one the page saw."""
    from trainingmgr.api.rendered_jobs import job_list_body

    client = setup
    job = client.post(JOBS, json=job_request()).get_json()
    with app.test_request_context(JOBS):
        services = app.extensions["trainingmgr"]
        service = services.training_jobs()
        seen = service.versions(type("Page", (), {"limit": 10, "after": None})()).items
        newer = seen[0]["updated_at"] + timedelta(seconds=5)

        def read_views(ids: list[int]) -> dict[int, dict]:
            views = service.views_of(ids)
            views[job["id"]] = {**views[job["id"]], "updated_at": newer}
            return views

        body = job_list_body(seen, "/p/", read_views, lambda view: view["updated_at"].isoformat().encode())
        assert body == b"[" + newer.isoformat().encode() + b"]\n"
        cache = rendered_of(app)
        assert cache.get(job["id"], (seen[0]["updated_at"], "/p/")) is None
        assert cache.get(job["id"], (newer, "/p/")) is not None
