"""api/swagger.yaml, the routes the app serves, the README and the migrations must agree."""
from __future__ import annotations

import re

import pytest
import yaml
from openapi_spec_validator import validate

from trainingmgr import PROJECT_ROOT, SWAGGER_FILE, create_app
from trainingmgr.config import Settings

HTTP_METHODS = {"get", "put", "post", "delete", "patch"}
# Routes that are not API operations: Swagger UI's own assets, and the web console (api/console.py: pages for
# people, whose refusals are pages too, not ProblemDetails; test_auth.py holds their access rules).
UNDOCUMENTED_ENDPOINTS = {"docs.apidocs_asset", "docs.apidocs_init"}
UNDOCUMENTED_BLUEPRINTS = {"console"}


def load_spec() -> dict:
    return yaml.safe_load(SWAGGER_FILE.read_text())


def spec_operations(spec: dict) -> tuple[set[tuple[str, str]], set[tuple[str, str]]]:
    built, not_built = set(), set()
    for path, item in spec["paths"].items():
        for method, op in item.items():
            if method not in HTTP_METHODS:
                continue
            (not_built if op.get("x-not-built") else built).add((method.upper(), path))
    return built, not_built


def served_operations(app) -> set[tuple[str, str]]:
    served = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint in UNDOCUMENTED_ENDPOINTS or rule.endpoint.split(".")[0] in UNDOCUMENTED_BLUEPRINTS:
            continue
        path = re.sub(r"<(?:[a-z]+:)?([A-Za-z_]+)>", r"{\1}", rule.rule)
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            served.add((method, path))
    return served


@pytest.fixture(scope="module")
def bare_app(tmp_path_factory):
    # Routing only: no database is touched.
    data = tmp_path_factory.mktemp("contract")
    return create_app(Settings(data_dir=str(data), secret_key="k", log_level="WARNING"))


def test_swagger_yaml_is_a_valid_swagger_document():
    spec = load_spec()
    assert spec["swagger"] == "2.0"
    validate(spec)


def test_every_served_route_is_in_the_contract_and_every_built_one_is_served(bare_app):
    built, not_built = spec_operations(load_spec())
    served = served_operations(bare_app)
    assert served - built == set(), "served but missing from api/swagger.yaml (or marked x-not-built there)"
    assert built - served == set(), "described in api/swagger.yaml but not served"
    assert served & not_built == set()


def test_not_built_routes_say_so_in_their_description():
    _, not_built = spec_operations(load_spec())
    spec = load_spec()
    for method, path in not_built:
        assert spec["paths"][path][method.lower()]["description"].startswith("(Not built yet.)"), (method, path)


def test_swagger_yaml_and_ui_are_served_offline(bare_app):
    client = bare_app.test_client()
    raw = client.get("/swagger.yaml", headers={"Host": "tm.example:8080"})
    assert raw.status_code == 200
    assert raw.mimetype == "application/yaml"
    served = yaml.safe_load(raw.data)
    assert served["host"] == "tm.example:8080"  # the host the caller reached, for "Try it out"
    assert {**served, "host": "localhost:32002"} == load_spec()
    page = client.get("/apidocs")
    assert page.status_code == 200 and b"swagger-ui" in page.data
    assert b"http" not in page.data.replace(b"http-equiv", b""), "the page must not load anything from elsewhere"
    assert b'url: "/swagger.yaml"' in client.get("/apidocs/init.js").data
    bundle = client.get("/apidocs/swagger-ui-bundle.js")
    assert bundle.status_code == 200 and len(bundle.data) > 100_000
    assert client.get("/apidocs/../../trainingmgr/config.py").status_code == 404


def _resolve(spec: dict, item: dict) -> dict:
    while "$ref" in item:
        section, name = item["$ref"].split("/")[1:]
        item = spec[section][name]
    return item


# Operations that touch no database: no 503 of an outage (/readyz documents its own).
NO_DATABASE = {("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/swagger.yaml"), ("GET", "/apidocs"),
               ("GET", "/model/{modelname}/{modelversion}/{artifactversion}/Model.zip")}
# Operations that answer no error of their own (no input, no database).
NO_ERRORS = {("GET", "/healthz"), ("GET", "/swagger.yaml"), ("GET", "/apidocs")}


def test_every_error_the_service_answers_is_in_the_contract():
    """Errors are application/problem+json; a database outage is a 503 with Retry-After; every string input may
    be refused (400: control characters)."""
    spec = load_spec()
    built, _ = spec_operations(spec)
    for method, path in sorted(built):
        op = spec["paths"][path][method.lower()]
        responses = {code: _resolve(spec, answer) for code, answer in op["responses"].items()}
        where = f"{method} {path}"
        if (method, path) not in NO_ERRORS:
            assert "application/problem+json" in op.get("produces", spec["produces"]), where
        if (method, path) not in NO_DATABASE:
            assert "503" in responses and "Retry-After" in responses["503"].get("headers", {}), where
        parameters = [_resolve(spec, p) for p in op.get("parameters", [])]
        if any(p["in"] == "body" or p.get("type") == "string" for p in parameters):
            assert "400" in responses, where
        if any(p["in"] == "path" for p in parameters):
            assert "404" in responses or "400" in responses, where
    metrics = spec["paths"]["/ai-ml-model-training/v1/training-jobs/update-model-metrics/{trainingjob_id}"]["post"]
    assert "TM_MAX_METRICS_BYTES" in metrics["responses"]["413"]["description"]


def test_each_operation_documents_the_role_the_service_asks_for(bare_app):
    """`x-role` of every operation is the access rule of its route; protected operations document 401 and 403,
    open ones declare no security requirement (so Swagger UI sends them no credential)."""
    from trainingmgr.api.access import ROUTE_ACCESS

    spec = load_spec()
    endpoints = {}
    for rule in bare_app.url_map.iter_rules():
        path = re.sub(r"<(?:[a-z]+:)?([A-Za-z_]+)>", r"{\1}", rule.rule)
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            endpoints[(method, path)] = rule.endpoint
    built, _ = spec_operations(spec)
    assert spec["security"] == [{"bearer": []}] and spec["securityDefinitions"]["bearer"]["in"] == "header"
    for method, path in built:
        op = spec["paths"][path][method.lower()]
        where = f"{method} {path}"
        assert op["x-role"] == ROUTE_ACCESS[endpoints[(method, path)]], where
        if op["x-role"] == "open":
            assert op["security"] == [] and "401" not in op["responses"], where
        else:
            assert {"401", "403"} <= set(op["responses"]), where
            assert {"bearer": []} in op.get("security", spec["security"]), where


def test_readme_documents_every_setting():
    readme = (PROJECT_ROOT / "README.md").read_text()
    for variable, default, _ in Settings.documented():
        row = next((line for line in readme.splitlines() if line.startswith(f"| `{variable}`")), None)
        assert row is not None, f"README has no row for {variable}"
        assert f"`{default}`" in row or (default == "" and "(empty)" in row), f"README default of {variable}"


def test_migrations_match_the_models(app):
    """The migrated schema equals what the models declare: a model change without a migration fails here."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from trainingmgr.extensions import db
    from trainingmgr.models import Base

    with app.app_context(), db.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []
