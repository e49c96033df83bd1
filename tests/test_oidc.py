"""TM_AUTH=oidc: JWTs verified against an issuer's published keys.

The identity provider is a small local HTTP server (Keycloak cannot run here): it publishes a discovery document
and a JWKS of keys this test generates, counts the requests it gets, and signs tokens as Keycloak would (RS256,
`kid`, `realm_access.roles`). The Training Manager side is the real one.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
import struct
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.test_auth import CALLERS, ROUTES, check_route, expected_access
from trainingmgr.adapters.base import IdentityProviderUnavailable, InvalidCredentials, RoleMap
from trainingmgr.adapters import oidc
from trainingmgr.adapters.oidc import OidcAuthenticator

AUDIENCE = "trainingmgr"
ROLE_MAP = "tm-reader=reader,tm-writer=writer,tm-admin=admin"
KEYCLOAK_ROLES = {"reader": "tm-reader", "writer": "tm-writer", "admin": "tm-admin"}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class IdentityProvider:
    """An issuer at http://127.0.0.1:<port>/realms/nonrtric: discovery, JWKS, and tokens signed with its keys."""

    def __init__(self) -> None:
        self.private: dict[str, Any] = {}  # kid -> private key
        self.published: list[dict[str, Any]] = []  # the JWKS's keys
        self.hits = {"discovery": 0, "jwks": 0}
        self.jwks_answer = "keys"  # or "reset", "not json"
        idp = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                if self.path.endswith("/.well-known/openid-configuration"):
                    idp.hits["discovery"] += 1
                    body = {"issuer": idp.issuer, "jwks_uri": idp.issuer + "/protocol/openid-connect/certs"}
                elif self.path.endswith("/protocol/openid-connect/certs"):
                    idp.hits["jwks"] += 1
                    body = {"keys": list(idp.published)}
                    if idp.jwks_answer == "reset":  # a partial body, then the connection is reset
                        self.send_response(200)
                        self.send_header("Content-Length", "10000")
                        self.end_headers()
                        self.wfile.write(b'{"keys": [')
                        self.wfile.flush()
                        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        self.connection.close()
                        return
                    if idp.jwks_answer == "not json":
                        body = ["not", "a", "key", "set"]
                else:
                    self.send_response(404)
                    self.end_headers()
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.issuer = f"http://127.0.0.1:{self.server.server_address[1]}/realms/nonrtric"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.kid = self.add_rsa_key()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def add_rsa_key(self, publish: bool = True) -> str:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        return self._add(key, "RS256", publish)

    def add_ec_key(self) -> str:
        return self._add(ec.generate_private_key(ec.SECP256R1()), "ES256", True)

    def _add(self, key: Any, alg: str, publish: bool) -> str:
        kid = uuid.uuid4().hex
        self.private[kid] = key
        if publish:
            jwk = json.loads(jwt.algorithms.get_default_algorithms()[alg].to_jwk(key.public_key()))
            self.published.append({**jwk, "kid": kid, "alg": alg, "use": "sig"})
        return kid

    def claims(self, role: str | None = "writer", **changes: Any) -> dict[str, Any]:
        now = int(time.time())
        claims = {"iss": self.issuer, "aud": AUDIENCE, "sub": "f3a1-rapp-qoe", "iat": now, "nbf": now,
                  "exp": now + 300, "azp": "rapp-qoe", "realm_access": {"roles": [KEYCLOAK_ROLES[role]] if role else []}}
        claims.update(changes)
        return {k: v for k, v in claims.items() if v is not None}

    def token(self, role: str | None = "writer", *, kid: str | None = None, **changes: Any) -> str:
        kid = kid or self.kid
        key = self.private[kid]
        alg = "ES256" if isinstance(key, ec.EllipticCurvePrivateKey) else "RS256"
        return jwt.encode(self.claims(role, **changes), key, algorithm=alg, headers={"kid": kid})

    def public_pem(self) -> bytes:
        return self.private[self.kid].public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def unsigned(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    return ".".join((b64(json.dumps(header).encode()), b64(json.dumps(claims).encode()), b64(signature)))


@pytest.fixture
def idp():
    provider = IdentityProvider()
    yield provider
    provider.stop()


@pytest.fixture
def oidc_app(build_app, idp):
    def make(**overrides):
        return build_app(auth="oidc", oidc_issuer=idp.issuer, oidc_audience=AUDIENCE, auth_role_map=ROLE_MAP,
                         **overrides)
    return make


def get(client, token: str, path: str = "/pipelines"):
    return client.get(path, headers={"Authorization": f"Bearer {token}"})


# ---------------------------------------------------------------------------------------------- every route
def test_each_route_answers_each_caller_as_its_role_says(oidc_app, idp):
    client = oidc_app(callback_auth="role", metrics_auth=True).test_client()
    tokens = {caller: idp.token(caller) for caller in CALLERS if caller not in (None, "bogus")}
    tokens["bogus"] = idp.token("admin")[:-6] + "AAAAAA"  # a signature that does not verify
    wrong = []
    for (method, rule), access in sorted(ROUTES.items()):
        wrong += check_route(client, method, rule, expected_access(access, callback_auth="role", metrics_auth=True),
                             tokens)
    assert wrong == []
    assert idp.hits == {"discovery": 1, "jwks": 1}, "keys are fetched once and cached"


# ---------------------------------------------------------------------------------------------- bad tokens
def attacks(idp: IdentityProvider) -> dict[str, str]:
    now = int(time.time())
    valid = idp.token("admin")
    header, payload, signature = valid.split(".")
    forged_payload = b64(json.dumps(idp.claims("admin", sub="someone-else")).encode())
    secret_key = idp.public_pem()
    hs_header = {"alg": "HS256", "typ": "JWT", "kid": idp.kid}
    hs_input = f"{b64(json.dumps(hs_header).encode())}.{b64(json.dumps(idp.claims('admin')).encode())}"
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)  # never published
    return {
        "expired": idp.token("admin", exp=now - 120, iat=now - 420, nbf=now - 420),
        "not yet valid": idp.token("admin", nbf=now + 600, iat=now),
        "another audience": idp.token("admin", aud="account"),
        "another issuer": idp.token("admin", iss="http://evil.example/realms/nonrtric"),
        "alg none": unsigned({"alg": "none", "typ": "JWT", "kid": idp.kid}, idp.claims("admin")),
        "alg none, no kid": unsigned({"alg": "none"}, idp.claims("admin")),
        "HS256 keyed with the public key": hs_input + "." + b64(
            hmac.new(secret_key, hs_input.encode(), hashlib.sha256).digest()),
        "unknown kid": idp.token("admin", kid=idp.add_rsa_key(publish=False)),
        "signed by another key under the issuer's kid": jwt.encode(idp.claims("admin"), stranger, algorithm="RS256",
                                                                   headers={"kid": idp.kid}),
        "tampered payload": f"{header}.{forged_payload}.{signature}",
        "no signature": f"{header}.{payload}.",
        "no exp": idp.token("admin", exp=None),
        "no sub": idp.token("admin", sub=None),
        "no aud": idp.token("admin", aud=None),
        "not a JWT": "tm_" + "a" * 43,
        "garbage": "a.b.c",
    }


