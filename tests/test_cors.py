"""CORS: the framework's dashboard calls the API from another origin (flask-cors, TM_CORS_ORIGINS)."""
from __future__ import annotations

import pytest

from tests.factories import FG_V1, create_feature_group

JOBS = "/ai-ml-model-training/v1/training-jobs"
DASHBOARD = "http://dashboard.smo:32005"


def preflight(client, path: str, method: str, headers: str = "Content-Type"):
    return client.options(path, headers={"Origin": DASHBOARD, "Access-Control-Request-Method": method,
                                         "Access-Control-Request-Headers": headers})


def test_default_allows_any_origin_on_answers_and_errors(client):
    create_feature_group(client)
    listed = client.get(FG_V1, headers={"Origin": DASHBOARD})
    assert listed.headers["Access-Control-Allow-Origin"] == "*"
    exposed = {h.strip().lower() for h in listed.headers["Access-Control-Expose-Headers"].split(",")}
    assert exposed == {"location", "link", "x-request-id", "www-authenticate", "retry-after"}
    assert "Access-Control-Allow-Credentials" not in listed.headers
    missing = client.get(f"{JOBS}/999999", headers={"Origin": DASHBOARD})  # a ProblemDetails answer
    assert missing.status_code == 404 and missing.headers["Access-Control-Allow-Origin"] == "*"


@pytest.mark.parametrize("path, method, allowed", [
    (JOBS, "POST", {"GET", "HEAD", "OPTIONS", "POST"}),
    (f"{JOBS}/1", "DELETE", {"GET", "HEAD", "OPTIONS", "DELETE"}),
    (f"{FG_V1}/cell_kpis", "PUT", {"GET", "HEAD", "OPTIONS", "PUT"}),
    ("/pipelines/p/upload", "POST", {"OPTIONS", "POST"}),
])
def test_preflight_allows_the_routes_own_methods_and_the_clients_headers(client, path, method, allowed):
    answer = preflight(client, path, method, "content-type, authorization, x-request-id, idempotency-key")
    assert answer.status_code == 200
    assert answer.headers["Access-Control-Allow-Origin"] == "*"
    methods = {m.strip() for m in answer.headers["Access-Control-Allow-Methods"].split(",")}
    assert methods == allowed
    headers = {h.strip().lower() for h in answer.headers["Access-Control-Allow-Headers"].split(",")}
    assert headers == {"content-type", "authorization", "x-request-id", "idempotency-key"}
    assert int(answer.headers["Access-Control-Max-Age"]) > 0


def test_a_list_of_origins_restricts_them(build_app):
    client = build_app(cors_origins=f"{DASHBOARD}, http://other.example").test_client()
    assert client.get(FG_V1, headers={"Origin": DASHBOARD}).headers["Access-Control-Allow-Origin"] == DASHBOARD
    stranger = client.get(FG_V1, headers={"Origin": "http://evil.example"})
    assert stranger.status_code == 200 and "Access-Control-Allow-Origin" not in stranger.headers
    assert preflight(client, JOBS, "POST").headers["Access-Control-Allow-Origin"] == DASHBOARD
    evil = client.options(JOBS, headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert "Access-Control-Allow-Origin" not in evil.headers


def test_empty_turns_cors_off(build_app):
    client = build_app(cors_origins="").test_client()
    answer = client.get(FG_V1, headers={"Origin": DASHBOARD})
    assert answer.status_code == 200
    assert not [h for h in answer.headers.keys() if h.lower().startswith("access-control-")]
    assert not [h for h in preflight(client, JOBS, "POST").headers.keys() if h.lower().startswith("access-control-")]
