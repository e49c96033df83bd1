"""The outbound policy: which addresses a client may make this service call.

Clients supply addresses the service later connects to: a job's `notification_url`, a feature group's InfluxDB
`host`/`port` and DME `host`/`dme_port`. Unchecked, they reach anything the service can reach (its own loopback
ports, a cloud's metadata service). Every such address is

- parsed strictly when the client sends it: a host is a host name or an IP literal and nothing else (no `127.1`,
  `0x7f000001` or `2130706433`, which resolvers read as 127.0.0.1; no path or user part), a port is a number, a
  URL is http or https;
- checked against the rules when the client sends it (a 400 naming the rule) and again when the service connects,
  against every address the name resolves to then, so a name that resolves somewhere else later gets nowhere.

Denied by default: loopback, link-local (with 169.254.169.254), unspecified, multicast, reserved and documentation
ranges, and the cloud metadata names. Private ranges (10/8, 172.16/12, 192.168/12, fc00::/7, 100.64/10) are allowed:
rApps, InfluxDB and the DME live there. TM_OUTBOUND_DENY (CIDRs, host names, `*.suffix`) is checked first, then
TM_OUTBOUND_ALLOW, then the defaults. Addresses the operator configures (TM_KFP_HOST, TM_S3_ENDPOINT,
TM_DATA_EXTRACTION_URL, TM_MME_URL) are trusted and not checked here.
"""
from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass
from typing import Any, Iterable, Union
from urllib.parse import urlsplit

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

# Each default rule: its name (as 400s and job reasons show it) and its ranges.
DEFAULT_DENIED_NETWORKS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("loopback", ("127.0.0.0/8", "::1/128")),
    ("unspecified", ("0.0.0.0/8", "::/128")),
    ("link-local (cloud metadata)", ("169.254.0.0/16", "fe80::/10", "100.100.100.200/32", "fd00:ec2::254/128")),
    ("multicast", ("224.0.0.0/4", "ff00::/8")),
    ("reserved", ("240.0.0.0/4", "192.0.0.0/24", "192.0.2.0/24", "198.18.0.0/15", "198.51.100.0/24",
                  "203.0.113.0/24", "2001:db8::/32", "100::/64")),
    # IPv6 forms that carry an IPv4 address a gateway or tunnel may route to (the address itself is checked too,
    # where Python can take it out): IPv4-compatible (deprecated), IPv4-translated, local-use NAT64, Teredo.
    ("IPv6 carrying an IPv4 address", ("::/96", "::ffff:0:0:0/96", "64:ff9b:1::/48", "2001::/32")),
)
DEFAULT_DENIED_NAMES = ("localhost", "*.localhost", "metadata", "metadata.google.internal", "metadata.goog",
                        "instance-data", "instance-data.ec2.internal", "*.internal.cloudapp.net")

_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOSTNAME = re.compile(rf"(?:{_LABEL}\.)*{_LABEL}\.?")
# A last label that resolvers read as a number (127.1, 2130706433, 0x7f000001): only a full dotted quad may be one.
_NUMERIC_LABEL = re.compile(r"(?:[0-9]+|0[xX][0-9A-Fa-f]*)")
_PORT = re.compile(r"[0-9]{1,5}")


class OutboundDenied(Exception):
    """A client-supplied address is not one this service may call; `rule` names why."""

    def __init__(self, target: str, rule: str):
        super().__init__(f"{target} is not allowed: {rule}")
        self.target = target
        self.rule = rule


@dataclass(frozen=True)
class Endpoint:
    host: str  # a host name (lower case, no trailing dot) or an IP address as text, without brackets
    port: int | None
    address: IPAddress | None  # when the host is an IP literal


def parse_host(text: str) -> tuple[str, IPAddress | None]:
    """(host, IP address or None) of a host name or an IP literal (IPv6 with or without brackets); ValueError else."""
    host = text.strip() if isinstance(text, str) else ""
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    if not host:
        raise ValueError("the host is empty")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        if bracketed:  # brackets hold an IPv6 address and nothing else
            raise ValueError(f"{text!r} is not an IPv6 address") from None
    else:
        if bracketed and address.version != 6:
            raise ValueError(f"{text!r}: brackets hold an IPv6 address only")
        if getattr(address, "scope_id", None):
            raise ValueError(f"{text!r}: an IPv6 zone is not allowed")
        return str(address), address
    if not _HOSTNAME.fullmatch(host) or len(host) > 253:
        raise ValueError(f"{text!r} is not a host name or an IP address")
    name = host.rstrip(".").lower()
    if _NUMERIC_LABEL.fullmatch(name.rsplit(".", 1)[-1]):
        raise ValueError(f"{text!r} is not a host name or an IP address (write an IPv4 address as four numbers)")
    return name, None