def test_forged_expired_and_foreign_tokens_are_refused(oidc_app, idp):
    client = oidc_app().test_client()
    assert get(client, idp.token("admin")).status_code == 200
    for name, token in attacks(idp).items():
        answer = get(client, token)
        assert answer.status_code == 401, (name, answer.get_json())
        assert answer.headers["WWW-Authenticate"] == 'Bearer realm="trainingmgr", error="invalid_token"', name
        assert token not in answer.get_data(as_text=True), name


def test_the_refusal_says_why_without_quoting_the_token(oidc_app, idp):
    client = oidc_app().test_client()
    now = int(time.time())
    for token, reason in ((idp.token(exp=now - 120), "expired"), (idp.token(aud="account"), "aud"),
                          (idp.token(iss="http://x.example"), "iss"), (idp.token(sub=None), "sub")):
        assert reason in get(client, token).get_json()["detail"]


def test_a_little_clock_skew_is_tolerated(oidc_app, idp):
    client = oidc_app().test_client()
    now = int(time.time())
    assert get(client, idp.token("reader", exp=now - 10)).status_code == 200
    assert get(client, idp.token("reader", nbf=now + 10, iat=now + 10)).status_code == 200


def test_elliptic_curve_keys_work(oidc_app, idp):
    client = oidc_app().test_client()
    assert get(client, idp.token("reader", kid=idp.add_ec_key())).status_code == 200


