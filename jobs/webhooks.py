"""Webhooks: the job object POSTed to the job's URL when it ends, signed, retried with backoff.

The body is the job object as ``GET /jobs/{id}`` returns it. ``X-Toonserve-Signature`` is
``sha256=<hex>``, the HMAC-SHA256 of the exact body bytes under the server's webhook secret; a
receiver recomputes it and compares in constant time. A delivery that does not get a 2xx answer is
tried again after 1 s, 2 s, 4 s … up to the attempt limit; whether it was delivered is stored with
the job, so a restart resumes pending deliveries.

**Bounds.** Whatever a receiver does, one delivery costs little and ends:

* each attempt has one deadline for the whole of it (the host's resolution, connecting, TLS, sending
  the body, the answer's head and the part of its body that is read): ``timeout_s``, the
  ``webhook_timeout_s`` setting. A receiver that trickles its answer a byte at a time is cut off
  there, as is one that never answers; the attempt counts as failed and is tried again later;
* only the status code matters: the answer is streamed and at most :data:`REPLY_READ_LIMIT` bytes
  of its body are read before the connection is closed (the network layer takes what has arrived,
  at most 64 KiB at a time, and the socket's receive buffer is kept at :data:`RECEIVE_BUFFER`). A
  2xx answer whose body is still coming at the deadline counts as delivered. The answer's head is
  bounded by the HTTP parser (100 KiB), its body is never decompressed, and redirects are not
  followed;
* at most ``concurrency`` attempts run at once across all jobs (the ``webhook_concurrency``
  setting); the others wait for a slot, and the pauses between attempts hold none.

**Where it connects.** Only http(s) URLs are accepted. Each attempt resolves the host once, checks
every address the answer holds, and connects to a checked address itself (not to the name, which
could resolve to something else a moment later: DNS rebinding), sending the URL's ``Host`` header
and, over https, the URL's host name for SNI and as the name the certificate must carry (httpcore's
``sni_hostname`` request extension, which it hands to the TLS handshake as ``server_hostname``).
Addresses are tried in the resolver's order until one connects. Proxies from the environment are not
used (the checked address is the one connected to). A host spelled as a number (``2130706433``,
``0x7f.1``, ``127.1``, ``0177.0.0.1``: the spellings of ``inet_aton``) or as an IPv6 literal is that
address, without asking the resolver.

Unless private addresses are allowed (``webhook_allow_private``), a URL is refused, at submission
(:func:`check_url`) and again at every attempt, when any address of its host is not public. An IPv4
address is public when Python calls it global and it lies in none of: ``0.0.0.0/8`` ("this
network", ``0.0.0.0``), ``10.0.0.0/8``, ``172.16.0.0/12``, ``192.168.0.0/16`` (private),
``100.64.0.0/10`` (shared address space, carrier NAT), ``127.0.0.0/8`` (loopback), ``169.254.0.0/16``
(link-local, cloud metadata), ``192.0.0.0/24`` (IETF protocol assignments), ``192.0.2.0/24``,
``198.51.100.0/24``, ``203.0.113.0/24`` (documentation), ``192.88.99.0/24`` (6to4 relay anycast),
``198.18.0.0/15`` (benchmarking), ``224.0.0.0/4`` (multicast), ``240.0.0.0/4`` (reserved, with the
broadcast ``255.255.255.255``).

An IPv6 address is public only if every IPv4 address embedded in it is public, and:

* ``::ffff:0:0/96`` (IPv4-mapped) and ``64:ff9b::/96`` (NAT64, well-known prefix) are public exactly
  when their IPv4 address is (they reach that host);
* ``64:ff9b:1::/48`` (NAT64, local use: it translates to whatever the local network means) is refused;
* ``2002::/16`` (6to4) needs its embedded IPv4 address to be public, and is otherwise judged like any
  other address;
* anything outside ``2000::/3``, the only global unicast space, is refused: ``::/128``
  (unspecified), ``::1`` (loopback), ``::/96`` (IPv4-compatible, deprecated; its embedded address is
  checked too), ``100::/64`` (discard), ``5f00::/16`` (SRv6), ``fc00::/7`` (unique-local),
  ``fe80::/10`` (link-local), ``fec0::/10`` (site-local, deprecated), ``ff00::/8`` (multicast) and
  the reserved rest;
* inside it, ``2001::/23`` (IETF protocol assignments: Teredo ``2001::/32``, whose server and client
  addresses are also checked, benchmarking, ORCHID…), ``2001:db8::/32`` and ``3fff::/20``
  (documentation) are refused, and the address must be global in Python's own table too.

With private addresses allowed, no address is checked, but attempts still resolve once and connect to
the address they resolved.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import socket
import ssl
import string
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, cast
from urllib.parse import urlsplit

import httpx

from jobs.errors import WebhookRefusedError
from jobs.model import Job, public_job
from serving.log_context import trace_var
from serving.retry import backoff_s

log = logging.getLogger(__name__)

SIGNATURE_HEADER: Final = "X-Toonserve-Signature"
#: Longest webhook URL accepted.
MAX_URL_LENGTH: Final = 2048
#: Bytes of a webhook answer's body read at most (only its status code matters).
REPLY_READ_LIMIT: Final = 4096
#: The kernel's receive buffer of a webhook connection (Linux doubles it): what a receiver can push
#: ahead of what is read stays this small, rather than growing to several MB per connection.
RECEIVE_BUFFER: Final = 32 * 1024
#: Bytes of a non-2xx answer's body a log line shows.
_REPLY_SHOWN: Final = 200

#: How a host name becomes addresses: ``socket.getaddrinfo``'s signature, called as
#: ``resolver(host, port, 0, socket.SOCK_STREAM)``; the address is the first item of each answer's
#: last field.
Resolver = Callable[[str, int, int, int], Sequence[tuple[Any, Any, Any, Any, tuple[Any, ...]]]]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Outcome = Literal["delivered", "error", "refused"]

_V4_NOT_PUBLIC: Final = tuple(
    ipaddress.IPv4Network(net)
    for net in (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.0.0.0/24",
        "192.0.2.0/24",
        "192.88.99.0/24",
        "192.168.0.0/16",
        "198.18.0.0/15",
        "198.51.100.0/24",
        "203.0.113.0/24",
        "224.0.0.0/4",
        "240.0.0.0/4",
    )
)
_V6_MAPPED: Final = ipaddress.IPv6Network("::ffff:0:0/96")
_V6_COMPATIBLE: Final = ipaddress.IPv6Network("::/96")
_V6_NAT64: Final = ipaddress.IPv6Network("64:ff9b::/96")
_V6_NAT64_LOCAL: Final = ipaddress.IPv6Network("64:ff9b:1::/48")
_V6_GLOBAL_UNICAST: Final = ipaddress.IPv6Network("2000::/3")
_V6_NOT_PUBLIC: Final = tuple(
    ipaddress.IPv6Network(net) for net in ("2001::/23", "2001:db8::/32", "3fff::/20")
)


def sign(secret: str, body: bytes) -> str:
    """The signature header's value for ``body``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def _public_v4(ip: ipaddress.IPv4Address) -> bool:
    return ip.is_global and not ip.is_multicast and not any(ip in net for net in _V4_NOT_PUBLIC)