def parse_port(text: Any) -> int:
    value = str(text).strip() if isinstance(text, (str, int)) and not isinstance(text, bool) else ""
    if not _PORT.fullmatch(value) or not 0 < int(value) < 65536:
        raise ValueError(f"{text!r} is not a port number")
    return int(value)


def http_url(host: str, port: int) -> str:
    """http://host:port of a host parse_host accepted (an IPv6 address goes in brackets)."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def parse_url(url: str) -> Endpoint:
    """The endpoint of an http(s) URL with a strict host; ValueError for anything else."""
    parts = urlsplit(url) if isinstance(url, str) else None
    if parts is None or parts.scheme not in ("http", "https"):
        raise ValueError("only http:// and https:// URLs are allowed")
    if parts.username is not None or parts.password is not None:
        raise ValueError("a URL with a user name or password is not allowed")
    netloc_host = parts.netloc.rsplit("@", 1)[-1]
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{url!r} has an invalid port") from None
    if port == 0:
        raise ValueError(f"{url!r} has an invalid port")
    hostname = parts.hostname or ""
    host, address = parse_host(f"[{hostname}]" if netloc_host.startswith("[") else hostname)
    return Endpoint(host, port or (443 if parts.scheme == "https" else 80), address)


def _name_matches(name: str, patterns: Iterable[str]) -> bool:
    for pattern in patterns:
        if pattern.startswith("*."):
            if name.endswith(pattern[1:]):
                return True
        elif name == pattern:
            return True
    return False


def _embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, 6to4, NAT64), which is where a connection really goes."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address.sixtofour is not None:
            return address.sixtofour
        if address in ipaddress.ip_network("64:ff9b::/96"):
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


class OutboundPolicy:
    def __init__(self, allow: str = "", deny: str = ""):
        self.allow, self.deny = allow, deny  # as configured (a forked extraction builds the same policy)
        self.allow_networks, self.allow_names = self._entries(allow, "TM_OUTBOUND_ALLOW")
        self.deny_networks, self.deny_names = self._entries(deny, "TM_OUTBOUND_DENY")
        self.default_networks = [(rule, ipaddress.ip_network(cidr)) for rule, cidrs in DEFAULT_DENIED_NETWORKS
                                 for cidr in cidrs]

    @staticmethod
    def _entries(text: str, setting: str) -> tuple[list[IPNetwork], list[str]]:
        networks: list[IPNetwork] = []
        names: list[str] = []
        for entry in (e.strip() for e in (text or "").split(",")):
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
                continue
            except ValueError:
                pass
            name = entry.lower().rstrip(".")
            if not _HOSTNAME.fullmatch(name.removeprefix("*.")):
                raise ValueError(f"{setting}: {entry!r} is neither a CIDR nor a host name")
            names.append(name)
        return networks, names

    # ------------------------------------------------------------------ rules
    def name_rule(self, name: str) -> str | None:
        """Why a host name is denied before it is resolved (None: look at its addresses)."""
        if _name_matches(name, self.deny_names):
            return "denied by TM_OUTBOUND_DENY"
        if _name_matches(name, self.allow_names):
            return None
        if _name_matches(name, DEFAULT_DENIED_NAMES):
            return "a local or cloud metadata host name"
        return None

    def name_allowed_outright(self, name: str) -> bool:
        """An operator allowed this name: its addresses are trusted whatever they are."""
        return not _name_matches(name, self.deny_names) and _name_matches(name, self.allow_names)

    def address_rule(self, address: IPAddress) -> str | None:
        """Why an IP address is denied, or None."""
        candidates = [address]
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            candidates.append(embedded)
        for candidate in candidates:
            if any(candidate in net for net in self.deny_networks):
                return "denied by TM_OUTBOUND_DENY"
        for candidate in candidates:
            if any(candidate in net for net in self.allow_networks):
                return None
        for candidate in candidates:
            for rule, net in self.default_networks:
                if candidate in net:
                    return rule
        return None

    # ------------------------------------------------------------------ request time
    def check_host(self, host_text: str, what: str = "host") -> str:
        """The host, normalised, if a client may name it; ValueError (unparsable) or OutboundDenied."""
        host, address = parse_host(host_text)
        rule = self.address_rule(address) if address is not None else self.name_rule(host)
        if rule:
            raise OutboundDenied(f"{what} {host}", rule)
        return host

    def check_url(self, url: str, what: str = "URL") -> Endpoint:
        endpoint = parse_url(url)
        self.check_host(endpoint.host, what)
        return endpoint

    # ------------------------------------------------------------------ connect time
    def resolve(self, host: str, port: int) -> list[tuple[Any, ...]]:
        """getaddrinfo() results for a connection to host:port, every one of them allowed; OutboundDenied if any
        is not (a name with one good and one bad address is refused: which one a client gets is not ours to say)."""
        name, address = parse_host(host)
        if address is None:
            rule = self.name_rule(name)
            if rule:
                raise OutboundDenied(f"host {name}", rule)
        infos = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)
        if address is None and self.name_allowed_outright(name):
            return infos
        for info in infos:
            resolved = ipaddress.ip_address(info[4][0].split("%", 1)[0])
            rule = self.address_rule(resolved)
            if rule:
                raise OutboundDenied(f"host {name} (resolves to {resolved})", rule)
        return infos


# ---------------------------------------------------------------------------------------- HTTP clients
def guarded_pool_classes(policy: OutboundPolicy) -> dict[str, type]:
    """urllib3 connection-pool classes whose connections resolve through `policy` and connect only to the addresses
    it allowed (no second lookup that could answer differently)."""
    from urllib3 import connection as u3connection
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
    from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError

    class Guarded:
        def _new_conn(self: Any) -> socket.socket:
            try:
                infos = policy.resolve(self._dns_host, self.port)
            except socket.gaierror as e:
                raise NameResolutionError(self.host, self, e) from e
            last: Exception | None = None
            for family, kind, proto, _name, sockaddr in infos:
                sock = socket.socket(family, kind, proto)
                try:
                    for level, option, value in self.socket_options or ():
                        sock.setsockopt(level, option, value)
                    sock.settimeout(self.timeout if isinstance(self.timeout, (int, float)) else None)
                    sock.connect(sockaddr)
                    return sock
                except socket.timeout as e:
                    sock.close()
                    last = ConnectTimeoutError(self, f"Connection to {self.host} timed out. (connect timeout="
                                                     f"{self.timeout})")
                    last.__cause__ = e
                except OSError as e:
                    sock.close()
                    last = NewConnectionError(self, f"Failed to establish a new connection: {e}")
                    last.__cause__ = e
            raise last or NewConnectionError(self, "no address to connect to")

    http_conn = type("GuardedHTTPConnection", (Guarded, u3connection.HTTPConnection), {})
    https_conn = type("GuardedHTTPSConnection", (Guarded, u3connection.HTTPSConnection), {})
    return {
        "http": type("GuardedHTTPConnectionPool", (HTTPConnectionPool,), {"ConnectionCls": http_conn}),
        "https": type("GuardedHTTPSConnectionPool", (HTTPSConnectionPool,), {"ConnectionCls": https_conn}),
    }


def guard_pool_manager(pool_manager: Any, policy: OutboundPolicy) -> None:
    """Make a urllib3 PoolManager (requests', influxdb-client's) connect through the policy."""
    pool_manager.pool_classes_by_scheme = guarded_pool_classes(policy)


def guarded_session(policy: OutboundPolicy) -> Any:
    """A requests Session that connects only where the policy allows, ignores proxy settings of the environment
    (a proxy would make the connection for us, past the policy) and follows no redirects."""
    import requests
    from requests.adapters import HTTPAdapter

    class GuardedAdapter(HTTPAdapter):
        def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
            super().init_poolmanager(*args, **kwargs)
            guard_pool_manager(self.poolmanager, policy)

    session = requests.Session()
    session.trust_env = False
    session.max_redirects = 0
    session.mount("http://", GuardedAdapter())
    session.mount("https://", GuardedAdapter())
    return session
