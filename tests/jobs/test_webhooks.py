"""Webhook delivery against hostile receivers (real sockets on loopback) and the address guard.

Receivers are small raw HTTP/1.1 servers in threads, each doing one thing a hostile receiver does: an
endless body, an answer trickled a byte a second, a hold until released. Host names are resolved by
injected resolvers, so a name can resolve to loopback, or change its answer between lookups.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import socketserver
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from jobs.errors import WebhookRefusedError
from jobs.model import Job
from jobs.webhooks import (
    REPLY_READ_LIMIT,
    SIGNATURE_HEADER,
    Attempt,
    WebhookSender,
    check_url,
    embedded_ipv4,
    is_public,
    literal_address,
    sign,
)
from serving.options import ResolvedOptions

OPTIONS = ResolvedOptions(style="anime", processing_size=720, format="png", quality=90)
#: What the endless receiver offers: 1 GiB, generated as it goes.
HUGE = 1 << 30
#: What httpcore reads from the socket at once: a body read may overshoot the limit by this much.
NETWORK_READ = 64 * 1024

AddrInfo = tuple[Any, Any, Any, Any, tuple[Any, ...]]


# -- receivers -------------------------------------------------------------------------------------


@dataclass
class Seen:
    """A request a receiver got."""

    method: str
    target: str
    headers: dict[str, str]
    body: bytes


class Receiver(socketserver.ThreadingTCPServer):
    """An HTTP/1.1 server on a free loopback port: reads each request, records it, then lets
    ``behaviour(receiver, sock)`` answer (one request per connection)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self, behaviour: Callable[[Receiver, socket.socket], None], tls: ssl.SSLContext | None = None
    ) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.behaviour = behaviour
        self.tls = tls
        self.lock = threading.Lock()
        self.release = threading.Event()
        self.requests: list[Seen] = []
        self.sent = 0
        self.in_flight = 0
        self.most_in_flight = 0
        self.handled = 0
        self.server_names: list[str | None] = []
        self._thread = threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def url(self, host: str = "127.0.0.1", path: str = "/hook") -> str:
        return f"http://{host}:{self.port}{path}"

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = super().get_request()
        if self.tls is not None:
            sock.settimeout(5)
            try:
                sock = self.tls.wrap_socket(sock, server_side=True)
            except OSError:
                sock.close()
                raise
        return sock, address

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that hangs up is what these tests are about

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Until every connection's handler has returned."""
        deadline = time.monotonic() + timeout
        while self.in_flight and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.in_flight == 0

    def __enter__(self) -> Receiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.shutdown()
        self.server_close()
        self._thread.join(5)


class _Handler(socketserver.BaseRequestHandler):
    server: Receiver
    request: socket.socket

    def handle(self) -> None:
        sock = self.request
        sock.settimeout(30)
        with sock.makefile("rb") as stream:
            line = stream.readline(65536).decode("latin-1").rstrip("\r\n")
            if not line:
                return
            method, target, _ = line.split(" ", 2)
            headers: dict[str, str] = {}
            while (header := stream.readline(65536).decode("latin-1").rstrip("\r\n")) != "":
                name, _, value = header.partition(":")
                headers[name.strip().lower()] = value.strip()
            body = stream.read(int(headers.get("content-length", "0")))
        server = self.server
        with server.lock:
            server.requests.append(Seen(method, target, headers, body))
            server.in_flight += 1
            server.most_in_flight = max(server.most_in_flight, server.in_flight)
        try:
            server.behaviour(server, sock)
        except OSError:
            pass  # the client hung up
        finally:
            with server.lock:
                server.in_flight -= 1
                server.handled += 1


