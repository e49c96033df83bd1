"""OpenID Connect bearer tokens (TM_AUTH=oidc), the real authenticator: a JWT from the operator's identity
provider (Keycloak in the framework's platform), verified with PyJWT against the issuer's published keys (JWKS).

What is checked: the signature, with an asymmetric algorithm the key itself is for (never `none`, never an HMAC
algorithm, whose "secret" would be the public key); `exp` and `nbf` with LEEWAY_SECONDS of clock skew; `iss`;
`aud`; a non-empty `sub`.

The keys: fetched on first use (the issuer's discovery document names them unless TM_OIDC_JWKS_URL does) and kept
for KEYS_LIFESPAN_SECONDS. A token whose key is known never waits for the network: when the keys are due for a
refresh, one request refreshes them while the others go on with the keys they have, and if the issuer cannot be
reached the known keys stay in use (a rotated-out key stops working once a refresh succeeds). A key id not seen yet
makes the service fetch the keys again, at most once per `refresh_cooldown` seconds, so tokens with made-up key ids
cannot make it hammer the issuer; after a failed fetch it asks again only after FETCH_RETRY_SECONDS, answering
"unavailable" meanwhile without waiting.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any

import jwt

from .base import Authenticator, IdentityProviderUnavailable, InvalidCredentials, Principal, RoleMap

log = logging.getLogger(__name__)

ASYMMETRIC_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
LEEWAY_SECONDS = 30
KEYS_LIFESPAN_SECONDS = 300
FETCH_RETRY_SECONDS = 5  # after the issuer could not be reached, ask it again at most this often


class OidcAuthenticator(Authenticator):
    def __init__(self, issuer: str, audience: str, role_map: RoleMap, *, roles_claim: str = "realm_access.roles",
                 jwks_url: str = "", timeout: float = 10.0, refresh_cooldown: float = 10.0):
        self.issuer = issuer
        self.audience = audience
        self.role_map = role_map
        self.roles_claim = [part for part in roles_claim.split(".") if part]
        self.timeout = timeout
        self.refresh_cooldown = refresh_cooldown
        self._jwks_url = jwks_url
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at = float("-inf")  # time.monotonic() of the last fetch that succeeded
        self._failed_at = float("-inf")  # ... and of the last that did not
        self._fetching = threading.Lock()

    # ------------------------------------------------------------------ keys
    def _signing_key(self, kid: str) -> jwt.PyJWK:
        key = self._keys.get(kid)
        if key is not None:
            if time.monotonic() - self._fetched_at >= KEYS_LIFESPAN_SECONDS and self._fetching.acquire(blocking=False):
                try:  # due for a refresh, and no other request is at it; on failure the known keys stay
                    self._refresh(keep_on_failure=True)
                finally:
                    self._fetching.release()
                key = self._keys.get(kid)
            if key is not None:
                return key
            raise InvalidCredentials("the token is signed with a key the identity provider no longer publishes")
        with self._fetching:  # an unknown key id: wait for a fetch in progress, which may bring it
            if kid not in self._keys and time.monotonic() - self._fetched_at >= self.refresh_cooldown:
                self._refresh(keep_on_failure=False)
            key = self._keys.get(kid)
        if key is None:
            raise InvalidCredentials("the token is signed with a key the identity provider does not publish")
        return key

    def _refresh(self, *, keep_on_failure: bool) -> None:
        """Fetch the key set (the caller holds the lock)."""
        if time.monotonic() - self._failed_at < FETCH_RETRY_SECONDS:
            if keep_on_failure:
                return
            raise IdentityProviderUnavailable("the identity provider could not be reached")
        try:
            url = self._jwks_url or self._discover_jwks_url()
            key_set = jwt.PyJWKSet.from_dict(self._get_json(url))
        except Exception as e:  # noqa: BLE001 - whatever the issuer or the network did, it is "unavailable"
            self._failed_at = time.monotonic()
            log.error("the identity provider's keys could not be fetched: %s: %s", e.__class__.__name__,
                      str(e)[:300])
            if keep_on_failure:
                return
            raise IdentityProviderUnavailable("the identity provider's keys could not be fetched") from None
        self._keys = {key.key_id: key for key in key_set.keys
                      if key.key_id and key.public_key_use in ("sig", None)
                      and key.algorithm_name in ASYMMETRIC_ALGORITHMS}
        self._fetched_at = time.monotonic()
        log.info("identity provider keys fetched: %d signing keys", len(self._keys))

    def _discover_jwks_url(self) -> str:
        """`jwks_uri` of the issuer's discovery document, which must name the same issuer (OpenID Connect
        Discovery 1.0, section 4.3). Remembered once found."""
        document = self._get_json(self.issuer.rstrip("/") + "/.well-known/openid-configuration")
        if document.get("issuer") != self.issuer:
            raise ValueError(f"the discovery document names issuer {str(document.get('issuer'))[:200]!r}, not "
                             "TM_OIDC_ISSUER")
        jwks_uri = document.get("jwks_uri")
        if not isinstance(jwks_uri, str) or not jwks_uri.startswith(("http://", "https://")):
            raise ValueError("the discovery document's jwks_uri is not an http(s) URL")
        self._jwks_url = jwks_uri
        return jwks_uri

    def _get_json(self, url: str) -> dict[str, Any]:
        import requests

        response = requests.get(url, timeout=self.timeout, allow_redirects=False)
        response.raise_for_status()
        document = response.json()
        if not isinstance(document, dict):
            raise ValueError(f"{url} did not answer a JSON object")
        return document

    # ------------------------------------------------------------------ tokens
    def authenticate(self, credential: str) -> Principal:
        try:
            header = jwt.get_unverified_header(credential)
        except jwt.PyJWTError:
            raise InvalidCredentials("the bearer token is not a JWT") from None
        if header.get("alg") not in ASYMMETRIC_ALGORITHMS:
            raise InvalidCredentials("the token's algorithm is not accepted (an asymmetric signature is needed)")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise InvalidCredentials("the token names no signing key (kid)")
        key = self._signing_key(kid)
        try:
            # The key fixes the algorithm: PyJWT refuses a token whose header names another one.
            claims = jwt.decode(credential, key=key, algorithms=[key.algorithm_name], audience=self.audience,
                                issuer=self.issuer, leeway=LEEWAY_SECONDS,
                                options={"require": ["exp", "iss", "aud", "sub"]})
        except jwt.ExpiredSignatureError:
            raise InvalidCredentials("the token has expired") from None
        except jwt.ImmatureSignatureError:
            raise InvalidCredentials("the token is not valid yet (nbf or iat in the future)") from None
        except jwt.InvalidAudienceError:
            raise InvalidCredentials("the token is not meant for this service (aud)") from None
        except jwt.InvalidIssuerError:
            raise InvalidCredentials("the token comes from another issuer (iss)") from None
        except jwt.MissingRequiredClaimError as e:
            raise InvalidCredentials(f"the token has no {e.claim} claim") from None
        except jwt.PyJWTError:
            raise InvalidCredentials("the token's signature or content is not valid") from None
        if not isinstance(claims["sub"], str) or not claims["sub"].strip():
            raise InvalidCredentials("the token has no sub claim")
        return Principal(claims["sub"][:128], self.role_map.roles_of(self._role_names(claims)))

    def _role_names(self, claims: dict[str, Any]) -> list[str]:
        """The values of the roles claim (a dotted path): a list of names, or one space-separated string."""
        value: Any = claims
        for part in self.roles_claim:
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, str):
            return value.split()
        if isinstance(value, list):
            return [v for v in value if isinstance(v, str)]
        return []
