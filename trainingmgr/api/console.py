"""The web console at /console: server-rendered pages over the services (training jobs, one job, feature groups,
pipelines), kept live by a little JavaScript (static/console/console.js) that reads the event stream and the API.

Login (TM_AUTH=token or oidc): the user pastes a bearer token, which is checked like an Authorization header and
kept in an HttpOnly, SameSite=Strict cookie; api/access.py accepts that cookie where a request carries no
Authorization header, and refuses unsafe methods it authenticates unless they come from this origin. Pages offer
writing controls (a new job, cancel, upload) only to a principal whose role may use them; the API checks again
anyway.
"""
from __future__ import annotations

import json
import posixpath
import re
from datetime import datetime, timezone
from typing import Any

from flask import Blueprint, Response, g, redirect, render_template, request, url_for

from ..adapters.base import READER, ROLES, WRITER, Principal
from ..errors import ApiError, Unauthorized
from ..models import lifecycle as lc
from ..schemas.feature_group import dump_feature_group
from ..schemas.training_job import dump_event, dump_training_job
from ..services.pagination import PageRequest, page_request
from ..services.training_jobs import job_view
from .access import CONSOLE_COOKIE, MAX_CREDENTIAL_LENGTH, authenticate, require_same_origin
from .common import services

bp = Blueprint("console", __name__, template_folder="../templates", static_folder="../static/console",
               static_url_path="/console/static")

JOBS_PER_PAGE = 100
MAX_EVENTS_SHOWN = 1000  # a job has a dozen or two; the page says when more were left out
MAX_TRAININGS_CHARTED = 50  # the model's trainings whose metrics the chart compares
MAX_FEATURE_GROUPS = 1000
LOGIN_SECONDS = 8 * 3600  # a working day; an OIDC access token usually expires sooner, and then so does the login
# Browsers keep cookies of up to 4096 bytes, name and attributes included; a longer token cannot be kept.
MAX_COOKIE_TOKEN = min(MAX_CREDENTIAL_LENGTH, 3800)
# RFC 6750's b64token: every API token and JWT is one, and each of its characters may stand in a cookie as it is.
BEARER_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
# What pages may load and where forms may go: this origin only, no inline script, no framing.
CONTENT_SECURITY_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                           "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")


# ---------------------------------------------------------------------------------------------- pages
@bp.get("/")
def root():
    return redirect(url_for(".jobs"))


@bp.get("/console/jobs")
@bp.get("/console", strict_slashes=False)  # the first rule registered: the one url_for names
def jobs():
    page_req = page_request(request.args, default_limit=JOBS_PER_PAGE, max_limit=JOBS_PER_PAGE, key_type=int)
    page = services().training_jobs().list(page_req)
    new_job_form = None
    if _may(WRITER):  # what a new job may name
        new_job_form = {
            "feature_groups": [fg["name"] for fg in services().feature_groups().views(
                PageRequest(limit=MAX_FEATURE_GROUPS)).items],
            "pipelines": [pipeline.name for pipeline in services().pipelines().list_pipelines()],
            "create_url": url_for("training_jobs.create_training_job"),
        }
    return _page("console/jobs.html", "jobs", jobs=[_job_view(job) for job in page.items],
                 older_cursor=page.next_cursor, paged=page_req.after is not None, new_job_form=new_job_form,
                 event_stream=url_for("event_stream.job_events"))


@bp.get("/console/jobs/<int:job_id>")
def job(job_id: int):
    service = services().training_jobs()
    view = _job_view(service.get(job_id))
    events = service.events(job_id, PageRequest(limit=MAX_EVENTS_SHOWN))
    model = view["modelId"]
    trainings = service.list(PageRequest(limit=MAX_TRAININGS_CHARTED), modelname=model["modelname"],
                             modelversion=model["modelversion"]).items
    model_zip = None
    if view["model_url"]:
        model_zip = url_for("models.download_model", modelname=model["modelname"],
                            modelversion=model["modelversion"], artifactversion=model["artifactversion"])
    return _page("console/job.html", "jobs", job=view, events=[dump_event(e) for e in events.items],
                 more_events=events.next_cursor is not None, metrics=_metric_rows(view["metrics"]),
                 chart=_metrics_chart(view["id"], trainings), model_zip=model_zip,
                 may_cancel=_may(WRITER) and view["status"] not in lc.ENDED,
                 cancel_url=url_for("training_jobs.cancel_training_job", training_job_id=job_id),
                 log_url=f"{url_for('training_jobs.get_training_job', training_job_id=job_id)}/logs",
                 event_stream=url_for("event_stream.job_events", job_id=job_id))


