"""rApp notifications: one bounded HTTP POST per call. Retries with backoff belong to the caller's durable queue,
so a restart does not lose them and a slow receiver never holds a worker for more than one timeout.

The wire body is what the reference sent (see wire-compat.md, "rApp notification"): the steps_state serialised to a
JSON string (models.lifecycle.notification_body), sent as a JSON string literal. Our additions are headers only:
X-TM-Delivery-Id (the same for every attempt of one notification, so receivers can drop duplicates) and, with a
key, X-TM-Signature.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
from typing import Any
from urllib.parse import urlsplit

import requests

from .base import Notifier
from .outbound import OutboundDenied, OutboundPolicy, guarded_session

log = logging.getLogger(__name__)

DELIVERY_HEADER = "X-TM-Delivery-Id"
SIGNATURE_HEADER = "X-TM-Signature"


def sign(key: str, body: bytes) -> str:
    """The X-TM-Signature value: receivers recompute it over the exact body bytes with the shared key."""
    return "sha256=" + hmac.new(key.encode("utf-8"), body, hashlib.sha256).hexdigest()


class HttpNotifier(Notifier):
    def __init__(self, timeout: float, hmac_key: str = "", *, outbound: OutboundPolicy):
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.timeout = float(timeout)
        self._hmac_key = hmac_key
        # One session per notifier keeps connections alive between notifications; requests' pool is thread-safe
        # for independent POSTs. Redirects are never followed (allow_redirects=False below): a 3xx is "not
        # delivered", and the body never goes to a host the job's owner did not name. Connections go only where
        # the outbound policy allows, checked against the addresses the name resolves to when connecting.
        self._session = guarded_session(outbound)

    def send(self, url: str, body: Any, delivery_id: str) -> bool:
        parts = urlsplit(url) if isinstance(url, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            scheme = parts.scheme if parts is not None else type(url).__name__
            log.warning(
                "notification not sent: only http and https URLs are allowed, not %r",
                scheme,
                extra={"delivery_id": delivery_id},
            )
            return False
        host = parts.hostname  # only the host is logged: paths and queries may carry the receiver's tokens
        payload = json.dumps(body).encode("utf-8")
        headers = {"Content-Type": "application/json", DELIVERY_HEADER: delivery_id}
        if self._hmac_key:
            headers[SIGNATURE_HEADER] = sign(self._hmac_key, payload)
        try:
            # stream=True: we need the status only; the response body is never read.
            with self._session.post(
                url,
                data=payload,
                headers=headers,
                timeout=(self.timeout, self.timeout),
                allow_redirects=False,
                stream=True,
            ) as response:
                status = response.status_code
        except OutboundDenied as e:
            log.warning("notification to %s not sent: %s", host, e.rule,
                        extra={"host": host, "delivery_id": delivery_id})
            return False
        except (requests.RequestException, ValueError, OSError) as e:
            log.warning(
                "notification to %s not delivered: %s",
                host,
                e.__class__.__name__,
                extra={"host": host, "delivery_id": delivery_id},
            )
            return False
        if status != 200:
            log.warning(
                "notification to %s not delivered: status %s",
                host,
                status,
                extra={"host": host, "status": status, "delivery_id": delivery_id},
            )
            return False
        return True

    def close(self) -> None:
        self._session.close()
