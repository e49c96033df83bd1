"""Who may call what (TM_AUTH=token here; tests/test_oidc.py covers TM_AUTH=oidc): every route against every kind
of caller, the token file and its command, the callbacks' own rules, the audit line, the settings.

ROUTES below is this test's own copy of the access table, written from the issue, not read from the code: a route
the app serves without a row here fails the suite, and so does a route whose rule differs from its row.
"""
from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from trainingmgr.adapters.api_tokens import (StaticTokenAuthenticator, add_token, read_token_file, remove_token,
                                             token_hash)
from trainingmgr.adapters.base import InvalidCredentials, RoleMap
from trainingmgr.api.access import ROUTE_ACCESS
from trainingmgr.cli import cli
from trainingmgr.config import Settings, SettingsError

OPEN, READER, WRITER, CALLBACK, METRICS = "open", "reader", "writer", "callback", "metrics"

ROUTES: dict[tuple[str, str], str] = {
    ("GET", "/healthz"): OPEN,
    ("GET", "/readyz"): OPEN,
    ("GET", "/swagger.yaml"): OPEN,
    ("GET", "/apidocs"): OPEN,
    ("GET", "/apidocs/init.js"): OPEN,
    ("GET", "/apidocs/<path:filename>"): OPEN,
    ("GET", "/metrics"): METRICS,
    ("POST", "/trainingjob/dataExtractionNotification"): CALLBACK,
    ("POST", "/trainingjob/pipelineNotification"): CALLBACK,
    ("GET", "/ai-ml-model-training/v1/featureGroup"): READER,
    ("POST", "/ai-ml-model-training/v1/featureGroup"): WRITER,
    ("DELETE", "/ai-ml-model-training/v1/featureGroup"): WRITER,
    ("GET", "/ai-ml-model-training/v1/featureGroup/<featuregroup_name>"): READER,
    ("PUT", "/ai-ml-model-training/v1/featureGroup/<featuregroup_name>"): WRITER,
    ("DELETE", "/featureGroup"): WRITER,
    ("GET", "/featureGroup/<featuregroup_name>"): READER,
    ("PUT", "/featureGroup/<featuregroup_name>"): WRITER,
    ("GET", "/pipelines"): READER,
    ("GET", "/pipelines/<pipeline_name>"): READER,
    ("GET", "/pipelines/<pipeline_name>/versions"): READER,
    ("GET", "/experiments"): READER,
    ("GET", "/pipelines/experiments"): READER,
    ("POST", "/pipelines/<pipe_name>/upload"): WRITER,
    ("GET", "/ai-ml-model-training/v1/training-jobs"): READER,
    ("POST", "/ai-ml-model-training/v1/training-jobs"): WRITER,
    ("GET", "/ai-ml-model-training/v1/training-jobs/<int:training_job_id>"): READER,
    ("DELETE", "/ai-ml-model-training/v1/training-jobs/<int:training_job_id>"): WRITER,
    ("POST", "/ai-ml-model-training/v1/training-jobs/<training_job_id>/cancel"): WRITER,
    ("GET", "/ai-ml-model-training/v1/training-jobs/<training_job_id>/status"): READER,
    ("GET", "/ai-ml-model-training/v1/training-jobs/<training_job_id>/events"): READER,
    ("GET", "/ai-ml-model-training/v1/training-jobs/<training_job_id>/logs"): READER,
    ("GET", "/ai-ml-model-training/v1/training-jobs/<modelname:model_name>/<modelversion:model_version>"): READER,
    ("GET", "/ai-ml-model-training/v1/training-jobs/get-model-metrics/<trainingjob_id>"): READER,
    ("POST", "/ai-ml-model-training/v1/training-jobs/update-model-metrics/<trainingjob_id>"): WRITER,
    ("GET", "/trainingjobs/<trainingjob_name>/<version>"): READER,
    ("GET", "/model/<modelname>/<modelversion>/<artifactversion>/Model.zip"): READER,
    ("GET", "/ai-ml-model-training/v1/events"): READER,
    # The web console: pages need a reader; logging in and out, its scripts and styles, and / are open.
    ("GET", "/"): OPEN,
    ("GET", "/console"): READER,
    ("GET", "/console/jobs"): READER,
    ("GET", "/console/jobs/<int:job_id>"): READER,
    ("GET", "/console/featuregroups"): READER,
    ("GET", "/console/featuregroups/<featuregroup_name>"): READER,
    ("GET", "/console/pipelines"): READER,
    ("GET", "/console/login"): OPEN,
    ("POST", "/console/login"): OPEN,
    ("POST", "/console/logout"): OPEN,
    ("GET", "/console/static/<path:filename>"): OPEN,
}
RANK = {None: -1, READER: 0, WRITER: 1, "admin": 2}
CALLERS = (None, "bogus", READER, WRITER, "admin")  # None: no Authorization header at all


