"""Webhooks: the job object POSTed to the job's URL when it ends, signed, retried with backoff.

The body is the job object as ``GET /jobs/{id}`` returns it. ``X-Toonserve-Signature`` is
``sha256=<hex>``, the HMAC-SHA256 of the exact body bytes under the server's webhook secret; a
receiver recomputes it and compares in constant time. A delivery that does not get a 2xx answer is
tried again after 1 s, 2 s, 4 s … up to the attempt limit; whether it was delivered is stored with
the job, so a restart resumes pending deliveries.

Only http(s) URLs are accepted, and unless private addresses are allowed, a URL whose host resolves
to a loopback, private, link-local or otherwise non-public address is refused at submission and
checked again at each delivery (its DNS may have changed since).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
import socket
from collections.abc import Callable
from typing import Any, Final
from urllib.parse import urlsplit

import httpx

from jobs.errors import WebhookRefusedError
from jobs.model import Job, public_job
from serving.retry import backoff_s

log = logging.getLogger(__name__)

SIGNATURE_HEADER: Final = "X-Toonserve-Signature"
#: Longest webhook URL accepted.
MAX_URL_LENGTH: Final = 2048


def sign(secret: str, body: bytes) -> str:
    """The signature header's value for ``body``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def _public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def check_url(url: str, allow_private: bool) -> str:
    """``url`` if webhooks may be sent there; :class:`WebhookRefusedError` saying why not. Resolves
    the host (blocking: call it off the event loop). A host that does not resolve now is let through:
    DNS may be down for a moment, and every delivery checks again before it connects."""
    shown = url if len(url) <= 200 else url[:200] + "…"
    if len(url) > MAX_URL_LENGTH:
        raise WebhookRefusedError(f"webhook URL is longer than {MAX_URL_LENGTH} characters")
    try:
        parts = urlsplit(url)
        httpx.URL(url)  # what the delivery will parse: refuse now what it would refuse then
        port = parts.port
    except (ValueError, httpx.InvalidURL) as exc:
        raise WebhookRefusedError(f"webhook {shown!r} is not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebhookRefusedError(f"webhook must be an http:// or https:// URL with a host, got {shown!r}")
    if allow_private:
        return url
    try:
        infos = socket.getaddrinfo(parts.hostname, port or 443, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return url
    for info in infos:
        address = str(info[4][0])
        if not _public(address):
            raise WebhookRefusedError(
                f"webhook host {parts.hostname!r} resolves to {address}, a private, loopback or link-local "
                "address; such webhooks are refused unless the server allows them"
            )
    return url


class WebhookSender:
    """Delivers webhooks in the background (one task per ended job)."""

    def __init__(
        self,
        secret: str | None,
        *,
        allow_private: bool,
        attempts: int,
        timeout_s: float,
        on_delivery: Callable[[str], None] | None = None,
        first_delay_s: float = 1.0,
    ) -> None:
        self.secret = secret
        self.allow_private = allow_private
        self.attempts = attempts
        self.timeout_s = timeout_s
        self.first_delay_s = first_delay_s
        self._on_delivery = on_delivery or (lambda _: None)

    def body(self, job: Job) -> bytes:
        return json.dumps(public_job(job), separators=(",", ":")).encode()

    def headers(self, job: Job, body: bytes) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "X-Toonserve-Event": f"job.{job.status}"}
        if self.secret:
            headers[SIGNATURE_HEADER] = sign(self.secret, body)
        return headers

    async def deliver(self, job: Job) -> bool:
        """POST the ended job to its webhook until a 2xx answer or the attempts run out."""
        assert job.webhook is not None
        body = self.body(job)
        headers = self.headers(job, body)
        async with httpx.AsyncClient(timeout=self.timeout_s, follow_redirects=False) as client:
            for attempt in range(1, self.attempts + 1):
                outcome = await self._attempt(client, job, body, headers)
                if outcome == "delivered":
                    self._on_delivery("delivered")
                    return True
                if outcome == "refused":
                    break
                self._on_delivery("retried" if attempt < self.attempts else "failed")
                if attempt < self.attempts:
                    await asyncio.sleep(backoff_s(attempt, self.first_delay_s))
        if outcome == "refused":
            self._on_delivery("refused")
        log.warning("webhook of job %s not delivered to %s", job.id, job.webhook)
        return False

    async def _attempt(
        self, client: httpx.AsyncClient, job: Job, body: bytes, headers: dict[str, Any]
    ) -> str:
        assert job.webhook is not None
        try:
            await asyncio.to_thread(check_url, job.webhook, self.allow_private)
        except WebhookRefusedError as exc:
            log.warning("webhook of job %s refused: %s", job.id, exc)
            return "refused"
        try:
            response = await client.post(job.webhook, content=body, headers=headers)
        except (httpx.HTTPError, httpx.InvalidURL, ValueError) as exc:
            log.info("webhook of job %s: %s", job.id, exc)
            return "error"
        if 200 <= response.status_code < 300:
            return "delivered"
        log.info("webhook of job %s answered %d", job.id, response.status_code)
        return "error"
