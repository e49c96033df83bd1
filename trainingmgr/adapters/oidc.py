"""OpenID Connect bearer tokens (TM_AUTH=oidc), the real authenticator: a JWT from the operator's identity
provider (Keycloak in the framework's platform), verified with PyJWT against the issuer's published keys (JWKS).

What is checked: the signature, with an asymmetric algorithm the key itself is for (never `none`, never an HMAC
algorithm, whose "secret" would be the public key); `exp` and `nbf` with LEEWAY_SECONDS of clock skew; `iss`;
`aud`; a `sub`. The keys are fetched on first use (the issuer's discovery document names them unless
TM_OIDC_JWKS_URL does), cached for KEYS_LIFESPAN_SECONDS and fetched again early for a key id not seen yet, at most
once per `refresh_cooldown` seconds, so tokens with made-up key ids cannot make the service hammer the issuer.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any

import jwt
from jwt import PyJWKClient
from jwt.exceptions import PyJWKClientConnectionError, PyJWKClientError, PyJWKError, PyJWKSetError

from .base import Authenticator, IdentityProviderUnavailable, InvalidCredentials, Principal, RoleMap

log = logging.getLogger(__name__)

ASYMMETRIC_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
LEEWAY_SECONDS = 30
KEYS_LIFESPAN_SECONDS = 300
DISCOVERY_RETRY_SECONDS = 5  # while the issuer cannot be reached, ask it again at most this often


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
        self._client: PyJWKClient | None = None
        self._lock = threading.Lock()
        self._discovery_failed_at = float("-inf")

    # ------------------------------------------------------------------ keys
    def _keys(self) -> PyJWKClient:
        if self._client is not None:
            return self._client
        with self._lock:
            if self._client is None:
                url = self._jwks_url or self._discover_jwks_url()
                self._client = PyJWKClient(url, cache_jwk_set=True, lifespan=KEYS_LIFESPAN_SECONDS,
                                           timeout=self.timeout, cooldown_duration=self.refresh_cooldown)
            return self._client

    def _discover_jwks_url(self) -> str:
        """`jwks_uri` of the issuer's discovery document, which must name the same issuer (OpenID Connect
        Discovery 1.0, section 4.3)."""
        if time.monotonic() - self._discovery_failed_at < DISCOVERY_RETRY_SECONDS:
            raise IdentityProviderUnavailable("the identity provider could not be reached")
        import requests

        url = self.issuer.rstrip("/") + "/.well-known/openid-configuration"
        try:
            response = requests.get(url, timeout=self.timeout, allow_redirects=False)
            response.raise_for_status()
            document = response.json()
            if document.get("issuer") != self.issuer:
                raise ValueError(f"it names issuer {str(document.get('issuer'))[:200]!r}, not TM_OIDC_ISSUER")
            jwks_uri = document["jwks_uri"]
            if not isinstance(jwks_uri, str) or not jwks_uri.startswith(("http://", "https://")):
                raise ValueError("its jwks_uri is not an http(s) URL")
        except (requests.RequestException, ValueError, KeyError, TypeError, AttributeError) as e:
            self._discovery_failed_at = time.monotonic()
            log.error("OIDC discovery at %s failed: %s", url, str(e)[:300])
            raise IdentityProviderUnavailable("the identity provider could not be reached") from None
        return jwks_uri

    def _signing_key(self, kid: str) -> jwt.PyJWK:
        try:
            return self._keys().get_signing_key(kid)
        except PyJWKClientConnectionError as e:
            log.error("the identity provider's keys could not be fetched: %s", str(e)[:300])
            raise IdentityProviderUnavailable("the identity provider's keys could not be fetched") from None
        except (PyJWKClientError, PyJWKSetError, PyJWKError) as e:
            # An unknown key id, or a key set with no usable key for it.
            log.info("no signing key for a token's kid: %s", str(e)[:300])
            raise InvalidCredentials("the token is signed with a key the identity provider does not publish") from None
        except ValueError as e:  # a key set that is not JSON
            log.error("the identity provider's key set cannot be read: %s", str(e)[:300])
            raise IdentityProviderUnavailable("the identity provider's keys could not be read") from None

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
        if key.algorithm_name not in ASYMMETRIC_ALGORITHMS:
            raise InvalidCredentials("the token is signed with a key the identity provider does not publish")
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
        return Principal(str(claims["sub"])[:128], self.role_map.roles_of(self._role_names(claims)))

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