def served_routes(app) -> set[tuple[str, str]]:
    return {(method, rule.rule) for rule in app.url_map.iter_rules()
            for method in rule.methods - {"HEAD", "OPTIONS"}}


def concrete(rule: str) -> str:
    """A path for the rule, with values that name nothing (answers past the access check are 404s or 400s)."""
    path = re.sub(r"<int:[a-z_]+>", "999999", rule)
    path = re.sub(r"<path:[a-z_]+>", "swagger-ui.css", path)
    return re.sub(r"<(?:[a-z]+:)?[a-z_]+>", "nothing_here", path)


@pytest.fixture
def tokens(tmp_path: Path) -> dict[str, str]:
    """A token file with one token per role; the tokens by role (and "bogus", a token nobody was given)."""
    path = tmp_path / "api-tokens"
    made = {role: add_token(path, f"{role}-user", role, RoleMap()) for role in (READER, WRITER, "admin")}
    made["bogus"] = "tm_" + "x" * 43
    return made


@pytest.fixture
def token_app(build_app, tmp_path: Path, tokens):
    def make(**overrides):
        return build_app(auth="token", auth_tokens_file=str(tmp_path / "api-tokens"), **overrides)
    return make


def console_page(rule: str) -> bool:
    """A page of the web console: it answers refusals as pages (a redirect to its login, a 403 page)."""
    return rule.startswith("/console") and not rule.startswith(("/console/static/", "/console/log"))


def call(client, method: str, path: str, token: str | None, **kwargs):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if path.startswith("/console"):
        headers["Origin"] = "http://localhost"  # as a browser sends it from the console's own pages
    if method in ("POST", "PUT", "DELETE") and "data" not in kwargs:
        kwargs["json"] = {}
    return client.open(path, method=method, headers=headers, **kwargs)


def expected_access(access: str, *, callback_auth: str = "none", metrics_auth: bool = False) -> str:
    if access == CALLBACK:
        return WRITER if callback_auth == "role" else OPEN
    if access == METRICS:
        return READER if metrics_auth else OPEN
    return access


def check_route(client, method: str, rule: str, needed: str, tokens: dict[str, str]) -> list[str]:
    """Every caller against one route; the wrong answers."""
    wrong = []
    for caller in CALLERS:
        answer = call(client, method, concrete(rule), tokens.get(caller) if caller else None)
        where = f"{method} {rule} as {caller or 'anonymous'}: {answer.status_code}"
        if needed == OPEN or RANK.get(caller, -1) >= RANK[needed]:
            if answer.status_code in (401, 403):
                wrong.append(f"{where}, expected to pass the access check ({answer.get_json()})")
        elif console_page(rule):
            refused = 303 if caller in (None, "bogus") else 403
            if answer.status_code != refused or answer.mimetype != "text/html":
                wrong.append(f"{where} {answer.mimetype}, expected {refused} text/html")
            elif refused == 303 and not answer.headers["Location"].startswith("/console/login?next="):
                wrong.append(f"{where}: redirected to {answer.headers['Location']}, not to the login page")
        elif caller in (None, "bogus"):
            challenge = answer.headers.get("WWW-Authenticate", "")
            if answer.status_code != 401 or not challenge.startswith('Bearer realm="trainingmgr"'):
                wrong.append(f"{where} {challenge!r}, expected 401 with a Bearer challenge")
            elif ('error="invalid_token"' in challenge) != (caller == "bogus"):
                wrong.append(f"{where} {challenge!r}: invalid_token only when a credential came")
        elif answer.status_code != 403:
            wrong.append(f"{where}, expected 403")
        if answer.status_code in (401, 403) and not console_page(rule):
            body = answer.get_json()
            if answer.mimetype != "application/problem+json" or body["status"] != answer.status_code:
                wrong.append(f"{where}: not ProblemDetails ({answer.mimetype}, {body})")
        if answer.status_code in (401, 403) or rule.startswith("/console"):  # (not an event stream: it never ends)
            if any(token in answer.get_data(as_text=True) for token in tokens.values()):
                wrong.append(f"{where}: the answer quotes a token")
    return wrong