def embedded_ipv4(ip: IPAddress) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries: IPv4-mapped, IPv4-compatible, NAT64 (well-known
    prefix), 6to4, and Teredo's server and client."""
    if isinstance(ip, ipaddress.IPv4Address):
        return []
    low32 = ipaddress.IPv4Address(int(ip) & 0xFFFF_FFFF)
    found: list[ipaddress.IPv4Address] = []
    if ip in _V6_MAPPED or ip in _V6_COMPATIBLE or ip in _V6_NAT64:
        found.append(low32)
    if ip.sixtofour is not None:
        found.append(ip.sixtofour)
    if ip.teredo is not None:
        found.extend(ip.teredo)
    return found


def is_public(address: str | IPAddress) -> bool:
    """Whether webhooks may go to ``address`` while private ones are not allowed (module docstring).
    A string may carry a ``%zone``; one that is not an address is not public."""
    if isinstance(address, str):
        try:
            address = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
    if isinstance(address, ipaddress.IPv4Address):
        return _public_v4(address)
    if address in _V6_NAT64_LOCAL:
        return False
    if not all(_public_v4(v4) for v4 in embedded_ipv4(address)):
        return False
    if address in _V6_MAPPED or address in _V6_NAT64:
        return True  # a translation: it reaches its (public) IPv4 address
    if address not in _V6_GLOBAL_UNICAST or any(address in net for net in _V6_NOT_PUBLIC):
        return False
    return address.is_global and not address.is_multicast and not address.is_site_local