def answer(status: int = 204) -> Callable[[Receiver, socket.socket], None]:
    def behaviour(_: Receiver, sock: socket.socket) -> None:
        sock.sendall(f"HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())

    return behaviour


def endless(receiver: Receiver, sock: socket.socket) -> None:
    """200, then 1 GiB of body made as it is sent, for as long as the client takes it."""
    sock.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {HUGE}\r\n\r\n".encode())
    chunk = bytes(64 * 1024)
    while receiver.sent < HUGE:
        sock.sendall(chunk)
        receiver.sent += len(chunk)


def trickle(head: bytes) -> Callable[[Receiver, socket.socket], None]:
    """``head`` at once, then an endless answer one byte a second."""

    def behaviour(receiver: Receiver, sock: socket.socket) -> None:
        sock.sendall(head)
        while not receiver.release.wait(1.0):
            sock.sendall(b"x")

    return behaviour


def hold(receiver: Receiver, sock: socket.socket) -> None:
    """No answer until released, then 204."""
    receiver.release.wait(30)
    answer(204)(receiver, sock)


# -- resolvers -------------------------------------------------------------------------------------


@dataclass
class Answers:
    """A resolver whose n-th lookup gets the n-th answer (the last one ever after), whatever the name
    (or ``names[host]`` when the name is listed)."""

    answers: list[list[str]] = field(default_factory=list)
    names: dict[str, list[str]] = field(default_factory=dict)
    lookups: list[str] = field(default_factory=list)

    def __call__(self, host: str, port: int, *_: int) -> Sequence[AddrInfo]:
        self.lookups.append(host)
        if host in self.names:
            addresses = self.names[host]
        else:
            addresses = self.answers[min(len(self.lookups), len(self.answers)) - 1]
        if not addresses:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        out: list[AddrInfo] = []
        for address in addresses:
            if ":" in address:
                out.append((socket.AF_INET6, socket.SOCK_STREAM, 6, "", (address, port, 0, 0)))
            else:
                out.append((socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port)))
        return out


def everything_is(*addresses: str) -> Answers:
    return Answers(answers=[list(addresses)])


# -- helpers ---------------------------------------------------------------------------------------


def job(url: str, job_id: str = "j1") -> Job:
    return Job(
        id=job_id,
        status="succeeded",
        options=OPTIONS,
        items=(),
        created_at=1.0,
        updated_at=2.0,
        expires_at=3.0,
        webhook=url,
        webhook_state="pending",
    )


def sender(
    *,
    allow_private: bool = True,
    attempts: int = 1,
    timeout_s: float = 10.0,
    concurrency: int = 8,
    resolver: Answers | None = None,
    outcomes: list[str] | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> WebhookSender:
    extra: dict[str, Any] = {"resolver": resolver} if resolver is not None else {}
    return WebhookSender(
        "whsec",
        allow_private=allow_private,
        attempts=attempts,
        timeout_s=timeout_s,
        concurrency=concurrency,
        on_delivery=outcomes.append if outcomes is not None else None,
        first_delay_s=0.05,
        ssl_context=ssl_context,
        **extra,
    )


def attempt(webhooks: WebhookSender, url: str) -> Attempt:
    return asyncio.run(webhooks.attempt(url, b"{}", {"Content-Type": "application/json"}))


# -- bounded delivery ------------------------------------------------------------------------------


def test_an_endless_answer_is_read_no_further_than_the_limit() -> None:
    with Receiver(endless) as receiver:
        result = attempt(sender(), receiver.url())
        assert result.outcome == "delivered" and result.status == 200
        assert REPLY_READ_LIMIT <= result.received < REPLY_READ_LIMIT + NETWORK_READ
        receiver.wait_idle()  # the connection was closed: the receiver's sending failed
        # What it managed to send before that: the bytes read plus what the two kernels buffered.
        assert receiver.sent < 64 * 1024 * 1024

        outcomes: list[str] = []
        assert asyncio.run(sender(outcomes=outcomes).deliver(job(receiver.url())))
        assert outcomes == ["delivered"]


@pytest.mark.slow
def test_an_answer_trickled_a_byte_a_second_ends_at_the_deadline_and_is_retried(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="jobs.webhooks")
    with Receiver(trickle(b"H")) as receiver:
        outcomes: list[str] = []
        webhooks = sender(attempts=2, timeout_s=1.5, outcomes=outcomes)
        start = time.monotonic()
        assert not asyncio.run(webhooks.deliver(job(receiver.url())))
        # Each read gets a byte within its own (1.5 s) timeout: only the attempt's deadline ends it.
        assert time.monotonic() - start < 10
        assert outcomes == ["retried", "failed"]
        assert len(receiver.requests) == 2
        assert caplog.text.count("no answer within 1.5 s") == 2


@pytest.mark.slow
def test_a_2xx_whose_body_trickles_counts_as_delivered_at_the_deadline() -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n"
    with Receiver(trickle(head)) as receiver:
        start = time.monotonic()
        result = attempt(sender(timeout_s=1.5), receiver.url())
        assert time.monotonic() - start < 10
        assert result.outcome == "delivered" and result.status == 200
        assert result.received < REPLY_READ_LIMIT


def test_at_most_concurrency_attempts_are_in_flight() -> None:
    with Receiver(hold) as receiver:
        webhooks = sender(concurrency=2)

        async def run() -> list[bool]:
            deliveries = [
                asyncio.create_task(webhooks.deliver(job(receiver.url(), f"j{i}"))) for i in range(5)
            ]
            deadline = time.monotonic() + 10
            while receiver.in_flight < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.5)  # room for a third one, were it let through
            assert receiver.in_flight == 2 and len(receiver.requests) == 2
            receiver.release.set()
            return await asyncio.gather(*deliveries)

        assert asyncio.run(run()) == [True] * 5
        assert receiver.most_in_flight == 2 and len(receiver.requests) == 5


