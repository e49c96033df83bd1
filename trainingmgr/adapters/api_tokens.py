"""Static API tokens (TM_AUTH=token), the embedded authenticator: a file of `NAME ROLE SHA256` lines.

The file holds each token's SHA-256, never the token: whoever reads it learns no credential. `add_token` makes a
random token, appends its hash and hands the token back once. The service rereads the file when it changes (its
size, time or inode), so adding or removing a token needs no restart.
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import secrets
import tempfile
import threading
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

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


FIELDS = re.compile(r"[ \t]+")  # only spaces and tabs separate fields, and only \n ends a line: what `cat` shows


def _lines(text: str) -> list[str]:
    return [line.rstrip("\r") for line in text.split("\n")]


def _entry(line: str) -> TokenEntry | None:
    """The entry of one line; None for a blank or comment line; ValueError for anything else."""
    stripped = line.strip(" \t")
    if not stripped or stripped.startswith("#"):
        return None
    parts = FIELDS.split(stripped)
    if len(parts) != 3 or not NAME.fullmatch(parts[0]) or not HASH.fullmatch(parts[2]) or not parts[1].isprintable():
        raise ValueError("not NAME ROLE SHA256 (64 lowercase hex digits)")
    return TokenEntry(*parts)


def parse_token_file(text: str, source: str = "token file") -> list[TokenEntry]:
    """The entries of a token file. A line that is not `NAME ROLE SHA256`, and every line of a digest that appears
    more than once, is logged and skipped (one bad line must not lock every client out, nor grant a role
    nobody can tell). Blank lines and `#` comments are ignored."""
    entries: list[TokenEntry] = []
    for number, line in enumerate(_lines(text), start=1):
        try:
            entry = _entry(line)
        except ValueError as e:
            log.error("%s line %d is %s: skipped", source, number, e)
            continue
        if entry is not None:
            entries.append(entry)
    counts = Counter(entry.digest for entry in entries)
    for entry in entries:
        if counts[entry.digest] > 1:
            log.error("%s: token %s has the same hash as another token: both are refused", source, entry.name)
    return [entry for entry in entries if counts[entry.digest] == 1]


def read_token_file(path: Path) -> list[TokenEntry]:
    return parse_token_file(path.read_text(encoding="utf-8-sig"), str(path)) if path.exists() else []


@contextmanager
def _locked(path: Path) -> Iterator[int]:
    """The token file, created owner-only if missing, opened for appending and locked against other `auth`
    commands (the service only reads it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            current = os.stat(path, follow_symlinks=False).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(fd).st_ino:
            break
        os.close(fd)  # a remove-token replaced the file while we waited for its lock: take the new one
    try:
        yield fd
    finally:
        os.close(fd)


def _read_all(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks).decode("utf-8-sig")


def add_token(path: Path, name: str, role: str, role_map: RoleMap) -> str:
    """Append a new token for `name` with `role` and return the token (the only time it is seen)."""
    if not NAME.fullmatch(name):
        raise ValueError("a token name is 1 to 64 letters, digits, '.', '_', '@' or '-', starting with a letter or "
                         "digit")
    if role not in role_map.names:
        raise ValueError(f"unknown role {role!r}: use one of {', '.join(sorted(role_map.names))}")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    with _locked(path) as fd:
        text = _read_all(fd)
        if any(entry.name == name for entry in parse_token_file(text, str(path))):
            raise ValueError(f"a token named {name!r} exists already: remove it first to replace it")
        lines = "" if text else "# trainingmgr API tokens: NAME ROLE SHA256(token). Edit with `trainingmgr auth`.\n"
        if text and not text.endswith("\n"):
            lines = "\n"  # a file edited by hand may lack its last newline: the new line must not join that one
        os.write(fd, f"{lines}{name} {role} {token_hash(token)}\n".encode())
        os.fsync(fd)
    return token


def remove_token(path: Path, name: str) -> bool:
    """Remove every line of token `name`; False when there was none. The file is replaced atomically."""
    if not NAME.fullmatch(name) or not path.exists():
        return False
    with _locked(path) as fd:
        lines = _lines(_read_all(fd))
        kept = [line for line in lines if FIELDS.split(line.strip(" \t"))[0] != name]
        if len(kept) == len(lines):
            return False
        descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # 0600, a new file
        try:
            with os.fdopen(descriptor, "w", encoding="utf-8") as f:
                f.write("\n".join(kept))
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, path)
        except BaseException:
            os.unlink(temporary)
            raise
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