@bp.get("/console/featuregroups")
def feature_groups():
    page = services().feature_groups().views(PageRequest(limit=MAX_FEATURE_GROUPS))
    return _page("console/feature_groups.html", "feature_groups",
                 groups=[dump_feature_group(fg) for fg in page.items], more=page.next_cursor is not None)


@bp.get("/console/featuregroups/<featuregroup_name>")
def feature_group(featuregroup_name: str):
    # dump_feature_group masks the token: the page can only ever show "****".
    group = dump_feature_group(services().feature_groups().view(featuregroup_name))
    return _page("console/feature_group.html", "feature_groups", group=group)


@bp.get("/console/pipelines")
def pipelines():
    return _page("console/pipelines.html", "pipelines", pipelines=services().pipelines().list_pipelines(),
                 may_upload=_may(WRITER))


# ---------------------------------------------------------------------------------------------- login
@bp.get("/console/login")
def login_form():
    if services().authenticator is None:
        return redirect(url_for(".jobs"))
    return _login_page(_local_path(request.args.get("next")))


@bp.post("/console/login")
def log_in():
    authenticator = services().authenticator
    if authenticator is None:
        return redirect(url_for(".jobs"), 303)
    require_same_origin()  # a page elsewhere must not log this browser in under its own token
    next_path = _local_path(request.form.get("next"))
    token = request.form.get("token", "").strip()
    if token[:7].lower() == "bearer ":  # pasted with its scheme, as Swagger UI's Authorize dialog takes it
        token = token[7:].strip()
    if not token:
        return _login_page(next_path, "Paste a token.", 400)
    if len(token) > MAX_COOKIE_TOKEN:
        return _login_page(next_path, f"That token is longer than the {MAX_COOKIE_TOKEN} characters a browser "
                                      "cookie holds; use the API with an Authorization header instead.", 400)
    if not BEARER_TOKEN.fullmatch(token):
        return _login_page(next_path, "That is not a bearer token: it holds characters no token has.", 400)
    try:
        principal = authenticate(authenticator, token, "That token is not valid")
    except Unauthorized as e:
        return _login_page(next_path, e.detail, 401, e.headers)
    g.principal = principal.name  # the audit line names who logged in
    if not principal.may(READER):
        return _login_page(next_path, f"The token of {principal.name!r} carries none of the roles "
                                      f"{', '.join(ROLES)}.", 403)
    response = redirect(next_path or url_for(".jobs"), 303)
    response.set_cookie(CONSOLE_COOKIE, token, max_age=LOGIN_SECONDS, path="/", secure=_over_https(),
                        httponly=True, samesite="Strict")
    return response


@bp.post("/console/logout")
def log_out():
    require_same_origin()
    response = redirect(url_for(".login_form"), 303)
    response.delete_cookie(CONSOLE_COOKIE, path="/", secure=_over_https(), httponly=True, samesite="Strict")
    return response


# ---------------------------------------------------------------------------------------------- errors, headers
@bp.errorhandler(Unauthorized)
def _log_in_first(error: Unauthorized):
    # A page without a (valid) login: to the login page, and back here afterwards.
    return redirect(url_for(".login_form", next=request.full_path.rstrip("?")), 303)


@bp.errorhandler(ApiError)
def _error_page(error: ApiError):
    headers = dict(error.headers)
    retry_after = getattr(error, "retry_after", None)
    if retry_after:
        headers["Retry-After"] = str(int(retry_after))
    return _page("console/error.html", "", status_code=error.status, title=error.title,
                 detail=error.detail), error.status, headers


@bp.after_request
def _page_headers(response: Response) -> Response:
    if response.mimetype == "text/html":
        response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
        response.headers["Cache-Control"] = "no-store"  # after logging out, Back shows no job data
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Referrer-Policy"] = "same-origin"
        response.headers["X-Content-Type-Options"] = "nosniff"
    return response


