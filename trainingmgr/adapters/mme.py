"""The Model Management Service (optional): is a model registered, where does it live, what data does it take."""
from __future__ import annotations

from typing import Any

import requests

from .base import AdapterError

DISCOVERY = "/ai-ml-model-discovery/v1/models"


class MmeClient:
    def __init__(self, url: str, *, timeout: float):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.http = requests.Session()
        self.http.trust_env = False

    def lookup(self, modelname: str, modelversion: str) -> dict[str, Any] | None:
        """The registered model (its first record), or None when the MME does not know it (404 or [])."""
        try:
            response = self.http.get(
                self.url + DISCOVERY,
                params={"model-name": modelname, "model-version": modelversion},
                timeout=self.timeout,
                allow_redirects=False,
            )
        except requests.RequestException as e:
            raise AdapterError(f"Model Management Service unreachable: {e.__class__.__name__}", retryable=True) from None
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise AdapterError(f"Model Management Service answered {response.status_code}",
                               retryable=response.status_code >= 500)
        try:
            records = response.json()
        except (ValueError, RecursionError):
            raise AdapterError("Model Management Service answered something that is not JSON") from None
        if not isinstance(records, list) or not records:
            return None
        if not isinstance(records[0], dict):
            raise AdapterError("Model Management Service answered an unexpected shape")
        return records[0]

    def ready(self) -> bool:
        try:
            return self.http.get(self.url + DISCOVERY, timeout=self.timeout).status_code < 500
        except requests.RequestException:
            return False
