"""Where downloads may go: public addresses only, unless the API itself is on a private one.

An output URL comes from the server's answer; followed blindly it reaches whatever the machine running the
engine can reach: a cloud metadata service (169.254.169.254), a database on localhost, the office network.
So a download's host must be, or resolve to, public addresses only. The API's own host is always allowed,
and when it is itself private (the simulator, a test server, a gateway on the local network) so is every
other host: that setup fetches from the local network by design. Names are checked as the connector
resolves them (`CheckedResolver`: the addresses checked are the ones connected to, so a name that changes
its answer between a check and the connect cannot slip through); literal IP addresses, which the connector
never resolves, are checked by `OutputTargets.refusal` before each request and each redirect.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver


class RefusedTarget(OSError):
    """A download's host is, or resolves to, a private, loopback, link-local or other non-public address."""


def is_public(address: str) -> bool:
    """Whether ``address`` (an IP literal, maybe with an IPv6 zone) is a public unicast address."""
    try:
        ip = ipaddress.ip_address(address.partition("%")[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:169.254.169.254 is 169.254.169.254
    return ip.is_global and not ip.is_multicast


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return False
    return True


def _private_host(host: str) -> bool:
    """A host known to be private from its name alone: ``localhost``, or a literal non-public address."""
    return host == "localhost" or host.endswith(".localhost") or (_is_ip(host) and not is_public(host))


class OutputTargets:
    """Which hosts downloads may reach (see the module's docstring); one per client."""

    __slots__ = ("_allow_private", "_learn", "api_host")

    def __init__(self, base_url: str, *, allow_private: bool | None = None) -> None:
        self.api_host = (urlsplit(base_url).hostname or "").lower()
        #: None: decided from the API's host, and learnt when its name first resolves to a private address
        self._learn = allow_private is None
        self._allow_private = _private_host(self.api_host) if allow_private is None else allow_private

    def __repr__(self) -> str:
        return f"OutputTargets(api_host={self.api_host!r}, allow_private={self._allow_private})"

    def refusal(self, url: str) -> str | None:
        """Why ``url`` must not be fetched, judged without a lookup (scheme, literal address); else None."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return "only http(s) URLs with a host are fetched"
        host = parts.hostname.lower()
        if self._allow_private or host == self.api_host or not _is_ip(host) or is_public(host):
            return None
        return f"{host} is {_NOT_PUBLIC}"

    def checked(self, host: str, results: list[ResolveResult]) -> list[ResolveResult]:
        """The resolved addresses a connection to ``host`` may use; RefusedTarget when none is public."""
        host = host.lower()
        if host == self.api_host:
            if self._learn and any(not is_public(r["host"]) for r in results):
                self._allow_private = True
            return results
        if self._allow_private:
            return results
        public = [r for r in results if is_public(r["host"])]
        if not public:
            shown = ", ".join(sorted({r["host"] for r in results})) or "nothing"
            raise RefusedTarget(f"{host} resolves to {shown}, {_NOT_PUBLIC}")
        return public


_NOT_PUBLIC = (
    "not a public address (private, loopback, link-local or reserved): outputs are fetched only from public "
    "addresses while the API is on one"
)


class CheckedResolver(AbstractResolver):
    """aiohttp's default resolver, its answers passed through `OutputTargets.checked`."""

    def __init__(self, targets: OutputTargets) -> None:
        self._targets = targets
        self._inner = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return self._targets.checked(host, await self._inner.resolve(host, port, family))

    async def close(self) -> None:
        await self._inner.close()