# ---------------------------------------------------------------------------------------------- helpers
def _page(template: str, section: str, **context: Any) -> str:
    authenticator = services().authenticator
    return render_template(template, section=section, auth_on=authenticator is not None,
                           principal=g.get("principal"), role=_role_shown(), **context)


def _login_page(next_path: str | None, error: str | None = None, status: int = 200,
                headers: dict[str, str] | None = None) -> tuple[str, int, dict[str, str]]:
    # The token is never put back in the form: a refused token is not echoed.
    mode = services().settings.auth
    return _page("console/login.html", "", next_path=next_path, error=error, mode=mode), status, headers or {}


def _over_https() -> bool:
    """Whether users reach the console over https: this request came so, or TM_ADVERTISED_URL (behind a proxy that
    ends TLS) says so. The login cookie is then Secure."""
    return request.is_secure or services().settings.advertised_url.lower().startswith("https://")


def _may(role: str) -> bool:
    """Whether the request's principal may use operations that need `role` (anyone may, with TM_AUTH=none)."""
    if services().authenticator is None:
        return True
    return Principal(g.get("principal") or "", g.get("principal_roles") or frozenset()).may(role)


def _role_shown() -> str | None:
    roles = g.get("principal_roles") or frozenset()
    return max(roles, key=ROLES.index) if roles else None


def _local_path(raw: str | None) -> str | None:
    """Where to go after logging in: a console page only, never another site (`//host`, `/\\host`) nor a path
    that dot segments lead out of the console."""
    if not raw or "\\" in raw or "//" in raw:
        return None
    path = raw.partition("?")[0]
    if posixpath.normpath(path) != path.rstrip("/") or not (path == "/console" or path.startswith("/console/")) \
            or path.startswith("/console/login"):
        return None
    return raw


def _job_view(job: Any) -> dict[str, Any]:
    view = dump_training_job(job_view(job),
                             metrics_url=url_for("training_jobs.get_model_metrics", trainingjob_id=job.id))
    view["metrics"] = job.metrics or {}
    # What the job ran, from the stored (normalised) configuration rather than the client's spellings.
    config = job.training_config
    pipeline = config["trainingPipeline"]
    prefix = "retraining_" if job.is_retraining else ""
    view["pipeline_name"] = pipeline[f"{prefix}pipeline_name"]
    view["pipeline_version"] = pipeline[f"{prefix}pipeline_version"]
    view["description"] = config.get("description", "")
    view["feature_group_name"] = job.feature_group.name
    view["duration_seconds"] = _seconds_between(view["started_at"], view["finished_at"])
    view["ended"] = view["status"] in lc.ENDED
    return view


def _seconds_between(start: str | None, end: str | None) -> float | None:
    """From start to end (to now while it has not ended); None before it started."""
    if not start:
        return None
    until = datetime.fromisoformat(end) if end else datetime.now(timezone.utc)
    return (until - datetime.fromisoformat(start)).total_seconds()


def _metric_rows(metrics: dict[str, Any]) -> list[tuple[str, str]]:
    return [(name, value if isinstance(value, str) else json.dumps(value)) for name, value in metrics.items()]


def _metrics_chart(job_id: int, trainings: list[Any]) -> dict[str, Any] | None:
    """Each numeric metric over the model's trainings, oldest first (this job marked), for the chart."""
    trainings = [t for t in reversed(trainings) if t.metrics]
    names: list[str] = []
    for training in trainings:
        names += [name for name, value in training.metrics.items() if _is_number(value) and name not in names]
    if not names or not any(t.id == job_id for t in trainings):
        return None
    return {
        "labels": [f"{t.artifact_version} (job {t.id})" for t in trainings],
        "current": [t.id == job_id for t in trainings],
        "series": {name: [t.metrics.get(name) if _is_number(t.metrics.get(name)) else None for t in trainings]
                   for name in names},
    }


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@bp.app_template_filter("when")
def _when(moment: str | None) -> str:
    """An ISO time as the console shows it: UTC, to the second."""
    if not moment:
        return ""
    return datetime.fromisoformat(moment).astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


@bp.app_template_filter("duration")
def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes // 60}h {minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m {rest:02d}s"
