"""Which addresses and hosts an image URL may reach: the SSRF policy, free of any HTTP code.

A serverless endpoint takes URLs from anyone holding its key, and the worker runs inside
a cloud network: a URL must not reach the worker itself, its VPC, or the cloud's metadata
service (which hands out credentials). Every address a URL leads to, whether written
literally or resolved from a name, at every redirect hop, is classified here and refused
unless it is a public unicast address. IPv6 forms that carry an IPv4 address
(``::ffff:127.0.0.1``, ``::127.0.0.1``, 6to4 ``2002::/16``, NAT64 ``64:ff9b::/96``) are
judged by the IPv4 address they carry, because that is where the packets end up.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

import idna

from vlm_worker.contract.errors import ConfigError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class AddressClass(enum.Enum):
    """What an address is, as far as fetching an image from it is concerned."""

    GLOBAL = "a public address"
    METADATA = "a cloud metadata service address"
    UNSPECIFIED = "the unspecified address"
    LOOPBACK = "a loopback address"
    PRIVATE = "a private-network address"
    SHARED = "a shared (carrier-grade NAT) address"
    LINK_LOCAL = "a link-local address"
    MULTICAST = "a multicast address"
    RESERVED = "a reserved or special-purpose address"


#: Instance metadata endpoints (AWS/GCP/Azure/Oracle, AWS ECS and DNS, AWS IPv6, Alibaba).
#: Refused even when private addresses are allowed: no image lives there, credentials do.
METADATA_ADDRESSES: frozenset[IPAddress] = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",
        "169.254.169.253",
        "169.254.170.2",
        "fd00:ec2::254",
        "fd00:ec2::23",
        "100.100.100.200",
        "168.63.129.16",  # Azure's host platform endpoint (WireServer)
    )
)

#: Classes ALLOW_PRIVATE_IMAGE_URLS opens: networks a deployment may own (a local test
#: server, an internal CDN). Link-local stays closed: metadata services live there.
PRIVATE_CLASSES = frozenset({AddressClass.LOOPBACK, AddressClass.PRIVATE, AddressClass.SHARED})

_PRIVATE_NETS = tuple(
    ipaddress.ip_network(n)
    for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7", "fec0::/10")
)
_SHARED_NET = ipaddress.ip_network("100.64.0.0/10")
#: IANA's IETF protocol assignments (192.0.0.0/24): not for hosts to fetch from, the
#: anycast .9 and .10 included, whatever this Python's ``is_global`` says of them.
_PROTOCOL_ASSIGNMENTS_NET = ipaddress.ip_network("192.0.0.0/24")
_NAT64_NET = ipaddress.ip_network("64:ff9b::/96")
_IPV4_COMPATIBLE_NET = ipaddress.ip_network("::/96")


def embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address delivers to, for the forms that carry one."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64_NET or (ip in _IPV4_COMPATIBLE_NET and int(ip) > 1):
        return ipaddress.IPv4Address(int(ip) & 0xFFFF_FFFF)
    return None


def classify(ip: IPAddress) -> AddressClass:
    """The class of one address; only ``GLOBAL`` is reachable by default."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            ip = ipaddress.IPv6Address(ip.compressed.split("%", 1)[0])
        inner = embedded_ipv4(ip)
        if inner is not None:
            return classify(inner)
        if ip.teredo is not None:  # the client address is obfuscated: nothing to judge
            return AddressClass.RESERVED
    if ip in METADATA_ADDRESSES:
        return AddressClass.METADATA
    if ip.is_unspecified:
        return AddressClass.UNSPECIFIED
    if ip.is_loopback:
        return AddressClass.LOOPBACK
    if ip.is_link_local:
        return AddressClass.LINK_LOCAL
    if ip.is_multicast:
        return AddressClass.MULTICAST
    if ip.version == 4 and ip in _SHARED_NET:
        return AddressClass.SHARED
    if any(ip.version == net.version and ip in net for net in _PRIVATE_NETS):
        return AddressClass.PRIVATE
    if ip.version == 4 and ip in _PROTOCOL_ASSIGNMENTS_NET:
        return AddressClass.RESERVED
    if not ip.is_global or ip.is_reserved:  # is_reserved: unallocated IPv6, 240/4
        return AddressClass.RESERVED
    return AddressClass.GLOBAL


@dataclass(frozen=True)
class AddressPolicy:
    """Which addresses may be connected to.

    ``trusted`` networks are allowed whatever their class: a seam for tests (one loopback
    address stands in for a public server while another stays refused), not a setting.
    """

    allow_private: bool = False
    trusted: tuple[IPNetwork, ...] = ()

    def refusal(self, ip: IPAddress) -> AddressClass | None:
        """Why ``ip`` is refused, or None when it may be connected to."""
        if any(ip.version == net.version and ip in net for net in self.trusted):
            return None
        cls = classify(ip)
        if cls is AddressClass.GLOBAL or (self.allow_private and cls in PRIVATE_CLASSES):
            return None
        return cls


_NUMERIC_LABEL = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$", re.I)
_HOST_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


def literal_address(host: str) -> IPAddress | None:
    """The address a URL host names literally, or None for a host name.

    Legacy numeric spellings (``2130706433``, ``0x7f.1``, ``127.1``) reach an address
    through ``inet_aton`` without looking like one; they are refused outright instead
    of being handed to a resolver that would turn them into 127.0.0.1.
    """
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        pass
    last = host.rstrip(".").rsplit(".", 1)[-1]
    if _NUMERIC_LABEL.match(last):
        raise ValueError(f"host {host!r} is neither a canonical IP address nor a host name")
    return None


def normalize_domain(entry: str) -> str:
    """One ALLOWED_IMAGE_DOMAINS entry as the ASCII, lower-case, dot-less name it matches."""
    name = entry.strip().lower().removeprefix("*.").strip(".")
    try:  # IDNA 2008 with UTS 46, as URLs' hosts are encoded (yarl): faß.de is not fass.de
        name = idna.encode(name, uts46=True).decode("ascii")
    except (idna.IDNAError, UnicodeError) as exc:
        raise ConfigError(f"ALLOWED_IMAGE_DOMAINS entry {entry!r} is not a host name") from exc
    labels = name.split(".")
    if (
        not name
        or not all(_HOST_LABEL.match(label) for label in labels)
        or _NUMERIC_LABEL.match(labels[-1])
    ):
        raise ConfigError(
            f"ALLOWED_IMAGE_DOMAINS entry {entry!r} is not a host name (write e.g. "
            f"example.com, which also allows its subdomains; no scheme, port or path)"
        )
    return name


@dataclass(frozen=True)
class DomainAllowList:
    """ALLOWED_IMAGE_DOMAINS: a host matches an entry or any subdomain of it.

    Matching is on whole labels, so ``example.com`` allows ``cdn.example.com`` but not
    ``evil-example.com`` or ``example.com.evil.net``. Empty means any host.
    """

    domains: tuple[str, ...] = ()

    @classmethod
    def parse(cls, entries: Iterable[str] | None) -> DomainAllowList:
        return cls(tuple(normalize_domain(e) for e in entries or () if e.strip()))

    def allows(self, host: str) -> bool:
        if not self.domains:
            return True
        name = host.lower().rstrip(".")
        return any(name == d or name.endswith("." + d) for d in self.domains)
