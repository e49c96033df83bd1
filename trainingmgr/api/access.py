"""Who may call which route: one table, checked before any handler runs (so a refused request never has its
body parsed).

Each endpoint needs one of: OPEN (anyone: probes, the contract, Swagger UI), READER, WRITER, ADMIN (each role
includes the ones before it), CALLBACK (the data-extraction and pipeline callbacks: open unless
TM_CALLBACK_AUTH=role makes them need a writer, and only from TM_CALLBACK_ALLOWED_NETWORKS when set), or METRICS
(open unless TM_METRICS_AUTH=true makes it need a reader). An endpoint missing from the table needs ADMIN (and
the error log says so): a new route is closed until someone decides who may call it.

With TM_AUTH=none nobody is asked for a credential: the roles are not checked, only the callback networks.

The web console (api/console.py) logs a browser in by keeping the pasted token in an HttpOnly, SameSite=Strict
cookie. A request without an Authorization header may be authenticated by that cookie (the header, when present,
always wins); a browser sends a cookie with requests that other pages make it send, so an unsafe method (POST,
PUT, DELETE ...) authenticated by the cookie must also come from this origin (its Origin, else its Referer, names
this host), as SameSite's second line of defence.
"""
from __future__ import annotations

import ipaddress
import logging
from urllib.parse import urlsplit

from flask import g, request

from ..adapters.base import (ADMIN, READER, WRITER, Authenticator, IdentityProviderUnavailable, InvalidCredentials,
                             Principal)
from ..errors import Forbidden, ServiceUnavailable, Unauthorized
from .common import services

log = logging.getLogger(__name__)

OPEN, CALLBACK, METRICS = "open", "callback", "metrics"
MAX_CREDENTIAL_LENGTH = 16 * 1024  # a JWT with many roles is a few KiB; anything far longer is not a credential
CONSOLE_COOKIE = "tm_console_token"  # the web console's login: the bearer token itself
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

ROUTE_ACCESS: dict[str, str] = {
    "health.healthz": OPEN,
    "health.readyz": OPEN,
    "docs.swagger_yaml": OPEN,
    "docs.apidocs": OPEN,
    "docs.apidocs_init": OPEN,
    "docs.apidocs_asset": OPEN,
    "metrics.metrics": METRICS,
    "notifications.data_extraction_notification": CALLBACK,
    "notifications.pipeline_notification": CALLBACK,
    "feature_groups.list_feature_groups": READER,
    "feature_groups.get_feature_group": READER,
    "feature_groups.get_feature_group_legacy": READER,
    "feature_groups.create_feature_group": WRITER,
    "feature_groups.update_feature_group": WRITER,
    "feature_groups.update_feature_group_legacy": WRITER,
    "feature_groups.delete_feature_groups": WRITER,
    "feature_groups.delete_feature_groups_legacy": WRITER,
    "pipelines.list_pipelines": READER,
    "pipelines.get_pipeline": READER,
    "pipelines.list_pipeline_versions": READER,
    "pipelines.list_experiments": READER,
    "pipelines.list_experiments_bare": READER,
    "pipelines.upload_pipeline": WRITER,
    "training_jobs.list_training_jobs": READER,
    "training_jobs.list_training_jobs_of_model": READER,
    "training_jobs.get_training_job": READER,
    "training_jobs.get_training_job_legacy": READER,
    "training_jobs.get_training_job_status": READER,
    "training_jobs.list_training_job_events": READER,
    "training_jobs.get_training_job_logs": READER,
    "training_jobs.get_model_metrics": READER,
    "training_jobs.create_training_job": WRITER,
    "training_jobs.delete_training_job": WRITER,
    "training_jobs.cancel_training_job": WRITER,
    "training_jobs.update_model_metrics": WRITER,
    "models.download_model": READER,
    "event_stream.job_events": READER,
    # The web console: its pages need a reader (refusals are answered as pages: the login page, a 403 page);
    # logging in and out, its scripts and styles, and / (a redirect to it) are open.
    "console.root": OPEN,
    "console.login_form": OPEN,
    "console.log_in": OPEN,
    "console.log_out": OPEN,
    "console.static": OPEN,
    "console.jobs": READER,
    "console.job": READER,
    "console.feature_groups": READER,
    "console.feature_group": READER,
    "console.pipelines": READER,
}