# ---------------------------------------------------------------------------------------------- the table
def test_every_served_route_has_a_rule_and_it_is_the_one_the_issue_gives(app):
    served = served_routes(app)
    assert served - set(ROUTES) == set(), "routes served without a row in this test's ROUTES: decide who may call them"
    assert set(ROUTES) - served == set(), "rows of ROUTES the app does not serve"
    endpoints = {rule.endpoint for rule in app.url_map.iter_rules()}
    assert endpoints - set(ROUTE_ACCESS) == set(), "endpoints without a rule in trainingmgr.api.access.ROUTE_ACCESS"
    assert set(ROUTE_ACCESS) - endpoints == set(), "rules of ROUTE_ACCESS for endpoints that do not exist"
    for rule in app.url_map.iter_rules():
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            assert ROUTE_ACCESS[rule.endpoint] == ROUTES[(method, rule.rule)], f"{method} {rule.rule}"


@pytest.mark.parametrize("method,rule", sorted(ROUTES), ids=[f"{m} {r}" for m, r in sorted(ROUTES)])
def test_each_route_answers_each_caller_as_its_role_says(token_app, tokens, method, rule):
    client = token_app().test_client()
    assert check_route(client, method, rule, expected_access(ROUTES[(method, rule)]), tokens) == []


def test_callbacks_and_metrics_need_a_role_when_configured_so(token_app, tokens):
    client = token_app(callback_auth="role", metrics_auth=True).test_client()
    wrong = []
    for (method, rule), access in ROUTES.items():
        if access in (CALLBACK, METRICS):
            needed = expected_access(access, callback_auth="role", metrics_auth=True)
            wrong += check_route(client, method, rule, needed, tokens)
    assert wrong == []


def test_without_authentication_no_route_asks_for_a_credential(app):
    """TM_AUTH=none, the default: the framework's clients, which send none, keep working."""
    client = app.test_client()
    for method, rule in sorted(ROUTES):
        answer = call(client, method, concrete(rule), None)
        assert answer.status_code not in (401, 403), (method, rule, answer.get_json())
        assert "WWW-Authenticate" not in answer.headers


def test_a_route_missing_from_the_table_is_closed_to_all_but_admins(token_app, tokens, monkeypatch):
    monkeypatch.delitem(ROUTE_ACCESS, "training_jobs.list_training_jobs")
    client = token_app().test_client()
    path = "/ai-ml-model-training/v1/training-jobs"
    assert call(client, "GET", path, tokens[WRITER]).status_code == 403
    assert call(client, "GET", path, tokens["admin"]).status_code == 200