# -- where it connects -----------------------------------------------------------------------------


def test_the_connection_goes_to_the_resolved_address_with_the_urls_host() -> None:
    with Receiver(answer(204)) as receiver:
        resolver = Answers(names={"hooks.example": ["127.0.0.1"]})
        url = f"http://hooks.example:{receiver.port}/hook?x=1"
        body_job = job(url)
        webhooks = sender(resolver=resolver)
        assert asyncio.run(webhooks.deliver(body_job))
        [seen] = receiver.requests
        assert seen.method == "POST" and seen.target == "/hook?x=1"
        assert seen.headers["host"] == f"hooks.example:{receiver.port}"
        assert seen.body == webhooks.body(body_job)
        assert seen.headers[SIGNATURE_HEADER.lower()] == sign("whsec", seen.body)
        assert resolver.lookups == ["hooks.example"]  # once, by the sender; httpx never looked it up


def test_each_attempt_resolves_once_and_the_next_address_is_tried_when_one_does_not_connect() -> None:
    with Receiver(answer(500)) as receiver:
        # Nothing listens on 127.0.0.2 (the receiver is bound to 127.0.0.1 only).
        resolver = Answers(names={"hooks.example": ["127.0.0.2", "127.0.0.1"]})
        webhooks = sender(resolver=resolver, attempts=2)
        assert not asyncio.run(webhooks.deliver(job(receiver.url("hooks.example"))))
        assert resolver.lookups == ["hooks.example"] * 2
        assert len(receiver.requests) == 2
        result = attempt(webhooks, receiver.url("hooks.example"))
        assert result.status == 500 and result.address == "127.0.0.1"


def test_a_name_that_rebinds_to_loopback_never_reaches_it() -> None:
    with Receiver(answer(204)) as receiver:
        # Public when the job is submitted, loopback from then on.
        resolver = Answers(answers=[["93.184.215.14"], ["127.0.0.1"]])
        url = receiver.url("rebind.example")
        assert check_url(url, False, resolver=resolver) == url
        outcomes: list[str] = []
        webhooks = sender(allow_private=False, resolver=resolver, attempts=3, outcomes=outcomes)
        assert not asyncio.run(webhooks.deliver(job(url)))
        assert outcomes == ["refused"]
        assert resolver.lookups == ["rebind.example"] * 2
        assert receiver.requests == []


