"""Cross-origin requests (the framework's dashboard runs on another origin): flask-cors, configured by
TM_CORS_ORIGINS. No credentials mode: cross-origin callers send their token in Authorization; the web console's
login cookie serves its own origin only (a page elsewhere can neither read answers it authenticates nor, by
api/access.py's origin check, write with it)."""
from __future__ import annotations

from flask import Flask, Response, request

# What the framework's clients send, and what they need to read back.
ALLOWED_HEADERS = ["Content-Type", "Authorization", "X-Request-ID", "Idempotency-Key"]
EXPOSED_HEADERS = ["Location", "Link", "X-Request-ID", "WWW-Authenticate", "Retry-After"]
PREFLIGHT_MAX_AGE = 600  # seconds a browser may reuse a preflight answer


def install_cors(app: Flask, origins: str) -> None:
    """`origins`: "*" (any), a comma-separated list, or "" (CORS off: no Access-Control-* headers at all)."""
    allowed = [o.strip() for o in origins.split(",") if o.strip()]
    if not allowed:
        return
    from flask_cors import CORS

    @app.after_request
    def _route_methods(response: Response) -> Response:
        # Registered before flask-cors, so it runs after it: a preflight allows the methods this route has (Flask's
        # automatic OPTIONS answer lists them in Allow), not every method of the API.
        if request.method == "OPTIONS" and "Access-Control-Allow-Methods" in response.headers:
            route_methods = response.headers.get("Allow")
            if route_methods:
                response.headers["Access-Control-Allow-Methods"] = route_methods
        return response

    any_origin = "*" in allowed
    # Any origin is answered with "*" (not an echo of the caller's origin): cacheable, and it cannot carry
    # credentials.
    CORS(app, origins="*" if any_origin else allowed, send_wildcard=any_origin, allow_headers=ALLOWED_HEADERS,
         expose_headers=EXPOSED_HEADERS, supports_credentials=False, max_age=PREFLIGHT_MAX_AGE)