def test_a_symmetric_key_in_the_key_set_is_never_used(oidc_app, idp):
    """A JWKS that (by mistake) publishes an HMAC secret must not let anyone who reads it sign tokens."""
    secret = b"published-by-mistake-0123456789abcdef"
    idp.published.append({"kty": "oct", "kid": "shared", "k": b64(secret), "alg": "HS256"})
    client = oidc_app().test_client()
    for alg in ("HS256", "RS256"):
        header = {"alg": alg, "typ": "JWT", "kid": "shared"}
        signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(idp.claims('admin')).encode())}"
        token = signing_input + "." + b64(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest())
        assert get(client, token).status_code == 401, alg


def test_roles_come_from_the_configured_claim_and_unknown_roles_give_nothing(oidc_app, idp):
    client = oidc_app(oidc_roles_claim="resource_access.trainingmgr.roles").test_client()
    in_client_roles = idp.token(None, resource_access={"trainingmgr": {"roles": ["tm-writer"]}})
    assert client.post("/ai-ml-model-training/v1/featureGroup", json={},
                       headers={"Authorization": f"Bearer {in_client_roles}"}).status_code == 400  # past the check
    in_realm_roles_only = idp.token("admin")
    assert get(client, in_realm_roles_only).status_code == 403, "the realm roles are not the configured claim"
    scope_client = oidc_app(oidc_roles_claim="scope").test_client()
    assert get(scope_client, idp.token(None, scope="openid tm-reader")).status_code == 200
    assert get(scope_client, idp.token(None, scope="openid superuser")).status_code == 403


def test_only_the_mapped_role_names_count(oidc_app, idp):
    """With TM_AUTH_ROLE_MAP set, a realm role that happens to be called `admin` grants nothing."""
    client = oidc_app().test_client()
    generic = idp.token(None, realm_access={"roles": ["admin", "writer", "reader"]})
    assert get(client, generic).status_code == 403
    assert get(client, idp.token(None, realm_access={"roles": ["offline_access", "tm-reader"]})).status_code == 200


def test_the_principal_is_the_subject(oidc_app, idp, caplog):
    import logging

    client = oidc_app().test_client()
    with caplog.at_level(logging.INFO, logger="trainingmgr.audit"):
        client.delete("/ai-ml-model-training/v1/training-jobs/5",
                      headers={"Authorization": f"Bearer {idp.token('writer')}"})
    (line,) = [r for r in caplog.records if r.name == "trainingmgr.audit"]
    assert (line.principal, line.status) == ("f3a1-rapp-qoe", 404)


def test_the_console_logs_in_with_an_access_token_that_carries_a_role(oidc_app, idp):
    client = oidc_app().test_client()

    def log_in(token: str):
        return client.post("/console/login", data={"token": token}, headers={"Origin": "http://localhost"})

    roleless = log_in(idp.token(None))
    assert roleless.status_code == 403 and "carries none of the roles" in roleless.get_data(as_text=True)
    for name in ("expired", "alg none", "another audience"):
        assert log_in(attacks(idp)[name]).status_code == 401, name
    assert client.get("/console/jobs").status_code == 303, "no cookie from the refusals"
    answer = log_in(idp.token("reader"))
    assert answer.status_code == 303 and "; HttpOnly" in answer.headers["Set-Cookie"]
    page = client.get("/console/jobs")
    assert page.status_code == 200 and b"f3a1-rapp-qoe" in page.data and b'id="new-job-form"' not in page.data


# ---------------------------------------------------------------------------------------------- keys
def test_made_up_key_ids_do_not_make_the_service_hammer_the_issuer(oidc_app, idp):
    client = oidc_app().test_client()
    assert get(client, idp.token("reader")).status_code == 200
    for _ in range(30):
        assert get(client, idp.token("reader", kid=idp.add_rsa_key(publish=False))).status_code == 401
    assert idp.hits["jwks"] <= 2, idp.hits  # the first fetch, and at most one refresh per 10 s


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(oidc, "time", clock)
    return clock