def test_preflights_and_unknown_routes_need_no_credential(token_app):
    client = token_app().test_client()
    preflight = client.options("/ai-ml-model-training/v1/training-jobs", headers={
        "Origin": "http://dashboard.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert preflight.status_code == 200
    assert "authorization" in preflight.headers["Access-Control-Allow-Headers"].lower()
    assert client.get("/no/such/route").status_code == 404
    refused = client.get("/ai-ml-model-training/v1/training-jobs", headers={"Origin": "http://dashboard.example"})
    assert refused.status_code == 401
    assert refused.headers["Access-Control-Allow-Origin"] == "*", "a browser client must be able to read the 401"


@pytest.mark.parametrize("header", ["Basic dXNlcjpwYXNz", "Bearer", "Bearer ", "Token abc", "bearer",
                                    "Bearer " + "a" * 20000, "Bearer a b"])
def test_malformed_authorization_headers_are_401(token_app, header):
    answer = token_app().test_client().get("/pipelines", headers={"Authorization": header})
    assert answer.status_code == 401
    assert answer.headers["WWW-Authenticate"].startswith('Bearer realm="trainingmgr"')
    assert "a" * 100 not in answer.get_data(as_text=True)


def test_the_scheme_is_case_insensitive(token_app, tokens):
    client = token_app().test_client()
    assert client.get("/pipelines", headers={"Authorization": f"bEaReR {tokens[READER]}"}).status_code == 200


# ---------------------------------------------------------------------------------------------- token file
def test_the_token_file_holds_hashes_only_and_is_private(tmp_path: Path):
    path = tmp_path / "tokens"
    token = add_token(path, "rapp-qoe", WRITER, RoleMap())
    text = path.read_text()
    assert token not in text
    assert f"rapp-qoe writer {token_hash(token)}" in text.splitlines()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert token.startswith("tm_") and len(token) >= 40
    assert add_token(path, "other", READER, RoleMap()) != token


def test_add_token_refuses_bad_names_unknown_roles_and_duplicates(tmp_path: Path):
    path = tmp_path / "tokens"
    add_token(path, "a", READER, RoleMap())
    for name, role in (("a", READER), ("has space", READER), ("-x", READER), ("b", "superuser"), ("b", "")):
        with pytest.raises(ValueError):
            add_token(path, name, role, RoleMap())
    assert add_token(path, "c", "tm-admin", RoleMap("tm-admin=admin"))


def test_tokens_added_and_removed_while_serving_count_at_once(token_app, tmp_path: Path, tokens):
    client = token_app().test_client()
    path = tmp_path / "api-tokens"
    assert call(client, "GET", "/pipelines", tokens[READER]).status_code == 200
    fresh = add_token(path, "late", READER, RoleMap())
    assert call(client, "GET", "/pipelines", fresh).status_code == 200, "a token added later works without restart"
    assert remove_token(path, "late")
    assert call(client, "GET", "/pipelines", fresh).status_code == 401, "a removed token is refused at once"
    assert call(client, "GET", "/pipelines", tokens[READER]).status_code == 200
    assert not remove_token(path, "late")


def test_a_bad_line_costs_only_itself_and_a_missing_file_refuses_everyone(token_app, tmp_path: Path, tokens, caplog):
    client = token_app().test_client()
    path = tmp_path / "api-tokens"
    with path.open("a") as f:
        f.write("broken line\nname reader not-a-hash\nx superuser " + "0" * 64 + "\n")
    with caplog.at_level(logging.ERROR):
        assert call(client, "GET", "/pipelines", tokens[READER]).status_code == 200
    assert "line" in caplog.text and "superuser" in caplog.text
    path.unlink()
    assert call(client, "GET", "/pipelines", tokens["admin"]).status_code == 401


def test_hand_edited_files_cannot_hide_or_share_a_token(tmp_path: Path, caplog):
    path = tmp_path / "tokens"
    first, second, third = (f"tm_{n}" * 8 for n in "abc")
    # No final newline (an editor's doing), a byte-order mark, a comment that other tools show as one line.
    path.write_text("\ufeff# tokens\n"
                    f"a writer {token_hash(first)}\n"
                    f"#x\u2028b admin {token_hash(second)}\n"
                    f"c reader {token_hash(third)}\n"
                    f"d admin {token_hash(third)}", encoding="utf-8")
    with caplog.at_level(logging.ERROR):
        fresh = add_token(path, "e", READER, RoleMap())
    authenticator = StaticTokenAuthenticator(path, RoleMap())
    assert authenticator.authenticate(first).roles == {WRITER}
    assert authenticator.authenticate(fresh).roles == {READER}, "the new line did not join the last one"
    for hidden in (second, third):  # a role inside a comment; one hash under two names (which role?)
        with pytest.raises(InvalidCredentials):
            authenticator.authenticate(hidden)
    assert "same hash" in caplog.text
    assert [e.name for e in read_token_file(path)] == ["a", "e"]
    assert not remove_token(path, "#") and not remove_token(path, "x")
    assert remove_token(path, "a") and [e.name for e in read_token_file(path)] == ["e"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_concurrent_commands_lose_no_token(tmp_path: Path):
    path = tmp_path / "tokens"
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        made = list(pool.map(lambda n: add_token(path, f"t{n}", READER, RoleMap()), range(40)))
        removed = list(pool.map(lambda n: remove_token(path, f"t{n}"), range(0, 40, 2)))
    assert all(removed)
    authenticator = StaticTokenAuthenticator(path, RoleMap())
    for n, token in enumerate(made):
        if n % 2:
            assert authenticator.authenticate(token).name == f"t{n}"
        else:
            with pytest.raises(InvalidCredentials):
                authenticator.authenticate(token)


def test_role_names_in_the_file_are_mapped(token_app, tmp_path: Path):
    token = add_token(tmp_path / "api-tokens", "eng", "ml-engineer", RoleMap("ml-engineer=writer"))
    client = token_app(auth_role_map="ml-engineer=writer").test_client()
    assert call(client, "POST", "/ai-ml-model-training/v1/featureGroup", token).status_code == 400  # past the check
    unmapped = token_app().test_client()
    assert call(unmapped, "GET", "/pipelines", token).status_code == 401


def test_the_auth_commands(tmp_path: Path):
    env = {"TM_DATA_DIR": str(tmp_path / "data"), "TM_AUTH": "token"}
    runner = CliRunner()
    added = runner.invoke(cli, ["auth", "add-token", "dash", "reader"], env=env)
    assert added.exit_code == 0, added.output
    token = added.stdout.strip()
    assert re.fullmatch(r"tm_[A-Za-z0-9_-]{43}", token)
    file = tmp_path / "data" / "api-tokens"
    assert token_hash(token) in file.read_text() and token not in file.read_text()
    listed = runner.invoke(cli, ["auth", "list-tokens"], env=env)
    assert listed.exit_code == 0 and listed.stdout == "dash\treader\n"
    again = runner.invoke(cli, ["auth", "add-token", "dash", "writer"], env=env)
    assert again.exit_code != 0 and "exists already" in again.output
    unknown = runner.invoke(cli, ["auth", "add-token", "x", "root"], env=env)
    assert unknown.exit_code != 0 and "unknown role" in unknown.output
    assert runner.invoke(cli, ["auth", "remove-token", "dash"], env=env).exit_code == 0
    assert runner.invoke(cli, ["auth", "remove-token", "dash"], env=env).exit_code != 0
    assert runner.invoke(cli, ["auth", "list-tokens"], env=env).stdout == ""


def test_serve_refuses_to_start_without_its_token_file(tmp_path: Path):
    env = {**os.environ, "TM_DATA_DIR": str(tmp_path / "data"), "TM_AUTH": "token", "TM_HOST": "127.0.0.1"}
    done = subprocess.run([sys.executable, "-m", "trainingmgr", "serve"], env=env, capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)
    assert done.returncode != 0
    assert "token file" in done.stderr and "add-token" in done.stderr


# ---------------------------------------------------------------------------------------------- console login
CONSOLE_ORIGIN = {"Origin": "http://localhost"}  # the test client's own origin, as the console's pages send it
COOKIE = "tm_console_token"


def console_login(client, token: str, headers: dict[str, str] | None = None, **form: str):
    return client.post("/console/login", data={"token": token, **form},
                       headers=CONSOLE_ORIGIN if headers is None else headers)


def test_the_console_login_keeps_the_token_in_a_strict_http_only_cookie(token_app, tokens):
    client = token_app().test_client()
    page = client.get("/console/jobs")
    assert page.status_code == 303 and page.headers["Location"] == "/console/login?next=/console/jobs"
    assert client.get("/console/login").status_code == 200

    answer = console_login(client, tokens[READER], next="/console/pipelines")
    assert answer.status_code == 303 and answer.headers["Location"] == "/console/pipelines"
    cookie = answer.headers["Set-Cookie"]
    assert cookie.startswith(f"{COOKIE}={tokens[READER]};")
    assert "; HttpOnly" in cookie and "; SameSite=Strict" in cookie and "; Path=/" in cookie
    assert "Secure" not in cookie, "plain http: a Secure cookie would never come back"
    assert tokens[READER] not in answer.get_data(as_text=True)
    assert client.get("/console/jobs").status_code == 200, "pages read the cookie"
    assert client.get("/pipelines").status_code == 200, "so do the API's reads the pages make"

    logout = client.post("/console/logout", headers=CONSOLE_ORIGIN)
    assert logout.status_code == 303 and logout.headers["Location"] == "/console/login"
    assert logout.headers["Set-Cookie"].startswith(f"{COOKIE}=;") and "Max-Age=0" in logout.headers["Set-Cookie"]
    assert client.get("/console/jobs").status_code == 303


def test_over_https_the_cookie_is_secure_and_next_never_leaves_the_console(token_app, tokens):
    client = token_app().test_client()
    answer = client.post("/console/login", base_url="https://tm.example", headers={"Origin": "https://tm.example"},
                         data={"token": f"Bearer {tokens[READER]}", "next": "//evil.example/console"})
    assert answer.status_code == 303 and answer.headers["Location"] == "/console", "no redirect elsewhere"
    assert "; Secure" in answer.headers["Set-Cookie"]
    for outside in ("/console/../..//evil.example", "/console/../apidocs", "/consolex", "/console//evil.example",
                    "/console/./../metrics"):
        answer = console_login(client, tokens[READER], next=outside)
        assert answer.headers["Location"] == "/console", outside
    for inside in ("/console/jobs/7", "/console/pipelines?x=1", "/console"):
        assert console_login(client, tokens[READER], next=inside).headers["Location"] == inside


@pytest.mark.parametrize("token,status,says", [
    ("", 400, "Paste a token"),
    ("tm_" + "x" * 43, 401, "not valid"),
    ("tm_abc;def", 400, "not a bearer token"),
    ("a" * 5000, 400, "longer than"),
])
def test_a_login_with_a_bad_token_is_refused_and_the_token_never_echoed(token_app, token, status, says):
    client = token_app().test_client()
    answer = console_login(client, token)
    assert answer.status_code == status and answer.mimetype == "text/html"
    page = answer.get_data(as_text=True)
    assert says in page and (not token or token not in page)
    assert "Set-Cookie" not in answer.headers


def test_a_token_without_a_role_cannot_log_in(token_app, tmp_path: Path):
    roleless = add_token(tmp_path / "api-tokens", "nobody", "tm-nobody", RoleMap("tm-nobody=reader"))
    answer = console_login(token_app().test_client(), roleless)
    assert answer.status_code == 401, "its role name maps to nothing here"


@pytest.mark.parametrize("headers", [{}, {"Origin": "http://evil.example"}, {"Origin": "null"},
                                     {"Referer": "http://evil.example/console"},
                                     {"Origin": "http://evil.example", "Referer": "http://localhost/console/login"}])
def test_logging_in_or_out_from_another_site_is_refused(token_app, tokens, headers):
    client = token_app().test_client()
    answer = console_login(client, tokens[READER], headers)
    assert answer.status_code == 403 and "Set-Cookie" not in answer.headers
    assert client.post("/console/logout", headers=headers).status_code == 403


def test_behind_a_proxy_the_advertised_url_names_the_console_origin(token_app, tokens):
    """A proxy that ends TLS and rewrites Host: the browser's Origin is the address users open, TM_ADVERTISED_URL."""
    client = token_app(advertised_url="https://tm.example.org").test_client()
    answer = console_login(client, tokens[WRITER], {"Origin": "https://tm.example.org"})
    assert answer.status_code == 303 and "; Secure" in answer.headers["Set-Cookie"]
    cancel = "/ai-ml-model-training/v1/training-jobs/999999/cancel"
    assert client.post(cancel, headers={"Origin": "https://tm.example.org"}).status_code == 404
    assert client.post(cancel, headers={"Origin": "https://other.example.org"}).status_code == 403


def test_a_referer_of_this_host_stands_in_for_a_missing_origin(token_app, tokens):
    answer = console_login(token_app().test_client(), tokens[READER],
                           {"Referer": "http://localhost/console/login?next=/console"})
    assert answer.status_code == 303


def test_writes_authenticated_by_the_cookie_must_come_from_the_console(token_app, tokens):
    client = token_app().test_client()
    client.set_cookie(COOKIE, tokens[WRITER])
    cancel = "/ai-ml-model-training/v1/training-jobs/999999/cancel"
    for forged in ({}, {"Origin": "http://evil.example"}, {"Origin": "http://localhost.evil.example"},
                   {"Referer": "http://evil.example/"}, {"Origin": "null"}):
        answer = client.post(cancel, headers=forged)
        assert answer.status_code == 403, forged
        assert answer.mimetype == "application/problem+json" and "console's own pages" in answer.get_json()["detail"]
    assert client.post(cancel, headers=CONSOLE_ORIGIN).status_code == 404, "past the checks: no such job"
    assert client.post(cancel, headers={"Referer": "http://localhost/console/jobs/1"}).status_code == 404
    assert client.get("/ai-ml-model-training/v1/training-jobs").status_code == 200, "reads need no Origin"


def test_the_authorization_header_wins_over_the_cookie(token_app, tokens):
    client = token_app().test_client()
    client.set_cookie(COOKIE, tokens[WRITER])
    cancel = "/ai-ml-model-training/v1/training-jobs/999999/cancel"
    as_reader = client.post(cancel, headers={"Authorization": f"Bearer {tokens[READER]}"})
    assert as_reader.status_code == 403 and "reader-user" in as_reader.get_json()["detail"]
    # A client with a valid header needs no Origin: the header is no ambient credential.
    assert client.post(cancel, headers={"Authorization": f"Bearer {tokens[WRITER]}"}).status_code == 404
    bogus = client.get("/pipelines", headers={"Authorization": f"Bearer {tokens['bogus']}"})
    assert bogus.status_code == 401


def test_a_cookie_no_longer_valid_sends_pages_to_the_login_and_the_api_answers_401(token_app, tokens, tmp_path):
    client = token_app().test_client()
    for stale in (tokens["bogus"], ""):
        client.set_cookie(COOKIE, stale)
        assert client.get("/console/pipelines").headers["Location"] == "/console/login?next=/console/pipelines"
        answer = client.get("/pipelines")
        assert answer.status_code == 401 and 'error="invalid_token"' in answer.headers["WWW-Authenticate"]
        assert tokens["bogus"] not in answer.get_data(as_text=True)


def test_pages_offer_writing_controls_only_to_writers(token_app, tokens):
    client = token_app().test_client()
    client.set_cookie(COOKIE, tokens[READER])
    page = client.get("/console/pipelines")
    assert page.status_code == 200 and b'id="upload-form"' not in page.data and b"reader-user" in page.data
    client.set_cookie(COOKIE, tokens[WRITER])
    assert b'id="upload-form"' in client.get("/console/pipelines").data


def test_pages_are_not_cached_framed_or_scripted_from_elsewhere(token_app, tokens):
    client = token_app().test_client()
    client.set_cookie(COOKIE, tokens[READER])
    page = client.get("/console/featuregroups")
    assert page.headers["Cache-Control"] == "no-store" and page.headers["X-Frame-Options"] == "DENY"
    policy = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy and "unsafe-inline" not in policy
    assert b"<script>" not in page.data, "no inline script"


def test_without_authentication_the_console_needs_no_login(app):
    client = app.test_client()
    assert client.get("/").headers["Location"] == "/console"
    assert client.get("/console").status_code == 200
    assert client.get("/console/login").headers["Location"] == "/console"
    assert b'id="upload-form"' in client.get("/console/pipelines").data


# ---------------------------------------------------------------------------------------------- callbacks
def test_callbacks_only_from_the_allowed_networks(build_app):
    client = build_app(callback_allowed_networks="10.0.0.0/8, fd00::/8").test_client()
    body = {"trainingjob_id": "999999", "run_status": "FAILED"}
    for address, allowed in (("10.1.2.3", True), ("::ffff:10.1.2.3", True), ("fd00::5", True),
                             ("192.168.1.1", False), ("127.0.0.1", False), ("::1", False)):
        for path in ("/trainingjob/pipelineNotification", "/trainingjob/dataExtractionNotification"):
            answer = client.post(path, json=body, environ_base={"REMOTE_ADDR": address})
            if allowed:
                assert answer.status_code == 400, (address, answer.get_json())  # past the check: no such job
            else:
                assert answer.status_code == 403, (address, answer.get_json())
                assert "TM_CALLBACK_ALLOWED_NETWORKS" in answer.get_json()["detail"]
    # Other routes are not restricted by it.
    assert client.get("/pipelines", environ_base={"REMOTE_ADDR": "192.168.1.1"}).status_code == 200


# ---------------------------------------------------------------------------------------------- audit
def test_the_audit_line_names_the_token_never_the_token_itself(token_app, tokens, caplog):
    client = token_app().test_client()
    with caplog.at_level(logging.INFO):
        call(client, "POST", "/ai-ml-model-training/v1/featureGroup", tokens[WRITER])
        call(client, "DELETE", "/ai-ml-model-training/v1/training-jobs/7", tokens[READER])
        call(client, "DELETE", "/ai-ml-model-training/v1/training-jobs/8", tokens["bogus"])
    audit = [r for r in caplog.records if r.name == "trainingmgr.audit"]
    assert [(r.principal, r.status, r.outcome) for r in audit] == [
        ("writer-user", 400, "refused"), ("reader-user", 403, "refused"), ("anonymous", 401, "refused")]
    logged = caplog.text + json.dumps([r.__dict__ for r in caplog.records], default=str)
    assert not any(token in logged for token in tokens.values())


# ---------------------------------------------------------------------------------------------- settings
@pytest.mark.parametrize("overrides,message", [
    ({"auth": "ldap"}, "TM_AUTH"),
    ({"auth": "oidc"}, "TM_OIDC_ISSUER"),
    ({"auth": "oidc", "oidc_issuer": "https://idp.example/realms/x"}, "TM_OIDC_AUDIENCE"),
    ({"auth": "oidc", "oidc_issuer": "idp.example", "oidc_audience": "tm"}, "TM_OIDC_ISSUER"),
    ({"callback_auth": "role"}, "TM_CALLBACK_AUTH"),
    ({"auth": "token", "callback_auth": "yes"}, "TM_CALLBACK_AUTH"),
    ({"metrics_auth": True}, "TM_METRICS_AUTH"),
    ({"callback_allowed_networks": "10.0.0.0/33"}, "TM_CALLBACK_ALLOWED_NETWORKS"),
    ({"callback_allowed_networks": "pods"}, "TM_CALLBACK_ALLOWED_NETWORKS"),
    ({"auth_role_map": "tm-admin=root"}, "TM_AUTH_ROLE_MAP"),
    ({"auth_role_map": "admin"}, "TM_AUTH_ROLE_MAP"),
    ({"auth_role_map": "a=reader,a=admin"}, "mapped twice"),
])
def test_settings_that_cannot_work_are_refused_at_start(overrides, message):
    with pytest.raises(SettingsError, match=message):
        Settings.from_env({}, **overrides)
