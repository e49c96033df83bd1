"""The API contract (api/swagger.yaml) and Swagger UI, served offline from the swagger-ui-bundle package."""
from __future__ import annotations

import re

from flask import Blueprint, current_app, request, send_from_directory
from swagger_ui_bundle import swagger_ui_path

bp = Blueprint("docs", __name__)
_HOST_LINE = re.compile(r"^host: .*$", re.MULTILINE)

_INDEX = """<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="UTF-8">
  <title>Training Manager API</title>
  <link rel="stylesheet" type="text/css" href="/apidocs/swagger-ui.css">
  <link rel="icon" type="image/png" href="/apidocs/favicon-32x32.png" sizes="32x32">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="/apidocs/swagger-ui-bundle.js" charset="UTF-8"></script>
  <script src="/apidocs/swagger-ui-standalone-preset.js" charset="UTF-8"></script>
  <script src="/apidocs/init.js" charset="UTF-8"></script>
</body>
</html>
"""

# A separate script (not inline) so a strict Content-Security-Policy can forbid inline scripts.
_INIT = """window.onload = function () {
  window.ui = SwaggerUIBundle({
    url: "/swagger.yaml",
    dom_id: "#swagger-ui",
    deepLinking: true,
    validatorUrl: null,
    presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset],
    layout: "StandaloneLayout"
  });
};
"""

_CSP = "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; script-src 'self'"


@bp.get("/swagger.yaml")
def swagger_yaml():
    # The contract names localhost:32002; served, it names the host the caller reached, so that Swagger UI's
    # "Try it out" works from any browser.
    text = current_app.config["TM_SWAGGER_FILE"].read_text(encoding="utf-8")
    text = _HOST_LINE.sub(f'host: "{request.host}"', text, count=1)
    return text, 200, {"Content-Type": "application/yaml; charset=utf-8", "Cache-Control": "no-cache"}


@bp.get("/apidocs")
def apidocs():
    return _INDEX, 200, {"Content-Type": "text/html; charset=utf-8", "Content-Security-Policy": _CSP}


@bp.get("/apidocs/init.js")
def apidocs_init():
    return _INIT, 200, {"Content-Type": "application/javascript; charset=utf-8"}


@bp.get("/apidocs/<path:filename>")
def apidocs_asset(filename: str):
    # send_from_directory refuses paths that leave the folder.
    return send_from_directory(swagger_ui_path, filename, max_age=3600)