def test_a_new_key_is_fetched_once_the_refresh_cooldown_has_passed(idp, clock):
    verifier = OidcAuthenticator(idp.issuer, AUDIENCE, RoleMap(ROLE_MAP), refresh_cooldown=10)
    assert verifier.authenticate(idp.token("reader")).roles == {"reader"}
    assert idp.hits == {"discovery": 1, "jwks": 1}
    rotated = idp.add_rsa_key()  # the issuer rotates its keys
    with pytest.raises(InvalidCredentials):
        verifier.authenticate(idp.token("reader", kid=rotated))
    assert idp.hits["jwks"] == 1, "within the cooldown the key set is not fetched again"
    clock.now += 11
    assert verifier.authenticate(idp.token("reader", kid=rotated)).roles == {"reader"}
    assert idp.hits["jwks"] == 2
    for _ in range(5):
        with pytest.raises(InvalidCredentials):
            verifier.authenticate(idp.token("reader", kid=idp.add_rsa_key(publish=False)))
    assert idp.hits["jwks"] == 2
    assert verifier.authenticate(idp.token("reader")).name == "f3a1-rapp-qoe", "known keys need no fetch"
    assert idp.hits == {"discovery": 1, "jwks": 2}


def test_known_keys_outlive_an_outage_and_a_rotated_out_key_stops_working(idp, clock):
    verifier = OidcAuthenticator(idp.issuer, AUDIENCE, RoleMap(ROLE_MAP))
    old_kid = idp.kid
    assert verifier.authenticate(idp.token("reader"))
    clock.now += oidc.KEYS_LIFESPAN_SECONDS + 1  # due for a refresh, and the issuer is down
    idp.jwks_answer = "reset"
    for _ in range(10):
        assert verifier.authenticate(idp.token("reader")).roles == {"reader"}, "stale keys serve while it is down"
    assert idp.hits["jwks"] == 2, "one attempt per FETCH_RETRY_SECONDS, not one per request"
    with pytest.raises(IdentityProviderUnavailable):
        verifier.authenticate(idp.token("reader", kid=idp.add_rsa_key()))  # an unknown key: cannot be checked now
    assert idp.hits["jwks"] == 2
    clock.now += oidc.FETCH_RETRY_SECONDS
    idp.jwks_answer = "keys"
    idp.published = [k for k in idp.published if k["kid"] != old_kid]  # back, without the old key
    with pytest.raises(InvalidCredentials, match="no longer publishes"):
        verifier.authenticate(idp.token("reader", kid=old_kid))
    assert idp.hits["jwks"] == 3


@pytest.mark.parametrize("answer", ["reset", "not json"])
def test_a_broken_key_set_is_a_503_not_a_500(oidc_app, idp, answer):
    idp.jwks_answer = answer
    client = oidc_app().test_client()
    for _ in range(3):
        response = get(client, idp.token("reader"))
        assert response.status_code == 503, response.get_json()
        assert response.mimetype == "application/problem+json"
    assert idp.hits["jwks"] == 1, "after a failed fetch the issuer is asked again only after a pause"


def test_an_explicit_jwks_url_needs_no_discovery(idp):
    verifier = OidcAuthenticator(idp.issuer, AUDIENCE, RoleMap(ROLE_MAP),
                                 jwks_url=idp.issuer + "/protocol/openid-connect/certs")
    assert verifier.authenticate(idp.token("admin")).roles == {"admin"}
    assert idp.hits == {"discovery": 0, "jwks": 1}


def test_cached_keys_outlive_an_issuer_outage(oidc_app, idp):
    client = oidc_app().test_client()
    assert get(client, idp.token("reader")).status_code == 200
    later = idp.token("reader")
    idp.stop()
    assert get(client, later).status_code == 200


def test_an_unreachable_issuer_is_a_503_not_a_401(oidc_app, idp):
    idp.stop()
    client = oidc_app(http_timeout=2.0).test_client()
    token = idp.token("reader")
    answer = get(client, token)
    assert answer.status_code == 503, answer.get_json()
    assert answer.headers["Retry-After"] == "5"
    assert token not in answer.get_data(as_text=True)
    verifier = OidcAuthenticator(idp.issuer, AUDIENCE, RoleMap(ROLE_MAP), timeout=2.0)
    with pytest.raises(IdentityProviderUnavailable):
        verifier.authenticate(token)


def test_a_discovery_document_naming_another_issuer_is_not_trusted(idp):
    pretender = idp.issuer + "-other"  # its discovery document (served by idp) names idp.issuer
    verifier = OidcAuthenticator(pretender, AUDIENCE, RoleMap(ROLE_MAP))
    with pytest.raises(IdentityProviderUnavailable):
        verifier.authenticate(idp.token("admin", iss=pretender))
    assert idp.hits == {"discovery": 1, "jwks": 0}


def test_an_empty_subject_is_not_a_principal(oidc_app, idp):
    assert get(oidc_app().test_client(), idp.token("admin", sub="")).status_code == 401
