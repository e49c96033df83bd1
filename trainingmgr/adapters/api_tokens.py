"""Static API tokens (TM_AUTH=token), the embedded authenticator: a file of `NAME ROLE SHA256` lines.

The file holds each token's SHA-256, never the token: whoever reads it learns no credential. `add_token` makes a
random token, appends its hash and hands the token back once. The service rereads the file when it changes (its
size, time or inode), so adding or removing a token needs no restart.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path

from .base import Authenticator, InvalidCredentials, Principal, RoleMap

log = logging.getLogger(__name__)

TOKEN_PREFIX = "tm_"  # makes a leaked token easy to recognise (secret scanners, logs)
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
HASH = re.compile(r"[0-9a-f]{64}")
_NOT_READ = object()


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class TokenEntry:
    name: str
    role: str  # as written in the file: an API role or a name TM_AUTH_ROLE_MAP maps to one
    digest: str


def parse_token_file(text: str, source: str = "token file") -> list[TokenEntry]:
    """The entries of a token file; a line that is not `NAME ROLE SHA256` is logged and skipped (one bad line
    must not lock every client out). Blank lines and `#` comments are ignored."""
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 3 or not NAME.fullmatch(parts[0]) or not HASH.fullmatch(parts[2].lower()):
            log.error("%s line %d is not NAME ROLE SHA256 (64 hex digits): skipped", source, number)
            continue
        entries.append(TokenEntry(parts[0], parts[1], parts[2].lower()))
    return entries


def read_token_file(path: Path) -> list[TokenEntry]:
    return parse_token_file(path.read_text(encoding="utf-8"), str(path)) if path.exists() else []


def add_token(path: Path, name: str, role: str, role_map: RoleMap) -> str:
    """Append a new token for `name` with `role` and return the token (the only time it is seen)."""
    if not NAME.fullmatch(name):
        raise ValueError("a token name is 1 to 64 letters, digits, '.', '_', '@' or '-', starting with a letter or "
                         "digit")
    if role not in role_map.names:
        raise ValueError(f"unknown role {role!r}: use one of {', '.join(sorted(role_map.names))}")
    if any(entry.name == name for entry in read_token_file(path)):
        raise ValueError(f"a token named {name!r} exists already: remove it first to replace it")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Owner-only from the start (the file is created with 0600, not chmod-ed afterwards); appends are atomic lines.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        if f.tell() == 0:
            f.write("# trainingmgr API tokens: NAME ROLE SHA256(token). Edit with `trainingmgr auth`.\n")
        f.write(f"{name} {role} {token_hash(token)}\n")
    return token


def remove_token(path: Path, name: str) -> bool:
    """Remove every line of token `name`; False when there was none. The file is replaced atomically."""
    if not path.exists():
        return False
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if line.split()[:1] != [name]]
    if len(kept) == len(lines):
        return False
    temporary = path.with_name(path.name + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(temporary, path)
    return True


class StaticTokenAuthenticator(Authenticator):
    """Checks a bearer token against the token file, rereading the file when it changed."""

    def __init__(self, path: Path, role_map: RoleMap):
        self.path = path
        self.role_map = role_map
        self._lock = threading.Lock()
        self._signature: object = _NOT_READ
        self._principals: dict[str, Principal] = {}

    def _current(self) -> dict[str, Principal]:
        try:
            stat = os.stat(self.path)
            signature: tuple[int, int, int] | None = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        except OSError:
            signature = None
        if signature == self._signature:
            return self._principals
        with self._lock:
            if signature != self._signature:
                self._principals = self._load(signature)
                self._signature = signature
            return self._principals

    def _load(self, signature: tuple[int, int, int] | None) -> dict[str, Principal]:
        if signature is None:
            log.error("token file %s cannot be read: every token is refused until it can", self.path)
            return {}
        try:
            entries = read_token_file(self.path)
        except (OSError, UnicodeDecodeError) as e:
            log.error("token file %s cannot be read (%s): every token is refused until it can", self.path,
                      e.__class__.__name__)
            return {}
        principals = {}
        for entry in entries:
            roles = self.role_map.roles_of([entry.role])
            if not roles:
                log.error("token %s in %s has role %r, which is neither an API role nor mapped by "
                          "TM_AUTH_ROLE_MAP: it is refused", entry.name, self.path, entry.role)
                continue
            principals[entry.digest] = Principal(entry.name, roles)
        log.info("token file %s loaded: %d tokens", self.path, len(principals))
        return principals

    def authenticate(self, credential: str) -> Principal:
        # A lookup by the token's hash: the file never holds a token, and the time taken says nothing about how
        # close a guess came to one.
        principal = self._current().get(token_hash(credential))
        if principal is None:
            raise InvalidCredentials("it is not one of the tokens of this service")
        return principal