def required_access(endpoint: str) -> str:
    """What the endpoint needs under the current settings: OPEN or a role."""
    settings = services().settings
    access = ROUTE_ACCESS.get(endpoint)
    if access is None:
        log.error("route %s has no rule in trainingmgr.api.access.ROUTE_ACCESS: only an admin may call it", endpoint)
        return ADMIN
    if access == CALLBACK:
        return WRITER if settings.callback_auth == "role" else OPEN
    if access == METRICS:
        return READER if settings.metrics_auth else OPEN
    return access


def authorize() -> None:
    """before_request: refuse the request (401, 403) unless its caller may call the route."""
    if request.method == "OPTIONS" or request.url_rule is None:
        return  # a CORS preflight carries no credential; an unknown route or method answers 404/405 anyway
    endpoint = request.endpoint or ""
    if ROUTE_ACCESS.get(endpoint) == CALLBACK:
        _refuse_callbacks_from_elsewhere()
    role = required_access(endpoint)
    authenticator = services().authenticator
    if role == OPEN or authenticator is None:
        return
    principal = _principal(authenticator)
    g.principal = principal.name  # the audit line's principal
    g.principal_roles = principal.roles  # what the console's pages offer (api/console.py)
    if not principal.may(role):
        raise Forbidden(f"This operation needs the {role} role; the credential of {principal.name!r} does not "
                        f"carry it.")


def _principal(authenticator: Authenticator) -> Principal:
    header = request.headers.get("Authorization")
    if header is None:
        cookie = request.cookies.get(CONSOLE_COOKIE)
        if cookie is not None:
            if request.method not in SAFE_METHODS:
                require_same_origin()
            return authenticate(authenticator, cookie.strip(), "The console's login is no longer valid")
    scheme, _, credential = (header or "").strip().partition(" ")
    credential = credential.strip()
    if not scheme:
        raise Unauthorized("This operation needs a credential: send Authorization: Bearer <token>.")
    if scheme.lower() != "bearer":  # another scheme is not an invalid token, just not ours (RFC 6750, 3.1)
        raise Unauthorized("Only Bearer credentials are accepted: send Authorization: Bearer <token>.")
    if not credential:
        raise Unauthorized("The Bearer credential is empty: send Authorization: Bearer <token>.",
                           invalid_token=True)
    return authenticate(authenticator, credential, "The bearer token is not valid")


def authenticate(authenticator: Authenticator, credential: str, refusal: str) -> Principal:
    """The principal of a credential, or the 401 (`refusal`: why, the credential never quoted) or 503 saying why
    not."""
    if len(credential) > MAX_CREDENTIAL_LENGTH:
        raise Unauthorized(f"{refusal}: it is too long.", invalid_token=True)
    try:
        return authenticator.authenticate(credential)
    except InvalidCredentials as e:
        raise Unauthorized(f"{refusal}: {e}.", invalid_token=True) from None
    except IdentityProviderUnavailable as e:
        raise ServiceUnavailable(f"Credentials cannot be checked at the moment: {e}; try again later.") from None


def require_same_origin() -> None:
    """403 unless the request comes from a page of this service: its Origin header (else its Referer) names the
    host the request was sent to, or the host of TM_ADVERTISED_URL (behind a proxy that rewrites Host, the address
    users open). A browser always sends Origin with a POST; a page elsewhere cannot forge it."""
    source = request.headers.get("Origin") or request.headers.get("Referer") or ""
    try:
        source_host = urlsplit(source).netloc.lower()
        advertised_host = urlsplit(services().settings.advertised_url).netloc.lower()
    except ValueError:
        source_host, advertised_host = "", ""
    if not source_host or source_host not in (request.host.lower(), advertised_host):
        raise Forbidden("This request must come from the console's own pages: its Origin (or Referer) header names "
                        "another site, or none.")


def _refuse_callbacks_from_elsewhere() -> None:
    networks = services().settings.callback_networks
    if not networks:
        return
    try:
        address = ipaddress.ip_address((request.remote_addr or "").split("%")[0])
    except ValueError:
        address = None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # a dual-stack socket reports IPv4 callers as ::ffff:a.b.c.d
    if address is None or not any(address in network for network in networks):
        raise Forbidden("Callbacks are accepted only from the networks in TM_CALLBACK_ALLOWED_NETWORKS.")
