"""Encryption at rest for feature-group tokens (Fernet: AES-128-CBC + HMAC-SHA256).

Keys come from TM_SECRET_KEY (comma-separated: the first encrypts, every one decrypts, which allows rotation).
A key may be a Fernet key or any passphrase (stretched with SHA-256). Without TM_SECRET_KEY a random key is made
once in <TM_DATA_DIR>/secret.key (mode 0600): fine for one embedded instance; replicas must share TM_SECRET_KEY.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import os
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cryptography.fernet import Fernet, MultiFernet

# cryptography (about 10 MB of a process) is imported when a token is first encrypted or decrypted: most processes
# never do.
MASK = "****"


class SecretKeyError(RuntimeError):
    """A stored token cannot be decrypted with the configured keys."""


def _fernet(key: str) -> "Fernet":
    from cryptography.fernet import Fernet

    key = key.strip()
    try:
        if len(base64.urlsafe_b64decode(key.encode())) == 32:
            return Fernet(key.encode())
    except (binascii.Error, ValueError):
        pass
    return Fernet(base64.urlsafe_b64encode(hashlib.sha256(key.encode()).digest()))


def _key_file(data_dir: Path) -> str:
    path = data_dir / "secret.key"
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        # O_EXCL: two processes starting at once do not overwrite each other's key.
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(base64.urlsafe_b64encode(os.urandom(32)))  # a Fernet key (Fernet.generate_key)
    return path.read_text().strip()


class TokenCipher:
    def __init__(self, secret_key: str, data_dir: Path):
        self._keys = [k for k in secret_key.split(",") if k.strip()] or [_key_file(data_dir)]

    @cached_property
    def _fernet(self) -> "MultiFernet":
        from cryptography.fernet import MultiFernet

        return MultiFernet([_fernet(k) for k in self._keys])

    def encrypt(self, token: str) -> str:
        return self._fernet.encrypt(token.encode()).decode() if token else ""

    def decrypt(self, stored: str) -> str:
        if not stored:
            return ""
        from cryptography.fernet import InvalidToken

        try:
            return self._fernet.decrypt(stored.encode()).decode()
        except InvalidToken:
            raise SecretKeyError("a stored token cannot be decrypted: TM_SECRET_KEY changed?") from None

    @staticmethod
    def mask(stored: str) -> str:
        return MASK if stored else ""
