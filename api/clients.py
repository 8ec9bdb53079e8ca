"""Who is calling: named API keys, addresses behind trusted proxies, and each client's limits.

A client is known by its API key's *name*. Keys come from ``TOONSERVE_API_KEY`` (one key, named
:data:`UNNAMED`), ``TOONSERVE_API_KEYS`` (``name=key,name=key``) and ``TOONSERVE_API_KEYS_FILE`` (one
``name=key`` a line, optionally followed by per-key limits, ``queue_size=N images_per_minute=N
event_streams=N job_storage_bytes=N``; for a Kubernetes Secret). A key is only ever kept as its
SHA-256 digest, compared in constant time against every known key (never stopping at the first
match), and never logged.

Without keys the service is open, and every caller is named ``anonymous`` (the name metrics, logs
and job ownership use); fair shares are still kept per caller, by address: the TCP peer, or, when the
peer is one of ``TOONSERVE_TRUSTED_PROXIES``, the nearest address in ``X-Forwarded-For`` that is not a
trusted proxy (a client cannot pick its own address by sending the header).

Each client may have at most ``TOONSERVE_CLIENT_QUEUE_SIZE`` images waiting (enforced by the worker's
scheduler: 429 beyond), and, when ``TOONSERVE_CLIENT_IMAGES_PER_MINUTE`` (or a key's own value) is
set, send at most that many images a minute (:class:`RateLimiter`, a token bucket: 429 beyond). Both
answers carry ``Retry-After`` and the IETF ``RateLimit`` / ``RateLimit-Policy`` fields
(draft-ietf-httpapi-ratelimit-headers); so does the 429 of a client with
``TOONSERVE_CLIENT_EVENT_STREAMS`` job events streams open (or its key's ``event_streams=N``).
A client's jobs hold at most ``TOONSERVE_CLIENT_JOB_STORAGE_BYTES`` of the job storage (or its key's
``job_storage_bytes=N``; without keys, each address has that share): 507 beyond, so one client
cannot fill the storage for the others.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from starlette.datastructures import Headers
from starlette.types import Scope

from inference.errors import ConfigurationError
from serving.tickets import ANONYMOUS, Client

#: The name of the single key of ``TOONSERVE_API_KEY``.
UNNAMED: Final = "default"
_NAME: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
#: Per-key limits a keys file may set after ``name=key``.
KEY_OPTIONS: Final = ("queue_size", "images_per_minute", "event_streams", "job_storage_bytes")
#: Per-key limits that must be at least 1 (0 would shut the client out).
_AT_LEAST_ONE: Final = ("queue_size", "event_streams")
#: Rate buckets of callers not seen for this long are forgotten (they are full again by then).
_FORGET_S: Final = 120.0
#: RateLimit-Policy names.
RATE_POLICY: Final = "images"
QUEUE_POLICY: Final = "queue"
STREAMS_POLICY: Final = "streams"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class ApiKey:
    """One named key, kept as its digest, with the limits that override the service's for it."""

    name: str
    digest: bytes
    queue_size: int | None = None
    images_per_minute: int | None = None
    event_streams: int | None = None
    job_storage_bytes: int | None = None