def _numeric_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """``host`` read the way ``inet_aton`` reads it (1 to 4 parts, each decimal, ``0x`` hex or
    ``0`` octal, the last filling the remaining bytes), or None when it is not such a number."""
    parts = host.split(".")
    if not 1 <= len(parts) <= 4:
        return None
    values = []
    for part in parts:
        if part[:2].lower() == "0x":
            digits, base, allowed = part[2:], 16, string.hexdigits
        elif len(part) > 1 and part.startswith("0"):
            digits, base, allowed = part[1:], 8, string.octdigits
        else:
            digits, base, allowed = part, 10, string.digits
        if not digits or any(c not in allowed for c in digits):
            return None
        values.append(int(digits, base))
    *leading, last = values
    if any(v > 255 for v in leading) or last >= 256 ** (4 - len(leading)):
        return None
    number = last
    for i, v in enumerate(leading):
        number |= v << (8 * (3 - i))
    return ipaddress.IPv4Address(number)


def literal_address(host: str) -> IPAddress | None:
    """The address ``host`` (a URL's host, without brackets) spells, if it spells one: an IPv6
    literal (any ``%zone`` dropped) or an IPv4 address in any spelling ``inet_aton`` accepts."""
    if ":" in host:
        try:
            return ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            return None
    return _numeric_ipv4(host)


def _parse(url: str) -> httpx.URL:
    """``url`` parsed as the delivery parses it, or :class:`WebhookRefusedError` saying why not."""
    shown = url if len(url) <= 200 else url[:200] + "…"
    if len(url) > MAX_URL_LENGTH:
        raise WebhookRefusedError(f"webhook URL is longer than {MAX_URL_LENGTH} characters")
    try:
        urlsplit(url).port  # noqa: B018 (refuses what the standard library would: ports over 65535…)
        parsed = httpx.URL(url)
        host = parsed.raw_host.decode("ascii")
    except (ValueError, httpx.InvalidURL) as exc:
        raise WebhookRefusedError(f"webhook {shown!r} is not a valid URL: {exc}") from None
    if parsed.scheme not in ("http", "https") or not host:
        raise WebhookRefusedError(f"webhook must be an http:// or https:// URL with a host, got {shown!r}")
    return parsed


def _port(url: httpx.URL) -> int:
    return url.port or (443 if url.scheme == "https" else 80)


def resolve(host: str, port: int, resolver: Resolver = socket.getaddrinfo) -> list[str]:
    """The addresses of ``host`` (blocking: call it off the event loop), each once, in the resolver's
    order; a host that spells an address is that address. Raises ``OSError`` (or ``UnicodeError``)
    when the host does not resolve."""
    literal = literal_address(host)
    if literal is not None:
        return [str(literal)]
    addresses: list[str] = []
    for info in resolver(host, port, 0, socket.SOCK_STREAM):
        address = str(info[4][0])
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise OSError(f"{host} has no address")
    return addresses


def _refuse_private(host: str, addresses: Sequence[str]) -> None:
    for address in addresses:
        if not is_public(address):
            verb = "is" if address == host else "resolves to"
            raise WebhookRefusedError(
                f"webhook host {host!r} {verb} {address}, a private, loopback or link-local address (or "
                "another range that is not public); such webhooks are refused unless the server allows them"
            )