@pytest.mark.parametrize("addresses", [["127.0.0.1"], ["8.8.8.8", "127.0.0.1"], ["::1", "8.8.8.8"]])
def test_a_public_looking_name_that_resolves_to_loopback_is_refused(addresses: list[str]) -> None:
    with Receiver(answer(204)) as receiver:
        resolver = Answers(names={"hooks.example": addresses})
        url = receiver.url("hooks.example")
        with pytest.raises(WebhookRefusedError, match="private, loopback or link-local"):
            check_url(url, False, resolver=resolver)
        result = attempt(sender(allow_private=False, resolver=resolver), url)
        assert result.outcome == "refused" and "private, loopback or link-local" in result.detail
        assert receiver.requests == []


def test_a_name_that_does_not_resolve_is_let_through_at_submission_and_retried_at_delivery() -> None:
    resolver = Answers(answers=[[]])
    url = "http://gone.example/hook"
    assert check_url(url, False, resolver=resolver) == url
    result = attempt(sender(allow_private=False, resolver=resolver), url)
    assert result.outcome == "error" and "does not resolve" in result.detail


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate (and its key) for ``hooks.example``."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    command = (
        "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 "
        "-subj /CN=hooks.example -addext subjectAltName=DNS:hooks.example"
    )
    subprocess.run(
        [*command.split(), "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True
    )
    return cert, key


@pytest.fixture
def tls_receiver(certificate: tuple[Path, Path]) -> Iterator[Receiver]:
    cert, key = certificate
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    with Receiver(answer(204), tls=context) as receiver:

        def seen_name(_: ssl.SSLObject | ssl.SSLSocket, name: str | None, __: ssl.SSLContext) -> None:
            receiver.server_names.append(name)

        context.sni_callback = seen_name
        yield receiver


def test_https_uses_the_urls_host_for_sni_and_the_certificate(
    tls_receiver: Receiver, certificate: tuple[Path, Path]
) -> None:
    trusted = ssl.create_default_context(cafile=str(certificate[0]))
    resolver = Answers(names={"hooks.example": ["127.0.0.1"], "other.example": ["127.0.0.1"]})
    webhooks = sender(resolver=resolver, ssl_context=trusted)
    url = f"https://hooks.example:{tls_receiver.port}/hook"
    result = attempt(webhooks, url)
    assert result.outcome == "delivered" and result.status == 204, result.detail
    assert tls_receiver.server_names == ["hooks.example"]
    assert tls_receiver.requests[0].headers["host"] == f"hooks.example:{tls_receiver.port}"

    # The same address under a name the certificate does not carry: the handshake fails.
    result = attempt(webhooks, f"https://other.example:{tls_receiver.port}/hook")
    assert result.outcome == "error" and result.status is None
    assert "certificate" in result.detail.lower() or "hostname" in result.detail.lower(), result.detail
    assert len(tls_receiver.requests) == 1


# -- the address table -----------------------------------------------------------------------------

NOT_PUBLIC = [
    "::127.0.0.1",  # IPv4-compatible
    "::8.8.8.8",  # IPv4-compatible, deprecated even when its address is public
    "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
    "64:ff9b:1::808:808",  # NAT64, local use
    "2002:7f00:1::",  # 6to4 of 127.0.0.1
    "2002:a00:1::1",  # 6to4 of 10.0.0.1
    "::ffff:127.0.0.1",
    "::ffff:10.0.0.1",
    "2001:0:4136:e378:8000:63bf:f5ff:fffe",  # Teredo, client 10.0.0.1
    "2001:0:4136:e378:8000:63bf:3fff:fdd2",  # Teredo, client 192.0.2.45
    "2001:0:a00:1:8000:63bf:f7f7:f7f7",  # Teredo, server 10.0.0.1, client 8.8.8.8
    "::1",
    "::",
    "fe80::1",
    "fec0::1",
    "fc00::1",
    "fd12:3456::1",
    "ff02::1",
    "ff0e::1",
    "100::1",
    "2001:db8::1",
    "3fff::1",
    "5f00::1",
    "127.0.0.1",
    "10.1.2.3",
    "172.16.0.1",
    "192.168.1.1",
    "100.64.0.1",
    "0.0.0.0",
    "0.1.2.3",
    "169.254.169.254",
    "224.0.0.1",
    "239.255.255.250",
    "255.255.255.255",
    "240.0.0.1",
    "192.0.0.9",
    "192.0.2.1",
    "198.51.100.1",
    "203.0.113.1",
    "198.18.0.1",
    "192.88.99.1",
]
PUBLIC = [
    "8.8.8.8",
    "1.1.1.1",
    "2606:4700:4700::1111",
    "2002:0808:0808::1",
    "64:ff9b::808:808",
    "::ffff:8.8.8.8",
]


def _url(address: str) -> str:
    return f"http://[{address}]/hook" if ":" in address else f"http://{address}/hook"


@pytest.mark.parametrize("address", NOT_PUBLIC)
def test_special_addresses_are_refused_as_literals_and_as_answers(address: str) -> None:
    assert not is_public(address)
    # The resolver would say public: the literal alone decides.
    with pytest.raises(WebhookRefusedError, match="private, loopback or link-local"):
        check_url(_url(address), False, resolver=everything_is("8.8.8.8"))
    with pytest.raises(WebhookRefusedError, match="private, loopback or link-local"):
        check_url("http://hooks.example/hook", False, resolver=everything_is(address))
    assert check_url(_url(address), True, resolver=everything_is("8.8.8.8")) == _url(address)


@pytest.mark.parametrize(
    "url",
    [
        "http://2130706433/",
        "http://0x7f.1/",
        "http://127.1/",
        "http://0177.0.0.1/",
        "http://0x7f000001/",
        "http://0x7F.0.0.1:8080/",
        "http://127.000.000.001/",
        "http://10.1/",
        "http://167772161/",  # 10.0.0.1
        "http://0/",
        "https://[::ffff:7f00:1]/",
        "http://[0:0:0:0:0:ffff:127.0.0.1]/",
    ],
)
def test_addresses_spelled_as_numbers_are_refused(url: str) -> None:
    # httpx itself refuses four dotted parts that are not plain decimal (0177.0.0.1): not a valid URL.
    with pytest.raises(WebhookRefusedError, match=r"private, loopback or link-local|not a valid URL"):
        check_url(url, False, resolver=everything_is("8.8.8.8"))
    result = attempt(sender(allow_private=False, resolver=everything_is("8.8.8.8")), url)
    assert result.outcome == "refused"


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_are_accepted(address: str) -> None:
    assert is_public(address)
    url = "https://hooks.example/hook"
    assert check_url(url, False, resolver=everything_is(address)) == url
    assert check_url(_url(address), False, resolver=everything_is("127.0.0.1")) == _url(address)


def test_the_ipv4_addresses_inside_ipv6_ones() -> None:
    def v4(address: str) -> list[str]:
        ip = literal_address(address)
        assert ip is not None
        return [str(x) for x in embedded_ipv4(ip)]

    assert v4("2001:0:4136:e378:8000:63bf:3fff:fdd2") == ["65.54.227.120", "192.0.2.45"]
    assert v4("2002:0808:0808::1") == ["8.8.8.8"]
    assert v4("64:ff9b::7f00:1") == ["127.0.0.1"]
    assert v4("::ffff:10.0.0.1") == ["10.0.0.1"]
    assert v4("::127.0.0.1") == ["127.0.0.1"]
    assert v4("2606:4700:4700::1111") == []


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("2130706433", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("0177.0.0.01", "127.0.0.1"),
        ("1.2.65535", "1.2.255.255"),
        ("fe80::1%25eth0", "fe80::1"),
        ("1.2.3.256", None),
        ("1.2.3.4.5", None),
        ("08.0.0.1", None),
        ("0x", None),
        ("4294967296", None),
        ("hooks.example", None),
        ("1e3", None),
        ("", None),
    ],
)
def test_literal_addresses_are_read_like_inet_aton(host: str, expected: str | None) -> None:
    ip = literal_address(host)
    assert (str(ip) if ip is not None else None) == expected


def test_odd_urls_are_refused_at_delivery_too() -> None:
    for url in ("ftp://example.com/x", "http://[oops/x", "http://example.com:99999/x"):
        with pytest.raises(WebhookRefusedError):
            check_url(url, True)
        assert attempt(sender(), url).outcome == "refused"