@dataclass(frozen=True)
class Caller:
    """A request's client: who it is to the worker (name, fair-share key, queue limit), the rate
    it may send images at (None: no rate limit) and its key's own cap of job events streams (None:
    the service's)."""

    client: Client
    images_per_minute: int | None = None
    event_streams: int | None = None
    #: Its key's own share of the job storage, bytes (None: the service's).
    job_storage_bytes: int | None = None

    @property
    def name(self) -> str:
        return self.client.name


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _key(name: str, key: str, where: str, **limits: int | None) -> ApiKey:
    if not _NAME.match(name):
        raise ConfigurationError(
            f"{where}: the key name {name[:70]!r} must be 1 to 64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    if not key or any(c.isspace() for c in key):
        raise ConfigurationError(f"{where}: the key of {name!r} is empty or has spaces")
    return ApiKey(name, _digest(key), **limits)


def parse_keys(entries: Sequence[str], where: str) -> list[ApiKey]:
    """``name=key`` entries (the comma-separated items of ``TOONSERVE_API_KEYS``, or a keys file's
    lines), each of which may go on with ``queue_size=N``, ``images_per_minute=N`` and
    ``event_streams=N``. Blank entries and ``#`` comments are skipped. Errors name the entry, never
    the key."""
    keys = []
    for number, line in enumerate(entries, start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        entry, *options = line.split()
        name, sep, key = entry.partition("=")
        here = f"{where}, entry {number}"
        if not sep:
            raise ConfigurationError(f"{here}: expected name=key")
        limits: dict[str, int | None] = {}
        for option in options:
            field, _, value = option.partition("=")
            if field not in KEY_OPTIONS or not value.isdigit() or int(value) < (field in _AT_LEAST_ONE):
                raise ConfigurationError(
                    f"{here}: {option.split('=')[0][:40]!r} is not one of "
                    f"{', '.join(f'{o}=N' for o in KEY_OPTIONS)} (N a whole number, queue_size at least 1, "
                    "event_streams at least 1)"
                )
            limits[field] = int(value)
        keys.append(_key(name.strip(), key.strip(), here, **limits))
    return keys


def load_keys(api_key: str | None, api_keys: str | None, api_keys_file: Path | None) -> list[ApiKey]:
    """Every configured key; :class:`ConfigurationError` for a malformed entry, an unreadable file,
    or two keys with one name or one key under two names."""
    keys: list[ApiKey] = []
    if api_key is not None:
        keys.append(_key(UNNAMED, api_key, "TOONSERVE_API_KEY"))
    if api_keys:
        keys += parse_keys(api_keys.split(","), "TOONSERVE_API_KEYS")
    if api_keys_file is not None:
        try:
            text = api_keys_file.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigurationError(
                f"TOONSERVE_API_KEYS_FILE {api_keys_file} cannot be read: {exc}"
            ) from exc
        keys += parse_keys(text.splitlines(), f"TOONSERVE_API_KEYS_FILE {api_keys_file}")
    names = [k.name for k in keys]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigurationError(f"more than one API key is named {', '.join(twice)}; names must differ")
    if len({k.digest for k in keys}) < len(keys):
        raise ConfigurationError("the same API key is configured under two names; give each client its own")
    return keys


def parse_networks(values: Iterable[str]) -> list[Network]:
    """Addresses or CIDR ranges (``10.0.0.0/8``, ``::1``); ValueError names a bad one."""
    out = []
    for value in values:
        try:
            out.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError:
            raise ValueError(f"not an IP address or CIDR range: {value[:60]!r}") from None
    return out


def presented_key(headers: Headers) -> str | None:
    """The key a request sends: ``X-API-Key``, else ``Authorization: Bearer``."""
    given = headers.get("x-api-key")
    if given is not None:
        return given
    scheme, _, value = headers.get("authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" else None


class Clients:
    """The configured keys and limits; tells each request's :class:`Caller`."""

    def __init__(
        self,
        keys: Sequence[ApiKey] = (),
        *,
        trusted_proxies: Sequence[Network] = (),
        queue_size: int | None = None,
        images_per_minute: int = 0,
    ) -> None:
        self.keys = tuple(keys)
        self.trusted_proxies = tuple(trusted_proxies)
        self.queue_size = queue_size
        #: The service-wide images per minute per client; 0: no rate limit.
        self.images_per_minute = images_per_minute

    @property
    def auth(self) -> bool:
        """Whether requests must send a key."""
        return bool(self.keys)

    @property
    def names(self) -> tuple[str, ...]:
        """Every name a client can have (the bounded values of the metrics' ``client`` label)."""
        return tuple(k.name for k in self.keys) or (ANONYMOUS,)

    def match(self, given: str | None) -> ApiKey | None:
        """The configured key equal to ``given``, compared in constant time against all of them."""
        if given is None:
            return None
        digest = _digest(given)
        found = None
        for key in self.keys:
            if hmac.compare_digest(digest, key.digest):
                found = key
        return found

    def caller(self, scope: Scope, headers: Headers) -> Caller | None:
        """The request's caller; None when keys are configured and it sends none of them."""
        if self.auth:
            key = self.match(presented_key(headers))
            if key is None:
                return None
            queue = key.queue_size if key.queue_size is not None else self.queue_size
            rate = key.images_per_minute if key.images_per_minute is not None else self.images_per_minute
            return Caller(
                Client(key.name, key.name, queue), rate or None, key.event_streams, key.job_storage_bytes
            )
        address = self.address(scope, headers)
        return Caller(
            Client(ANONYMOUS, f"address:{address}", self.queue_size), self.images_per_minute or None
        )

    def anonymous(self) -> Caller:
        """The caller of a request on an open route that sent no key."""
        return Caller(Client(ANONYMOUS, ANONYMOUS, self.queue_size), None)

    def address(self, scope: Scope, headers: Headers) -> str:
        """The caller's address: the peer's, or through trusted proxies the nearest untrusted one
        in ``X-Forwarded-For`` (read right to left)."""
        peer = (scope.get("client") or ("unknown", 0))[0]
        if not self._trusted(peer):
            return str(peer)
        hops = [h.strip() for line in headers.getlist("x-forwarded-for") for h in line.split(",")]
        for hop in reversed([h for h in hops if h]):
            if not self._trusted(hop):
                return hop if _is_ip(hop) else str(peer)
        return str(peer)

    def _trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self.trusted_proxies)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class RateState:
    """A client's rate limit after a request: allowed or not, what is left, when it is full again."""

    allowed: bool
    limit: int
    remaining: int
    #: Seconds until the bucket is full again (RateLimit's ``t``).
    reset_s: int
    #: Seconds until the refused request would fit (Retry-After), 0 when allowed.
    retry_after: int = 0

    def headers(self) -> dict[str, str]:
        """``RateLimit-Policy`` and ``RateLimit`` (and ``Retry-After`` when refused)."""
        out = {
            "RateLimit-Policy": f'"{RATE_POLICY}";q={self.limit};w=60',
            "RateLimit": f'"{RATE_POLICY}";r={self.remaining};t={self.reset_s}',
        }
        if not self.allowed:
            out["Retry-After"] = str(self.retry_after)
        return out


def queue_headers(limit: int, retry_after: int, policy: str = QUEUE_POLICY) -> dict[str, str]:
    """The RateLimit fields of a client whose queue share (or, ``policy`` :data:`STREAMS_POLICY`, its
    share of events streams) is full."""
    return {
        "RateLimit-Policy": f'"{policy}";q={limit}',
        "RateLimit": f'"{policy}";r=0;t={retry_after}',
    }


class RateLimiter:
    """A token bucket per client key: ``rate`` images a minute, as many at once at most. Thread-safe."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}  # key → (tokens, when)
        self._lock = threading.Lock()
        self._clock = clock

    def take(self, key: str, images: int, rate: int) -> RateState:
        """Take ``images`` tokens of ``key``'s bucket if it holds them."""
        now = self._clock()
        per_s = rate / 60.0
        with self._lock:
            tokens, when = self._buckets.get(key, (float(rate), now))
            tokens = min(float(rate), tokens + (now - when) * per_s)
            allowed = images <= tokens
            if allowed:
                tokens -= images
            self._buckets[key] = (tokens, now)
            if len(self._buckets) > 1024:
                self._forget(now)
        missing = 0.0 if allowed else images - tokens
        return RateState(
            allowed,
            rate,
            max(0, math.floor(tokens)),
            math.ceil((rate - tokens) / per_s),
            0 if allowed else max(1, math.ceil(missing / per_s)),
        )

    def _forget(self, now: float) -> None:
        for key in [k for k, (_, when) in self._buckets.items() if now - when > _FORGET_S]:
            del self._buckets[key]