def check_url(url: str, allow_private: bool, *, resolver: Resolver = socket.getaddrinfo) -> str:
    """``url`` if webhooks may be sent there; :class:`WebhookRefusedError` saying why not. Resolves
    the host (blocking: call it off the event loop). A host that does not resolve now is let through:
    DNS may be down for a moment, and every delivery checks again before it connects."""
    parsed = _parse(url)
    if allow_private:
        return url
    host = parsed.raw_host.decode("ascii")
    try:
        addresses = resolve(host, _port(parsed), resolver)
    except (OSError, UnicodeError):
        return url
    _refuse_private(host, addresses)
    return url


@dataclass
class Attempt:
    """How one attempt went: ``status`` is the answer's status code (None without an answer),
    ``received`` the bytes of its body read (under :data:`REPLY_READ_LIMIT` plus one network read),
    ``address`` the address connected to, ``detail`` why it failed."""

    outcome: Outcome = "error"
    status: int | None = None
    received: int = 0
    address: str | None = None
    detail: str = ""
    excerpt: bytes = b""


class WebhookSender:
    """Delivers webhooks in the background (one task per ended job); see the module docstring for the
    bounds and the address checks."""

    def __init__(
        self,
        secret: str | None,
        *,
        allow_private: bool,
        attempts: int,
        timeout_s: float,
        concurrency: int = 8,
        on_delivery: Callable[[str], None] | None = None,
        first_delay_s: float = 1.0,
        resolver: Resolver = socket.getaddrinfo,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        """``timeout_s``: the deadline of one whole attempt. ``concurrency``: attempts in flight at
        most, across all jobs. ``resolver``: how host names are resolved (``socket.getaddrinfo``'s
        signature). ``ssl_context``: how https receivers are verified (default: httpx's, the
        ``certifi`` roots or ``SSL_CERT_FILE``/``SSL_CERT_DIR``)."""
        self.secret = secret
        self.allow_private = allow_private
        self.attempts = attempts
        self.timeout_s = timeout_s
        self.concurrency = concurrency
        self.first_delay_s = first_delay_s
        self.resolver = resolver
        self._ssl_context = ssl_context
        self._slots = asyncio.Semaphore(concurrency)
        self._on_delivery = on_delivery or (lambda _: None)

    def body(self, job: Job) -> bytes:
        return json.dumps(public_job(job), separators=(",", ":")).encode()

    def headers(self, job: Job, body: bytes) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "X-Toonserve-Event": f"job.{job.status}"}
        if self.secret:
            headers[SIGNATURE_HEADER] = sign(self.secret, body)
        # The delivery's span, in the trace of the request that made the job: the receiver goes on in it.
        trace = trace_var.get()
        if trace is not None:
            headers.update(trace.headers())
        return headers

    async def deliver(self, job: Job) -> bool:
        """POST the ended job to its webhook until a 2xx answer or the attempts run out."""
        assert job.webhook is not None
        body = self.body(job)
        headers = self.headers(job, body)
        outcome: Outcome = "error"
        for attempt in range(1, self.attempts + 1):
            result = await self.attempt(job.webhook, body, headers)
            outcome = result.outcome
            if outcome == "delivered":
                self._on_delivery("delivered")
                return True
            if outcome == "refused":
                log.warning("webhook of job %s refused: %s", job.id, result.detail)
                break
            if result.status is not None:
                log.info(
                    "webhook of job %s answered %d: %r", job.id, result.status, result.excerpt[:_REPLY_SHOWN]
                )
            else:
                log.info("webhook of job %s: %s", job.id, result.detail)
            self._on_delivery("retried" if attempt < self.attempts else "failed")
            if attempt < self.attempts:
                await asyncio.sleep(backoff_s(attempt, self.first_delay_s))
        if outcome == "refused":
            self._on_delivery("refused")
        log.warning("webhook of job %s not delivered to %s", job.id, job.webhook)
        return False

    async def attempt(self, url: str, body: bytes, headers: Mapping[str, str]) -> Attempt:
        """One POST of ``body`` to ``url``: waits for one of the ``concurrency`` slots, then resolves,
        checks and connects, all within ``timeout_s``. Never raises for what the receiver or the
        network does."""
        result = Attempt()
        async with self._slots:
            try:
                async with asyncio.timeout(self.timeout_s):
                    await self._attempt(url, body, headers, result)
            except TimeoutError:
                if result.status is not None:  # the answer came; reading its body took too long
                    result.outcome = "delivered" if 200 <= result.status < 300 else "error"
                else:
                    result.outcome = "error"
                    result.detail = f"no answer within {self.timeout_s:g} s"
        return result

    async def _attempt(self, url: str, body: bytes, headers: Mapping[str, str], result: Attempt) -> None:
        try:
            target = _parse(url)
        except WebhookRefusedError as exc:
            result.outcome, result.detail = "refused", str(exc)
            return
        host = target.raw_host.decode("ascii")
        try:
            addresses = await asyncio.to_thread(resolve, host, _port(target), self.resolver)
        except (OSError, UnicodeError) as exc:
            result.detail = f"{host} does not resolve: {exc}"
            return
        if not self.allow_private:
            try:
                _refuse_private(host, addresses)
            except WebhookRefusedError as exc:
                result.outcome, result.detail = "refused", str(exc)
                return
        send_headers = {**headers, "Host": target.netloc.decode("ascii"), "Accept-Encoding": "identity"}
        extensions = {"sni_hostname": host} if target.scheme == "https" else {}
        if self._ssl_context is None:  # made once, off the loop (reading the CA roots takes a moment)
            self._ssl_context = await asyncio.to_thread(httpx.create_ssl_context)
        # Each address gets a fair share of the deadline to connect; the deadline bounds the rest.
        connect_s = min(self.timeout_s, max(1.0, self.timeout_s / len(addresses)))
        timeout = httpx.Timeout(self.timeout_s, connect=connect_s)
        # A client of its own: no connection is kept for another attempt or another job.
        transport = httpx.AsyncHTTPTransport(
            verify=self._ssl_context,
            trust_env=False,
            socket_options=[(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)],
        )
        async with httpx.AsyncClient(
            transport=transport, timeout=timeout, follow_redirects=False, trust_env=False
        ) as client:
            for address in addresses:
                try:
                    connect_url = target.copy_with(host=address)
                except httpx.InvalidURL as exc:  # e.g. a link-local address with a zone
                    result.detail = f"cannot connect to {address}: {exc}"
                    continue
                result.address = address
                try:
                    async with client.stream(
                        "POST", connect_url, content=body, headers=send_headers, extensions=extensions
                    ) as response:
                        result.status = response.status_code
                        result.outcome = "delivered" if 200 <= response.status_code < 300 else "error"
                        await self._read_some(response, result)
                    return
                except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                    result.detail = f"cannot connect to {address}: {exc or type(exc).__name__}"
                    continue  # the next address
                except (httpx.HTTPError, httpx.InvalidURL, ValueError) as exc:
                    if result.status is None:
                        result.detail = f"{address}: {exc or type(exc).__name__}"
                    return  # a failure after the answer's status keeps the outcome it gave

    @staticmethod
    async def _read_some(response: httpx.Response, result: Attempt) -> None:
        """Reads at most about :data:`REPLY_READ_LIMIT` bytes of the body (undecoded), keeping the
        first of them for the log."""
        raw = cast(AsyncGenerator[bytes, None], response.aiter_raw())  # a generator, typed as an iterator
        async with contextlib.aclosing(raw) as chunks:
            async for chunk in chunks:
                result.received += len(chunk)
                if len(result.excerpt) < _REPLY_SHOWN:
                    result.excerpt += chunk[: _REPLY_SHOWN - len(result.excerpt)]
                if result.received >= REPLY_READ_LIMIT:
                    break
