"""DME information jobs for feature groups with enable_dme: PUT to create (201), DELETE to remove (204)."""
from __future__ import annotations

import logging
from typing import Any

import requests

from ..models.feature_group import split_names
from .base import AdapterError
from .outbound import OutboundDenied, OutboundPolicy, guarded_session, http_url

log = logging.getLogger(__name__)


def info_job_body(fg: Any, topic: str, bootstrap_servers: str) -> dict[str, Any]:
    return {
        "info_type_id": "PmData",
        "job_owner": "console",
        "job_definition": {
            "filter": {
                "sourceNames": split_names(fg.source_name or ""),
                "measObjInstIds": [],
                "measTypeSpecs": [
                    {
                        "measuredObjClass": fg.measured_obj_class or "",
                        "measTypes": fg.features,
                    }
                ],
                "measuredEntityDns": [],
            },
            "deliveryInfo": {"topic": topic, "bootStrapServers": bootstrap_servers},
        },
    }


class DmeClient:
    def __init__(self, *, topic: str, bootstrap_servers: str, timeout: float, outbound: OutboundPolicy):
        self.topic = topic
        self.bootstrap_servers = bootstrap_servers
        self.timeout = timeout
        # The DME's host is the feature group's, a client's choice: connections go only where the outbound policy
        # allows, with no proxy from the environment (the DME is inside the cluster).
        self.http = guarded_session(outbound)

    @staticmethod
    def url(fg: Any) -> str:
        # The service checked the host when the feature group was stored.
        return f"{http_url(fg.host, int(fg.dme_port))}/data-consumer/v1/info-jobs/{fg.name}"

    def _call(self, method: str, fg: Any, ok: tuple[int, ...], **kwargs: Any) -> int:
        try:
            response = self.http.request(method, self.url(fg), timeout=self.timeout, allow_redirects=False, **kwargs)
        except OutboundDenied as e:
            raise AdapterError(f"DME at {fg.host}:{fg.dme_port}: {e}", retryable=False) from None
        except requests.RequestException as e:
            raise AdapterError(f"DME at {fg.host}:{fg.dme_port} unreachable: {e.__class__.__name__}",
                               retryable=True) from None
        if response.status_code not in ok:
            raise AdapterError(
                f"DME answered {response.status_code} to {method} of information job {fg.name}",
                retryable=response.status_code >= 500,
            )
        return response.status_code

    def create_job(self, fg: Any) -> None:
        """Create or replace the feature group's information job (PUT is idempotent)."""
        self._call("PUT", fg, (200, 201), json=info_job_body(fg, self.topic, self.bootstrap_servers))
        log.info("DME information job put", extra={"featuregroup": fg.name})

    def delete_job(self, fg: Any) -> None:
        """Remove the job; one that is already gone (404) counts as removed."""
        self._call("DELETE", fg, (200, 204, 404))
        log.info("DME information job deleted", extra={"featuregroup": fg.name})
